"""Benchmark: BreastMNIST (EfficientNet-Lite0 + LoRA) pooled vs federated vs each site
alone, with and without DP-SGD: test AUROC, accuracy and balanced accuracy.

- federated: N virtual hospitals (seeded Dirichlet label skew), FedAvg weighted by
  examples, R rounds of S local steps; evaluated on every site's test split.
- pooled: the same data as one site (all training images, all test images), the same
  total number of optimiser steps (R x S x N).
- alone: each site trains R x S steps on its own data, no averaging; evaluated on its
  own test split.
DP rows use the same target epsilon for every setting: each training set (a site's, or
the pooled one) is the protected data set, with its own accountant. The training per
round is exactly the ClientApp's (``fedcare.client.training.train_on_site`` with a real
ledger, through ``bench/privacy.py``'s in-process FedAvg; "alone" is that loop over one site).

    python bench/breastmnist.py [--rounds 5] [--local-steps 10] [--sites 4] [--epsilon 8]
Writes bench/results/breastmnist.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from privacy import dp_sets, federate  # noqa: E402

from fedcare.config import RunConfig  # noqa: E402
from fedcare.models.registry import get_task  # noqa: E402

TASK = "breastmnist"
OUT = Path(__file__).resolve().parent / "results" / "breastmnist.json"
METRICS = ("auroc", "accuracy", "balanced_accuracy")


def config(args, sites: int, rounds: int, local_steps: int, epsilon: float | None) -> RunConfig:
    return RunConfig.from_flat({**get_task(TASK).defaults, "task": TASK, "sites": sites, "rounds": rounds,
                                "seed": args.seed, "train.local_steps": local_steps,
                                "data.dirichlet_alpha": args.alpha,
                                **dp_sets(epsilon, args.delta, args.clip, "prv")}).validate()


def weighted(per_site: dict) -> dict:
    """Test-size-weighted mean of each metric over sites (AUROC too: a summary, not a
    pooled AUROC), plus the worst site's AUROC."""
    n = np.array([m["n_test"] for m in per_site.values()], dtype=float)
    out = {k: float(np.average([m[k] for m in per_site.values()], weights=n)) for k in METRICS}
    out["worst_site_auroc"] = float(min(m["auroc"] for m in per_site.values()))
    return out


def run(args, setting: str, epsilon: float | None) -> dict:
    steps = args.rounds * args.local_steps
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if setting == "federated":
            res = federate(config(args, args.sites, args.rounds, args.local_steps, epsilon), Path(tmp), "fed")
        elif setting == "pooled":
            res = federate(config(args, 1, 1, steps * args.sites, epsilon), Path(tmp), "pooled")
        else:  # each site of the federated partition alone, for as many steps as in the federation
            cfg = config(args, args.sites, 1, steps, epsilon)
            res = {"per_site": {}, "privacy": {}}
            for site in get_task(TASK).site_ids(cfg):
                one = federate(cfg, Path(tmp), f"alone-{site}", sites=[site])
                res["per_site"].update(one["per_site"])
                res["privacy"].update(one["privacy"])
    eps_spent = [p["epsilon"] for p in res["privacy"].values() if p]
    return {"setting": setting, "epsilon": epsilon, **weighted(res["per_site"]),
            "epsilon_spent_max": max(eps_spent) if eps_spent else None,
            "per_site": res["per_site"], "seconds": time.perf_counter() - t0}


def table(rows: list[dict]) -> str:
    head = f"{'setting':<10} | {'DP':>7} | {'AUROC':>6} | {'accuracy':>8} | {'bal. acc':>8} | {'worst-site AUROC':>16} | {'eps spent':>9} | {'s':>5}"
    lines = [head, "-" * len(head)]
    for r in rows:
        dp = "no DP" if r["epsilon"] is None else f"eps {r['epsilon']:g}"
        spent = "-" if r["epsilon_spent_max"] is None else f"{r['epsilon_spent_max']:.2f}"
        lines.append(f"{r['setting']:<10} | {dp:>7} | {r['auroc']:.4f} | {r['accuracy']:>8.4f} | "
                     f"{r['balanced_accuracy']:>8.4f} | {r['worst_site_auroc']:>16.4f} | {spent:>9} | {r['seconds']:>5.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sites", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--epsilon", type=float, default=8.0)
    p.add_argument("--delta", type=float, default=1e-3)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    rows = []
    for epsilon in (None, args.epsilon):
        for setting in ("federated", "pooled", "alone"):
            rows.append(run(args, setting, epsilon))
            print(f"  {setting} {'no DP' if epsilon is None else f'eps {epsilon:g}'}: "
                  f"AUROC {rows[-1]['auroc']:.4f} ({rows[-1]['seconds']:.0f} s)", flush=True)
    out = {"task": TASK, "settings": {k: v for k, v in vars(args).items() if k != "out"},
           "load_average": list(os.getloadavg()), "cpus": os.cpu_count(), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, default=float))
    print(table(rows))
    print(f"json: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
