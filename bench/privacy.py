"""Benchmark: what DP-SGD at the sites costs in accuracy and in time.

(a) Fed-Heart-Disease, FLamby protocol (4 hospitals, logistic regression, batch 4, Adam
    1e-3, 100 local steps, 15 rounds, FedAvg weighted by examples), per-sample clipping
    norm 1.1, delta 1e-4, target epsilon 0.1 / 1 / 5 / 10 per site over the whole run,
    and without DP; seeds 42-46; mean per-centre test accuracy of the final global model.
(b) medical-abstracts, 4 virtual hospitals, epsilon 1 / 3 / 8 and without DP, LoRA vs
    FFA-LoRA: accuracy and macro-F1 (a small subset on a CPU; sizes in the JSON).
(c) time per DP-SGD step over time per plain step for the MiniLM LoRA model, median of
    repeated measurements in one process.

The federated runs call, per site and round, exactly what the ClientApp calls
(``fedcare.client.training.train_on_site`` with a real ledger per site) and average the
returned trainable states by hand (FedAvg weighted by examples), in one process: the
full ``fedcare simulate`` pipeline costs minutes of Ray/SuperLink start-up per run on
this shared 2-core machine, which the 25 runs of (a) cannot afford. DP noise and
Poisson sampling draw from OS entropy (by design, see client/privacy.py), so the seeds
fix data, initialisation and plain shuffling, not the noise.

    python bench/privacy.py                 # all parts
    python bench/privacy.py --part a --seeds 42 43 --rounds 5    # smaller
Writes bench/results/privacy.json (parts merged) and prints the tables.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from fedcare.client.ledger import SiteLedger, ledger_path_for
from fedcare.client.privacy import DPPlan, private_round
from fedcare.client.training import train_on_site
from fedcare.config import RunConfig
from fedcare.models.registry import get_task
from fedcare.models.state import get_trainable_state, set_trainable_state
from fedcare.models.training import make_optimizer, make_train_loader, predict_dataset, train_steps

RESULTS = Path(__file__).resolve().parent / "results" / "privacy.json"
CPU = torch.device("cpu")
warnings.filterwarnings("ignore")


# --------------------------------------------------------------------------- federation
def federate(cfg: RunConfig, ledger_dir: Path, run_id: str, sites: list[str] | None = None) -> dict:
    """``cfg.rounds`` rounds of FedAvg over the task's sites (or over ``sites`` of its
    partition: one site is that site training alone); final per-site test metrics and
    each site's privacy record after the last round."""
    task = get_task(cfg.task)
    sites = sites or task.site_ids(cfg)
    splits = {s: task.load_site(s, cfg) for s in sites}
    models = {s: task.build_model(cfg).to(CPU) for s in sites}     # one cached model per site
    state = get_trainable_state(models[sites[0]])
    privacy: dict[str, dict | None] = {}
    t0 = time.perf_counter()
    for rnd in range(1, cfg.rounds + 1):
        updates, weights = [], []
        for s in sites:
            set_trainable_state(models[s], state)
            out = train_on_site(task, models[s], splits[s], cfg, CPU, run_id=run_id, server_round=rnd,
                                ledger=SiteLedger(ledger_path_for(ledger_dir, s)), budget=0.0, dataset_id=s)
            updates.append(get_trainable_state(models[s]))
            weights.append(out.result.num_examples)
            privacy[s] = out.privacy
        w = np.asarray(weights, dtype=np.float64) / sum(weights)
        state = {k: sum(wi * u[k].astype(np.float64) for wi, u in zip(w, updates)).astype(np.float32)
                 for k in state}
    model = models[sites[0]]
    set_trainable_state(model, state)
    per_site = {}
    for s in sites:
        scores, labels = predict_dataset(task, model, splits[s].test, cfg, CPU)
        m = task.metrics(scores, labels)
        per_site[s] = {**{k: float(v) for k, v in m.items() if isinstance(v, (int, float))}, "n_test": int(len(labels))}
    return {
        "per_site": per_site,
        "mean_accuracy": float(np.mean([m["accuracy"] for m in per_site.values()])),
        "mean_macro_f1": float(np.mean([m["macro_f1"] for m in per_site.values()])),
        "privacy": privacy,
        "n_train": {s: len(splits[s].train) for s in sites},
        "seconds": time.perf_counter() - t0,
    }


def dp_sets(epsilon: float | None, delta: float, clip: float, accountant: str) -> dict:
    if epsilon is None:
        return {"dp.level": "none"}
    return {"dp.level": "sample", "dp.epsilon": epsilon, "dp.delta": delta, "dp.max_grad_norm": clip,
            "dp.accountant": accountant}


def _label(eps: float | None) -> str:
    return "no DP" if eps is None else f"eps {eps:g}"


