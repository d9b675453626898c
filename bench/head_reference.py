"""Does the text task's head mode reach the frozen-embedding limit? The pooled and the
federated head (medical-abstracts' own head-mode settings: SGD 0.5, batch 128, 30 rounds x
10 local steps; pooled: one model for the 4 x 30 x 10 steps, equal compute) against a
plain logistic regression (scikit-learn, L2, lbfgs) on the same frozen MiniLM embeddings
of the same training abstracts, all scored on the same test abstracts.

Two readings of macro-F1, both printed: over all sites' test abstracts together (the
pooled reference's own setting), and the mean over sites of each site's macro-F1. The
second is lower for every model: ``models.metrics`` averages F1 over all 5 classes, and a
class absent from a site's test split (Dirichlet 0.3 skew) that the model never predicts
there counts as 0 at that site.

    python bench/head_reference.py                      # seeds 42-44, no DP and epsilon 8
Writes bench/results/head_reference.json and prints the table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import privacy  # noqa: E402
from common import machine  # noqa: E402
from privacy import federate  # noqa: E402
from utility import (DEFAULT_CACHE, SIZES, TEXT, all_test_metrics, for_epsilon, make_config,  # noqa: E402
                     pooled, recorded_predictions, summarise_sites)

from fedcare.models.registry import get_task  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "head_reference.json"


def embeddings(cfg) -> dict:
    """Per site: (train X, train y, test X, test y) of the frozen mean-pooled embeddings."""
    task = get_task(TEXT)
    model = task.build_model(cfg).eval()
    out = {}
    for s in task.site_ids(cfg):
        split = task.load_site(s, cfg)
        parts = []
        for ds in (split.train, split.test):
            ids, mask, y = ds.tensors
            with torch.no_grad():
                parts += [model.embed(ids, mask).numpy(), y.numpy()]
        out[s] = parts
    return out


def reference(emb: dict) -> dict:
    """Logistic regression on the pooled training embeddings, scored like the models."""
    from sklearn.linear_model import LogisticRegression

    task = get_task(TEXT)
    x = np.concatenate([e[0] for e in emb.values()])
    y = np.concatenate([e[1] for e in emb.values()])
    lr = LogisticRegression(max_iter=3000).fit(x, y)
    seen, per_site = [], {}
    for s, (_, _, xt, yt) in emb.items():
        scores = lr.predict_proba(xt)
        seen.append((scores, yt))
        per_site[s] = {**task.metrics(scores, yt), "n_test": len(yt)}
    return {"all_test": all_test_metrics(task, seen), "site_mean": summarise_sites(per_site)}


def run(seed: int, eps: float | None) -> dict:
    p = for_epsilon(SIZES["cpu"]["settings"][TEXT], eps)
    task = get_task(TEXT)
    n = len(task.site_ids(make_config(TEXT, p, "head", seed, eps, 1, 1)))
    fed_cfg = make_config(TEXT, p, "head", seed, eps, p["rounds"], p["local_steps"])
    pool_cfg = make_config(TEXT, p, "head", seed, eps, 1, n * p["rounds"] * p["local_steps"])
    row = {"seed": seed, "epsilon": eps}
    with tempfile.TemporaryDirectory() as tmp:
        with recorded_predictions() as seen:
            fed = federate(fed_cfg, Path(tmp), f"head-fed-{seed}")
        row["federated"] = {"all_test": all_test_metrics(task, seen), "site_mean": summarise_sites(fed["per_site"])}
        res = pooled(pool_cfg, Path(tmp), f"head-pooled-{seed}")
        row["pooled"] = {"all_test": res["all_test"], "site_mean": res["all_sites"]}
    if eps is None:
        row["logistic_regression"] = reference(embeddings(fed_cfg))
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    ap.add_argument("--epsilons", nargs="+", default=["none", "8"])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = ap.parse_args(argv)
    if args.cache.is_file():
        import fedcare.models.medical_abstracts as ma

        ma._EMBEDDINGS.update(torch.load(args.cache))
    rows = [run(seed, None if e == "none" else float(e)) for e in args.epsilons for seed in args.seeds]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"machine": machine(), "settings": SIZES["cpu"]["settings"][TEXT], "rows": rows},
                              indent=1))
    print("| model | DP | macro-F1, all test | macro-F1, site mean | accuracy, all test |\n|---|---|---|---|---|")
    for eps in sorted({r["epsilon"] for r in rows}, key=lambda e: e or 0):
        for model in ("logistic_regression", "pooled", "federated"):
            rs = [r[model] for r in rows if r["epsilon"] == eps and model in r]
            if not rs:
                continue
            cell = lambda vals: f"{statistics.median(vals):.3f} [{min(vals):.3f}-{max(vals):.3f}]"  # noqa: E731
            print(f"| {model} | {'no DP' if eps is None else f'eps {eps:g}'} | "
                  f"{cell([r['all_test']['macro_f1'] for r in rs])} | {cell([r['site_mean']['macro_f1'] for r in rs])} | "
                  f"{cell([r['all_test']['accuracy'] for r in rs])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
