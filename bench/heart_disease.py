"""Fed-Heart-Disease, the FLamby protocol: 15 rounds of 100 local updates (batch 4, Adam
1e-3), seeds 42-46, every strategy, plus pooled training and each centre alone. The
adaptive strategies use the task's tuned server learning rate and q-FedAvg local SGD
(``HeartDiseaseTask.strategy_defaults``; the sweep that chose them is in the JSON).

Prints a table of mean per-centre test accuracy (mean and spread over seeds) and writes
bench/results/heart_disease.json.  ``--quick`` runs 2 seeds and 3 rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, mean_site_accuracy, print_table, run_federated, write_json  # noqa: E402

from fedcare.launch import resolve_config  # noqa: E402
from fedcare.models.registry import get_task  # noqa: E402
from fedcare.models.training import make_optimizer, make_train_loader, predict_dataset, train_steps  # noqa: E402


def centralised(cfg, train_ds, seed: int, steps: int) -> float:
    """Train on ``train_ds`` for ``steps`` updates; mean accuracy over the 4 centres' tests."""
    task = get_task("heart-disease")
    torch.manual_seed(seed)
    model = task.build_model(cfg)
    train_steps(task, model, make_optimizer(model, cfg), make_train_loader(train_ds, cfg, seed), steps, torch.device("cpu"))
    accs = []
    for site in task.site_ids(cfg):
        scores, labels = predict_dataset(task, model, task.load_site(site, cfg).test, cfg, torch.device("cpu"))
        accs.append(float((scores.argmax(1) == labels).mean()))
    return float(np.mean(accs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--strategies", default="fedavg,fedprox,fedadam,fedyogi,qfedavg,fedmedian,trimmedavg,krum")
    ap.add_argument("--merge", action="store_true",
                    help="re-run only --strategies; keep every other row of the existing JSON (no baselines)")
    args = ap.parse_args()
    seeds = [42, 43] if args.quick else [42, 43, 44, 45, 46]
    rounds = 3 if args.quick else 15
    task = get_task("heart-disease")
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        db = f"sqlite:///{tmp}/bench.db"
        for name in args.strategies.split(","):
            for seed in seeds:
                cfg = resolve_config("heart-disease", [], rounds=rounds, seed=seed, **{"strategy.name": name})
                results.setdefault(f"federated {name}", []).append(mean_site_accuracy(run_federated(cfg, db)))
                print(f"{name} seed {seed}: {results[f'federated {name}'][-1]:.4f}", file=sys.stderr)
            write_json("heart_disease.partial", {"results": results})  # survive an interruption
    if args.merge:
        kept = json.loads((RESULTS / "heart_disease.json").read_text())["results"]
        results = {**{k: v["per_seed"] for k, v in kept.items()}, **results}
    else:
        cfg = resolve_config("heart-disease", [], rounds=rounds)
        steps = rounds * cfg.train.local_steps
        splits = {s: task.load_site(s, cfg) for s in task.site_ids(cfg)}
        pooled = torch.utils.data.ConcatDataset([s.train for s in splits.values()])
        for seed in seeds:
            results.setdefault("pooled", []).append(centralised(cfg, pooled, seed, steps))
            for site, split in splits.items():
                results.setdefault(f"local {site}", []).append(centralised(cfg, split.train, seed, steps))
    rows = [[k, statistics.fmean(v), statistics.pstdev(v), len(v)] for k, v in results.items()]
    headers = ["training", "mean per-centre accuracy", "std over seeds", "seeds"]
    table = print_table(headers, rows)
    cfg = resolve_config("heart-disease", [], rounds=rounds)
    path = write_json("heart_disease", {"protocol": {"rounds": rounds, "local_updates": cfg.train.local_steps,
                                                     "batch_size": cfg.train.batch_size, "lr": cfg.train.lr,
                                                     "per_strategy": task.strategy_defaults,
                                                     "seeds": seeds, "engine": "in-process grid (bench/common.py)"},
                                        "load_average": os.getloadavg(),
                                        "results": {k: {"per_seed": v, "mean": statistics.fmean(v), "std": statistics.pstdev(v)}
                                                    for k, v in results.items()},
                                        "table": table})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
