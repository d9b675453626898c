"""What the evaluation release mechanism (client/release.py) costs in metric accuracy.

For a logistic model trained on Fed-Heart-Disease (cleveland's training split) and test
sets of 100 and 1,000 patients drawn with replacement from the four centres' test
splits, the exact metrics against the released ones (noisy counts at the default
evaluation_epsilon 1.0 and at 0.5 and 4.0, delta 1e-5), with and without per-group
counts (sex and age band: the noise grows with the number of released layers):
the mean absolute error over repeats. Then 5 classes (as medical-abstracts) with
synthetic scores, since the error depends on the counts, not on the model. Writes
bench/results/evaluation_release.json and prints a table.

    python3 bench/evaluation_release.py [--repeats 200]
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from fedcare.client.release import Rules, noise_multiplier, noised_release, sensitivity
from fedcare.launch import resolve_config
from fedcare.models.metrics import classification_metrics
from fedcare.models.registry import get_task
from fedcare.models.training import predict_dataset

METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc")
DELTA = 1e-5   # a site policy's default delta (or min(1e-5, 1/(10 N)))
OUT = Path(__file__).resolve().parent / "results" / "evaluation_release.json"


def _scores():
    cfg = resolve_config("heart-disease", [], rounds=1, seed=0)
    task = get_task("heart-disease")
    model = task.build_model(cfg)
    train = task.load_site("cleveland", cfg).train
    x, y = train.tensors
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(-1), y).backward()
        opt.step()
    parts = [task.load_site(s, cfg) for s in task.site_ids(cfg)]
    scores, labels, groups = [], [], {"sex": [], "age_band": []}
    for p in parts:
        s, l = predict_dataset(task, model, p.test, cfg, torch.device("cpu"))
        scores.append(s)
        labels.append(l)
        for a in groups:
            groups[a].append(p.groups[a])
    return np.concatenate(scores), np.concatenate(labels), {a: np.concatenate(v) for a, v in groups.items()}


def _rules(eps: float, groups: bool) -> Rules:
    return Rules(release="noised", epsilon=eps, max_epsilon_per_run=0, max_evaluations=0, min_cell_size=10,
                 only_known_models=False, send_group_counts=groups, min_group_size=10, delta=DELTA,
                 epsilon_cap=0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    t0 = time.time()
    scores, labels, groups = _scores()
    rng = np.random.default_rng(0)
    rows = []
    for n in (100, 1000):
        for eps in (0.5, 1.0, 4.0):
            for with_groups in (False, True):
                rules = _rules(eps, with_groups)
                z = noise_multiplier(eps, DELTA)
                errors = {m: [] for m in METRICS}
                for _ in range(args.repeats):
                    idx = rng.integers(0, len(labels), n)
                    s, l, g = scores[idx], labels[idx], {a: v[idx] for a, v in groups.items()}
                    exact = classification_metrics(s, l)
                    released, _ = noised_release(s, l, g, rules, z, "bench", rng)
                    for m in METRICS:
                        if m in exact:
                            errors[m].append(abs(released.get(m, 0.5 if m == "auroc" else 0.0) - exact[m]))
                sigma = z * sensitivity(2, 2 if with_groups else 0)
                rows.append({"test_patients": n, "epsilon": eps, "group_counts": with_groups,
                             "noise_multiplier": z, "sigma": sigma,
                             **{f"mae_{m}": float(np.mean(v)) for m, v in errors.items()}})
    multiclass = []   # 5 classes (as medical-abstracts), synthetic scores: the error depends on the counts
    for n in (100, 1000):
        errors = {m: [] for m in METRICS[:3]}
        z = noise_multiplier(1.0, DELTA)
        for _ in range(args.repeats):
            y = rng.integers(0, 5, n)
            s = rng.dirichlet(np.ones(5), size=n)
            s[np.arange(n), y] += 0.3
            s /= s.sum(axis=1, keepdims=True)
            exact = classification_metrics(s, y)
            released, _ = noised_release(s, y, {}, _rules(1.0, False), z, "bench", rng)
            for m in errors:
                errors[m].append(abs(released.get(m, 0.0) - exact[m]))
        multiclass.append({"test_patients": n, "classes": 5, "epsilon": 1.0, "group_counts": False,
                           "sigma": z * sensitivity(5, 0), **{f"mae_{m}": float(np.mean(v)) for m, v in errors.items()}})
    result = {"bench": "evaluation_release", "delta": DELTA, "repeats": args.repeats, "multiclass_synthetic": multiclass,
              "exact_on_all_test_patients": classification_metrics(scores, labels),
              "rows": rows, "machine": platform.platform(), "seconds": time.time() - t0}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"| test patients | epsilon | group counts | sigma | " + " | ".join(f"MAE {m}" for m in METRICS) + " |")
    print("|---|---|---|---|" + "---|" * len(METRICS))
    for r in rows:
        print(f"| {r['test_patients']} | {r['epsilon']} | {'yes' if r['group_counts'] else 'no'} | {r['sigma']:.1f} | "
              + " | ".join(f"{r['mae_' + m]:.3f}" for m in METRICS) + " |")
    for r in multiclass:
        print(f"| {r['test_patients']} (5 classes, synthetic) | 1.0 | no | {r['sigma']:.1f} | "
              + " | ".join(f"{r['mae_' + m]:.3f}" for m in METRICS[:3]) + " | - |")
    print(f"(exact on all {len(labels)} test patients: "
          + ", ".join(f"{k} {v:.3f}" for k, v in result["exact_on_all_test_patients"].items()) + f"; {time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
