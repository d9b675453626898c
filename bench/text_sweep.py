"""Sweep that chose medical-abstracts' defaults: the frozen-encoder head mode
(``train.mode=head``, mean-pooled MiniLM embeddings, linear head) over learning rate,
local steps and batch size, federated (FedAvg, 4 virtual hospitals, Dirichlet alpha)
against pooled training at equal compute (one site, the sum of the sites' steps);
optionally under DP-SGD at the sites (``--epsilons 8 3``).

Runs call what the ClientApp calls (``bench/privacy.federate``: ``train_on_site`` with a
real ledger per site). The frozen encoder's embeddings are computed once per process
(``--cache`` keeps them in a file between invocations; they depend only on the
pretrained weights and the corpus).

    python bench/text_sweep.py --alphas 1.0 0.3 --lrs 0.003 0.01 0.03 --steps 20 50
Writes bench/results/text_sweep.json (rows appended per setting) and prints the table.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from privacy import dp_sets, federate  # noqa: E402

from fedcare.config import RunConfig  # noqa: E402
from fedcare.models import medical_abstracts as ma  # noqa: E402
from fedcare.models.registry import get_task  # noqa: E402

TASK = "medical-abstracts"
OUT = Path(__file__).resolve().parent / "results" / "text_sweep.json"


def warm_embeddings(cfg: RunConfig, cache: Path | None) -> float:
    """Embed every abstract of every site once (frozen encoder); seconds it took."""
    if cache and cache.is_file():
        ma._EMBEDDINGS.update(torch.load(cache))
        return 0.0
    t0 = time.perf_counter()
    task = get_task(TASK)
    model = task.build_model(cfg).eval()
    for s in task.site_ids(cfg):
        split = task.load_site(s, cfg)
        for ds in (split.train, split.test):
            ids, mask, _ = ds.tensors
            for i in range(0, len(ids), 64):
                model.embed(ids[i:i + 64], mask[i:i + 64])
    if cache:
        torch.save(dict(ma._EMBEDDINGS), cache)
    return time.perf_counter() - t0


def config(sites: int, alpha: float, seed: int, rounds: int, steps: int, batch: int, lr: float,
           eps: float | None, extra: dict) -> RunConfig:
    return RunConfig.from_flat({**get_task(TASK).settings("lora"), "task": TASK, "sites": sites, "rounds": rounds,
                                "seed": seed, "data.dirichlet_alpha": alpha, "train.mode": "head",
                                "train.local_steps": steps, "train.batch_size": batch, "train.lr": lr,
                                **dp_sets(eps, 1e-5, extra.get("dp.max_grad_norm", 1.0), "prv"), **extra}).validate()


def weighted(res: dict) -> dict:
    per = res["per_site"].values()
    n = sum(m["n_test"] for m in per)
    return {k: sum(m[k] * m["n_test"] for m in per) / n for k in ("accuracy", "macro_f1")}


def append_row(row: dict, embed_seconds: float) -> None:
    """Add one row to the JSON (re-read first: several sweeps may share the file)."""
    doc = json.loads(OUT.read_text()) if OUT.is_file() else {"rows": []}
    doc["embed_seconds_all_abstracts"] = embed_seconds or doc.get("embed_seconds_all_abstracts")
    doc["rows"].append(row)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(doc, indent=1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--alphas", type=float, nargs="+", default=[1.0, 0.3])
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.003, 0.01, 0.03])
    ap.add_argument("--steps", type=int, nargs="+", default=[20, 50])
    ap.add_argument("--batches", type=int, nargs="+", default=[16])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[42])
    ap.add_argument("--epsilons", type=float, nargs="*", default=[], help="DP-SGD targets (none: no DP)")
    ap.add_argument("--optimizer", default="adam")
    ap.add_argument("--pooled", action="store_true", help="also pooled training at equal compute")
    ap.add_argument("--cache", type=Path, default=None, help="file keeping the frozen embeddings")
    ap.add_argument("--tag", default="", help="label of this invocation's rows")
    ap.add_argument("--max-train", type=int, default=0, help="data.max_train_per_site (0: all)")
    ap.add_argument("--max-test", type=int, default=0, help="data.max_test_per_site (0: all)")
    ap.add_argument("--clip", type=float, default=1.0, help="dp.max_grad_norm")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    warm = warm_embeddings(config(4, args.alphas[0], args.seeds[0], 1, 1, 16, 0.01, None, {}), args.cache)
    torch.set_num_threads(1)  # a linear head over cached embeddings: threads only spin
    extra = {"train.optimizer": args.optimizer, "data.max_train_per_site": args.max_train,
             "data.max_test_per_site": args.max_test, "dp.max_grad_norm": args.clip}
    settings = [("federated", None)] + [("federated", e) for e in args.epsilons]
    if args.pooled:
        settings += [("pooled", None)] + [("pooled", e) for e in args.epsilons]
    for alpha, lr, steps, batch, (setting, eps) in itertools.product(
            args.alphas, args.lrs, args.steps, args.batches, settings):
        scores = []
        for seed in args.seeds:
            sites, rounds, local = (4, args.rounds, steps) if setting == "federated" else (1, 1, 4 * args.rounds * steps)
            cfg = config(sites, alpha, seed, rounds, local, batch, lr, eps, extra)
            with tempfile.TemporaryDirectory() as tmp:
                res = federate(cfg, Path(tmp), f"sweep-{seed}")
            eps_spent = max((p or {}).get("epsilon", 0.0) for p in res["privacy"].values())
            scores.append({**weighted(res), "seed": seed, "seconds": res["seconds"], "epsilon_spent": eps_spent})
        row = {"tag": args.tag, "setting": setting, "epsilon": eps, "alpha": alpha, "lr": lr, "local_steps": steps,
               "batch_size": batch, "rounds": args.rounds, "optimizer": args.optimizer, "clip": args.clip,
               "max_train_per_site": args.max_train, "max_test_per_site": args.max_test,
               "accuracy": statistics.median(s["accuracy"] for s in scores),
               "macro_f1": statistics.median(s["macro_f1"] for s in scores), "seeds": scores}
        row["load_average"] = os.getloadavg()
        append_row(row, warm)
        print(f"{setting:9} eps={eps} alpha={alpha} lr={lr} steps={steps} batch={batch}: "
              f"acc {row['accuracy']:.4f} F1 {row['macro_f1']:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
