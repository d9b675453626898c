"""Per-task cost at one site: peak memory, seconds per local step with and without DP-SGD,
adapter (what travels) bytes vs model bytes. Each task runs in its own subprocess so the
peak memory is that task's alone.

    python bench/tasks.py [--tasks breastmnist,medical-llm] [--steps 3] [--out bench/results/tasks.json]

DP steps go through ``fedcare.client.privacy.private_round`` (what a site runs), with a
fixed noise multiplier of 1.0 and clipping norm 1.0. Timings exclude one warm-up step.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_TASKS = ("heart-disease", "medical-abstracts", "breastmnist", "medical-llm")
OUT = Path(__file__).resolve().parent / "results" / "tasks.json"


def measure(task_name: str, steps: int, max_train: int) -> dict:
    import torch

    from fedcare.client.privacy import plan_round, private_round
    from fedcare.config import RunConfig
    from fedcare.models.registry import get_task
    from fedcare.models.state import get_trainable_state, state_nbytes
    from fedcare.models.training import make_optimizer, make_train_loader, pick_device, train_steps

    device = pick_device()
    task = get_task(task_name)
    cfg = RunConfig()
    cfg.update(task.settings("lora"))
    cfg.update({"data.max_train_per_site": max_train, "data.max_test_per_site": 8})
    t0 = time.perf_counter()
    split = task.load_site(task.site_ids(cfg)[0], cfg)
    model = task.build_model(cfg).to(device)
    load_s = time.perf_counter() - t0
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    adapter_bytes = state_nbytes(get_trainable_state(model))

    def per_step(run) -> float:
        run(1)  # warm-up
        start = time.perf_counter()
        run(steps)
        return (time.perf_counter() - start) / steps

    optimizer = make_optimizer(model, cfg)
    loader = make_train_loader(split.train, cfg, 0)
    plain = per_step(lambda n: train_steps(task, model, optimizer, loader, n, device))

    cfg.update({"dp.level": "sample", "dp.noise_multiplier": 1.0, "dp.max_grad_norm": 1.0})
    plan = plan_round(cfg.validate(), len(split.train))
    with private_round(model, make_optimizer(model, cfg), split.train, plan, device) as dp:
        private = per_step(lambda n: train_steps(task, model, dp.optimizer, dp.loader, n, device))

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {
        "task": task_name, "device": str(device), "batch_size": cfg.train.batch_size,
        "train_examples": len(split.train), "load_and_build_s": load_s,
        "s_per_step": plain, "s_per_step_dp": private, "dp_slowdown": private / plain,
        "model_bytes": model_bytes, "adapter_bytes": adapter_bytes, "adapter_fraction": adapter_bytes / model_bytes,
        "peak_rss_bytes": peak,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else 0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--max-train", type=int, default=64)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child mode: measure one task, print JSON
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(measure(args.one, args.steps, args.max_train)))
        return
    rows = []
    for name in args.tasks.split(","):
        proc = subprocess.run([sys.executable, __file__, "--one", name, "--steps", str(args.steps),
                               "--max-train", str(args.max_train)], capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(lines[-1][len("RESULT "):]))
    doc = {"load_average": os.getloadavg(), "cpus": os.cpu_count(), "steps": args.steps, "tasks": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    print(f"{'task':18} {'device':6} {'batch':>5} {'s/step':>8} {'s/step DP':>9} {'DP x':>5} "
          f"{'adapter':>10} {'model':>10} {'adapter %':>9} {'peak RSS':>9}")
    for r in rows:
        print(f"{r['task']:18} {r['device']:6} {r['batch_size']:5d} {r['s_per_step']:8.3f} {r['s_per_step_dp']:9.3f} "
              f"{r['dp_slowdown']:5.1f} {r['adapter_bytes'] / 1e6:8.2f}MB {r['model_bytes'] / 1e6:8.1f}MB "
              f"{100 * r['adapter_fraction']:8.2f}% {r['peak_rss_bytes'] / 1e9:7.2f}GB")
    print(f"wrote {args.out} (load average {doc['load_average'][0]:.1f} on {doc['cpus']} CPUs: timings are contended)")


if __name__ == "__main__":
    main()