# ------------------------------------------------------------------------------- parts
def _checkpoint(args, part: str, partial: dict) -> None:
    """Write what a part has so far (a long run that is cut off still leaves its rows)."""
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results[f"{part}_partial"] = partial
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=str))


def part_a(args) -> dict:
    torch.set_num_threads(1)   # a 14-parameter model: threads only add overhead
    rows = []
    for eps in args.epsilons_a:
        runs = []
        for seed in args.seeds:
            cfg = RunConfig.from_flat({"task": "heart-disease", "rounds": args.rounds, "seed": seed,
                                       "train.local_steps": 100, "train.batch_size": 4, "train.lr": 1e-3,
                                       "train.optimizer": "adam",
                                       **dp_sets(eps, 1e-4, 1.1, args.accountant)}).validate()
            with tempfile.TemporaryDirectory() as tmp:
                res = federate(cfg, Path(tmp), f"bench-a-{seed}")
            runs.append({"seed": seed, **res})
            print(f"  (a) {_label(eps):>7} seed {seed}: mean per-centre accuracy {res['mean_accuracy']:.4f} "
                  f"({res['seconds']:.0f} s)", flush=True)
        accs = [r["mean_accuracy"] for r in runs]
        eps_spent = {s: max(r["privacy"][s]["epsilon"] for r in runs) for s in runs[0]["per_site"]} \
            if eps is not None else None
        rows.append({"epsilon": eps, "accuracy_mean": float(np.mean(accs)), "accuracy_std": float(np.std(accs)),
                     "per_seed": accs, "epsilon_spent_max": eps_spent,
                     "noise_multiplier": ({s: runs[0]["privacy"][s]["noise_multiplier"] for s in runs[0]["per_site"]}
                                          if eps is not None else None),
                     "runs": runs})
        _checkpoint(args, "a", {"rows": rows})
    torch.set_num_threads(args.threads)
    return {"protocol": {"task": "heart-disease", "rounds": args.rounds, "local_steps": 100, "batch_size": 4,
                         "optimizer": "adam 1e-3", "aggregation": "FedAvg weighted by examples",
                         "max_grad_norm": 1.1, "delta": 1e-4, "accountant": args.accountant,
                         "seeds": args.seeds}, "rows": rows}


def part_b(args) -> dict:
    rows = []
    for eps in args.epsilons_b:
        for aggregation in ("naive", "ffa"):
            cfg = RunConfig.from_flat({**get_task("medical-abstracts").settings("lora"), "task": "medical-abstracts",
                                       "sites": 4, "rounds": args.b_rounds, "seed": 42,
                                       "train.local_steps": args.b_steps, "train.batch_size": args.b_batch,
                                       **({"train.lr": args.b_lr} if args.b_lr else {}),
                                       "data.max_train_per_site": args.b_train, "data.max_test_per_site": args.b_test,
                                       "lora.aggregation": aggregation,
                                       **dp_sets(eps, args.b_delta, 1.0, args.accountant)}).validate()
            with tempfile.TemporaryDirectory() as tmp:
                res = federate(cfg, Path(tmp), "bench-b")
            rows.append({"epsilon": eps, "lora": "LoRA" if aggregation == "naive" else "FFA-LoRA",
                         "accuracy": res["mean_accuracy"], "macro_f1": res["mean_macro_f1"],
                         "epsilon_spent_max": (max(p["epsilon"] for p in res["privacy"].values())
                                               if eps is not None else None), **res})
            _checkpoint(args, "b", {"rows": rows})
            print(f"  (b) {_label(eps):>7} {rows[-1]['lora']:>8}: accuracy {res['mean_accuracy']:.4f} "
                  f"macro-F1 {res['mean_macro_f1']:.4f} ({res['seconds']:.0f} s)", flush=True)
    return {"setup": {"task": "medical-abstracts", "sites": 4, "dirichlet_alpha": 1.0, "rounds": args.b_rounds,
                      "local_steps": args.b_steps, "batch_size": args.b_batch, "lr": args.b_lr,
                      "max_train_per_site": args.b_train, "max_test_per_site": args.b_test,
                      "delta": args.b_delta, "max_grad_norm": 1.0, "accountant": args.accountant,
                      "note": "small subset on a shared CPU: absolute accuracies are far below a full run"},
            "rows": rows}


def part_c(args) -> dict:
    task = get_task("medical-abstracts")
    cfg = RunConfig.from_flat({**task.settings("lora"), "task": "medical-abstracts", "sites": 4, "seed": 42,
                               "train.batch_size": args.c_batch, "data.max_train_per_site": 64,
                               "data.max_test_per_site": 5}).validate()
    split = task.load_site("site-0", cfg)
    model = task.build_model(cfg).to(CPU)
    plan = DPPlan(noise_multiplier=1.0, sample_rate=args.c_batch / len(split.train), steps=args.c_steps,
                  max_grad_norm=1.0, delta=1e-3, accountant="rdp", expected_batch_size=args.c_batch)
    plain, dp = [], []
    train_steps(task, model, make_optimizer(model, cfg), make_train_loader(split.train, cfg, 0), 1, CPU)  # warm-up
    for rep in range(args.c_repeats):
        r = train_steps(task, model, make_optimizer(model, cfg), make_train_loader(split.train, cfg, rep),
                        args.c_steps, CPU)
        plain.append(r.duration_s / args.c_steps)
        with private_round(model, make_optimizer(model, cfg), split.train, plan, CPU) as priv:
            r = train_steps(task, model, priv.optimizer, priv.loader, args.c_steps, CPU)
        dp.append(r.duration_s / args.c_steps)
        print(f"  (c) repeat {rep}: plain {plain[-1] * 1e3:.0f} ms/step, DP {dp[-1] * 1e3:.0f} ms/step", flush=True)
    return {"setup": {"model": "all-MiniLM-L6-v2 + LoRA r=8 (query,value) + head", "batch_size": args.c_batch,
                      "seq_len": 128, "steps_per_repeat": args.c_steps, "repeats": args.c_repeats,
                      "device": "cpu", "torch_threads": torch.get_num_threads()},
            "plain_s_per_step": plain, "dp_s_per_step": dp,
            "median_plain_s": statistics.median(plain), "median_dp_s": statistics.median(dp),
            "ratio_of_medians": statistics.median(dp) / statistics.median(plain),
            "median_of_ratios": statistics.median(d / p for d, p in zip(dp, plain))}


# ------------------------------------------------------------------------------ output
def tables(results: dict) -> str:
    out = []
    if "a" in results:
        out += ["(a) Fed-Heart-Disease, FLamby protocol, clip 1.1, delta 1e-4: mean per-centre accuracy over seeds",
                f"{'target':>8} | {'accuracy':>17} | {'max site epsilon spent':>22}"]
        for r in results["a"]["rows"]:
            spent = f"{max(r['epsilon_spent_max'].values()):.3f}" if r["epsilon_spent_max"] else "-"
            out.append(f"{_label(r['epsilon']):>8} | {r['accuracy_mean']:.4f} +- {r['accuracy_std']:.4f} | {spent:>22}")
    if "b" in results:
        out += ["", "(b) medical-abstracts, 4 sites (small CPU subset): accuracy / macro-F1",
                f"{'target':>8} | {'adapter':>8} | {'accuracy':>8} | {'macro-F1':>8}"]
        for r in results["b"]["rows"]:
            out.append(f"{_label(r['epsilon']):>8} | {r['lora']:>8} | {r['accuracy']:.4f}   | {r['macro_f1']:.4f}")
    if "c" in results:
        c = results["c"]
        out += ["", "(c) MiniLM LoRA step time (CPU)",
                f"plain {c['median_plain_s'] * 1e3:.0f} ms/step, DP-SGD {c['median_dp_s'] * 1e3:.0f} ms/step, "
                f"ratio {c['ratio_of_medians']:.2f}x (median of {c['setup']['repeats']} repeats)"]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", nargs="+", default=["a", "b", "c"], choices=["a", "b", "c"])
    p.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44, 45, 46])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--epsilons-a", nargs="*", type=float, default=[0.1, 1, 5, 10])
    p.add_argument("--epsilons-b", nargs="*", type=float, default=[1, 3, 8])
    p.add_argument("--accountant", default="prv", choices=["prv", "rdp"])
    p.add_argument("--b-rounds", type=int, default=2)
    p.add_argument("--b-steps", type=int, default=3)
    p.add_argument("--b-batch", type=int, default=4)
    p.add_argument("--b-train", type=int, default=32)
    p.add_argument("--b-test", type=int, default=25)
    p.add_argument("--b-delta", type=float, default=1e-3)
    p.add_argument("--b-lr", type=float, help="local learning rate for (b) (default: the task's)")
    p.add_argument("--c-batch", type=int, default=8)
    p.add_argument("--c-steps", type=int, default=3)
    p.add_argument("--c-repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.threads = torch.get_num_threads()
    args.epsilons_a = [*args.epsilons_a, None]
    args.epsilons_b = [*args.epsilons_b, None]

    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results["environment"] = {"python": platform.python_version(), "torch": torch.__version__,
                              "cpu_threads": torch.get_num_threads(), "machine": platform.machine(),
                              "how": "in-process: train_on_site per site + FedAvg by hand (see module docstring)"}
    for part, fn in (("a", part_a), ("b", part_b), ("c", part_c)):
        if part in args.part:
            print(f"part ({part}) ...", flush=True)
            t0 = time.perf_counter()
            value = {**fn(args), "wall_s": time.perf_counter() - t0}
            results = {**(json.loads(args.out.read_text()) if args.out.is_file() else {}), **results}
            results[part] = value
            results.pop(f"{part}_partial", None)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1, default=str))
    print(tables(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
