"""Benchmark and sweep: BreastMNIST (EfficientNet-Lite0, ``train.mode`` lora or head)
pooled vs federated vs each site alone, with and without DP-SGD: test AUROC, accuracy and
balanced accuracy.

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

Three commands:

    python bench/breastmnist.py compare [--mode lora] [--rounds 5] [--local-steps 10] [--epsilon 8]
        federated / pooled / alone without DP and at one epsilon, one seed (the ``compare``
        part of the JSON; the LoRA rows of issue 6 were measured with its defaults)
    python bench/breastmnist.py probe [--sizes 64 96 128]
        logistic regression on the frozen features of all training images at each input
        size (why head mode feeds the backbone 96 px; the ``probe`` part)
    python bench/breastmnist.py sweep --lrs 0.01 0.03 --steps 10 20 --batches 32 64 --epsilons none 8
        the head mode's grid (lr x local steps x batch x rounds x clip x epsilon, federated,
        optionally pooled/alone) over seeds; rows appended to the ``sweep`` part

In head mode the frozen backbone's features of every image are computed once per process
(``models/breastmnist.UltrasoundClassifier``), so a sweep point costs seconds.
Writes bench/results/breastmnist.json and prints a table. Scores: ``auroc`` is the
unweighted mean over sites of each site's test AUROC (as ``bench/utility.py`` reports),
``auroc_weighted`` the test-size-weighted mean, ``worst_site_auroc`` the lowest site's,
``auroc_all_test`` the one model's AUROC over every site's test images together (federated
and pooled: the official test split, 156 images; the site splits hold as few as 2 malignant
images, so the per-site AUROCs are coarse). Pooled trains and tests as one site: its
``auroc`` is on the whole test split.

The sweep chose ``bench/utility.py``'s breastmnist settings (head mode, 10 rounds, SGD):
without DP lr 0.03, 20 local steps, batch 32 (federated 0.88 site mean / 0.86 all test,
seeds 42-44; Adam at most 0.82 on all test images, pooled 0.85-0.88: it restarts every round); at epsilon 8 lr 1.0,
5 local steps, batch 256 = a whole site, clip 1 (0.79 / 0.80; batch 64 or 10 steps 0.74-0.78).
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

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import privacy  # noqa: E402
from privacy import dp_sets, federate  # noqa: E402
from utility import recorded_predictions  # noqa: E402

from fedcare.config import RunConfig  # noqa: E402
from fedcare.models.registry import get_task  # noqa: E402

TASK = "breastmnist"
OUT = Path(__file__).resolve().parent / "results" / "breastmnist.json"
METRICS = ("auroc", "accuracy", "balanced_accuracy")


def config(args, sites: int, rounds: int, local_steps: int, epsilon: float | None, seed: int | None = None,
           **over) -> RunConfig:
    flat = {**get_task(TASK).settings("lora"), "task": TASK, "sites": sites, "rounds": rounds,
            "seed": args.seed if seed is None else seed, "train.local_steps": local_steps,
            "data.dirichlet_alpha": args.alpha, "train.mode": args.mode,
            **dp_sets(epsilon, args.delta, over.pop("clip", args.clip), "prv")}
    for key, name in (("train.lr", "lr"), ("train.batch_size", "batch_size"), ("train.optimizer", "optimizer"),
                      ("data.max_train_per_site", "max_train"), ("data.max_test_per_site", "max_test")):
        value = over.get(name, getattr(args, name, None))
        if value is not None:
            flat[key] = value
    return RunConfig.from_flat(flat).validate()


def scores(per_site: dict) -> dict:
    """Unweighted site mean of each metric (``auroc`` etc.), the test-size-weighted AUROC
    (a summary, not a pooled AUROC), and the worst site's AUROC."""
    n = np.array([m["n_test"] for m in per_site.values()], dtype=float)
    out = {k: float(np.mean([m[k] for m in per_site.values()])) for k in METRICS}
    out["auroc_weighted"] = float(np.average([m["auroc"] for m in per_site.values()], weights=n))
    out["worst_site_auroc"] = float(min(m["auroc"] for m in per_site.values()))
    return out


def all_test_auroc(seen: list) -> float | None:
    """AUROC of one model over every site's test split together (federated, pooled: the
    whole official test split); None when the predictions came from several models."""
    if not seen:
        return None
    scores, labels = np.concatenate([s for s, _ in seen]), np.concatenate([y for _, y in seen])
    return get_task(TASK).metrics(scores, labels).get("auroc")


def run_setting(args, setting: str, epsilon: float | None, rounds: int, local_steps: int, seed: int | None = None,
                **over) -> dict:
    steps = rounds * local_steps
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, recorded_predictions() as seen:
        if setting == "federated":
            res = federate(config(args, args.sites, rounds, local_steps, epsilon, seed, **over), Path(tmp), "fed")
        elif setting == "pooled":
            res = federate(config(args, 1, 1, steps * args.sites, epsilon, seed, **over), Path(tmp), "pooled")
        else:  # each site of the federated partition alone, for as many steps as in the federation
            cfg = config(args, args.sites, 1, steps, epsilon, seed, **over)
            res = {"per_site": {}, "privacy": {}}
            for site in get_task(TASK).site_ids(cfg):
                one = federate(cfg, Path(tmp), f"alone-{site}", sites=[site])
                res["per_site"].update(one["per_site"])
                res["privacy"].update(one["privacy"])
            seen.clear()   # one model per site: no single model scored on the whole test split
    eps_spent = [p["epsilon"] for p in res["privacy"].values() if p]
    noise = [p["noise_multiplier"] for p in res["privacy"].values() if p]
    return {"setting": setting, "epsilon": epsilon, **scores(res["per_site"]), "auroc_all_test": all_test_auroc(seen),
            "epsilon_spent_max": max(eps_spent) if eps_spent else None,
            "noise_multiplier_max": max(noise) if noise else None,
            "per_site": res["per_site"], "seconds": time.perf_counter() - t0}


def load_doc(path: Path) -> dict:
    doc = json.loads(path.read_text()) if path.is_file() else {}
    if "rows" in doc and "compare" not in doc:   # the issue-6 layout: one LoRA comparison
        doc = {"compare": {k: doc.pop(k) for k in list(doc)}}
    return doc


def save_doc(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=float))


def table(rows: list[dict]) -> str:
    head = (f"{'setting':<10} | {'DP':>7} | {'AUROC':>6} | {'AUROC w.':>8} | {'accuracy':>8} | {'bal. acc':>8} | "
            f"{'worst-site AUROC':>16} | {'eps spent':>9} | {'s':>5}")
    lines = [head, "-" * len(head)]
    for r in rows:
        dp = "no DP" if r["epsilon"] is None else f"eps {r['epsilon']:g}"
        spent = "-" if r["epsilon_spent_max"] is None else f"{r['epsilon_spent_max']:.2f}"
        lines.append(f"{r['setting']:<10} | {dp:>7} | {r['auroc']:.4f} | {r.get('auroc_weighted', r['auroc']):>8.4f} | "
                     f"{r['accuracy']:>8.4f} | {r['balanced_accuracy']:>8.4f} | {r['worst_site_auroc']:>16.4f} | "
                     f"{spent:>9} | {r['seconds']:>5.0f}")
    return "\n".join(lines)


def compare(args) -> int:
    rows = []
    for epsilon in (None, args.epsilon):
        for setting in ("federated", "pooled", "alone"):
            rows.append(run_setting(args, setting, epsilon, args.rounds, args.local_steps))
            print(f"  {setting} {'no DP' if epsilon is None else f'eps {epsilon:g}'}: "
                  f"AUROC {rows[-1]['auroc']:.4f} ({rows[-1]['seconds']:.0f} s)", flush=True)
    doc = load_doc(args.out)
    part = "compare" if args.mode == "lora" else f"compare_{args.mode}"
    doc[part] = {"task": TASK, "settings": {k: v for k, v in vars(args).items() if k not in ("out", "func")},
                 "load_average": list(os.getloadavg()), "cpus": os.cpu_count(), "rows": rows}
    save_doc(args.out, doc)
    print(table(rows))
    print(f"json: {args.out} ({part})")
    return 0


def sweep(args) -> int:
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t0 = time.perf_counter()
    warm_s = None
    if args.mode == "head":   # every image's features, once (all images: the partition covers them all)
        with tempfile.TemporaryDirectory() as tmp:
            federate(config(args, args.sites, 1, 1, None, args.seeds[0], max_train=0, max_test=0), Path(tmp), "warm")
        warm_s = time.perf_counter() - t0
    if args.mode == "head":
        torch.set_num_threads(1)   # a linear head over cached features: threads only spin
    from fedcare.models import breastmnist as bm

    image_size = bm.HEAD_IMAGE_SIZE if args.mode == "head" else bm.IMAGE_SIZE
    eps_list = [None if e.lower() in ("none", "0") else float(e) for e in args.epsilons]
    grid = itertools.product(args.lrs, args.steps, args.batches, args.rounds_list, args.clips, args.optimizers,
                             eps_list, args.settings)
    for lr, steps, batch, rounds, clip, opt, eps, setting in grid:
        if eps is None and clip != args.clips[0]:
            continue   # the clip only matters under DP
        runs = [run_setting(args, setting, eps, rounds, steps, seed, lr=lr, batch_size=batch, clip=clip,
                            optimizer=opt) for seed in args.seeds]
        row = {"tag": args.tag, "mode": args.mode, "image_size": image_size, "setting": setting, "epsilon": eps, "lr": lr, "local_steps": steps,
               "batch_size": batch, "rounds": rounds, "clip": clip, "optimizer": opt, "alpha": args.alpha,
               "sites": args.sites, "max_train_per_site": args.max_train, "max_test_per_site": args.max_test,
               "delta": args.delta, "seeds": args.seeds,
               **{f"{k}_median": statistics.median(r[k] for r in runs)
                  for k in ("auroc", "auroc_weighted", "accuracy", "balanced_accuracy", "worst_site_auroc")},
               "auroc_all_test_median": (statistics.median(r["auroc_all_test"] for r in runs)
                                         if all(r["auroc_all_test"] is not None for r in runs) else None),
               "auroc_min": min(r["auroc"] for r in runs), "auroc_max": max(r["auroc"] for r in runs),
               "noise_multiplier": runs[0]["noise_multiplier_max"],
               "per_seed": [{k: r[k] for k in ("auroc", "auroc_weighted", "auroc_all_test", "accuracy", "worst_site_auroc",
                                               "epsilon_spent_max", "seconds")} for r in runs],
               "load_average": list(os.getloadavg())}
        doc = load_doc(args.out)   # re-read: several sweeps may share the file
        part = doc.setdefault("sweep", {"rows": []})
        if warm_s is not None:
            part["features_seconds_all_images"] = warm_s
        part["rows"].append(row)
        save_doc(args.out, doc)
        all_test = "" if row["auroc_all_test_median"] is None else f" all-test {row['auroc_all_test_median']:.4f}"
        noise = f" sigma {row['noise_multiplier']:.2f}" if row["noise_multiplier"] else ""
        print(f"{setting:9} {'no DP' if eps is None else f'eps {eps:g}':6} lr={lr:g} R={rounds} S={steps} B={batch} "
              f"clip={clip:g} {opt}: AUROC {row['auroc_median']:.4f} [{row['auroc_min']:.4f}-{row['auroc_max']:.4f}]"
              f"{all_test}{noise}", flush=True)
    return 0


def probe(args) -> int:
    """How good the frozen backbone's features are at each input size: logistic regression
    (scikit-learn, L2, C grid) on the pooled features of all official training images,
    AUROC on all official test images; raw features (what the head sees) and standardised."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from fedcare.models import breastmnist as bm
    from fedcare.models.efficientnet_lite import pretrained_lite0

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    arrays = bm.load_npz(str(bm.npz_path(RunConfig(task=TASK)).resolve()))
    rows = []
    for size in args.sizes:
        model = bm.UltrasoundClassifier(pretrained_lite0(), image_size=size).eval()
        t0 = time.perf_counter()
        feats = {}
        with torch.no_grad():
            for split in ("train", "test"):
                x = torch.tensor(arrays[f"{split}_images"], dtype=torch.float32).unsqueeze(1) / 255.0
                feats[split] = torch.cat([model._features(x[i:i + 64]) for i in range(0, len(x), 64)]).numpy()
        seconds = time.perf_counter() - t0
        mu, sd = feats["train"].mean(0), feats["train"].std(0) + 1e-6
        for c in args.cs:
            row = {"image_size": size, "C": c, "features_seconds": seconds,
                   "feature_norm_mean": float(np.linalg.norm(feats["train"], axis=1).mean())}
            for name, f in (("raw", lambda a: a), ("standardised", lambda a: (a - mu) / sd)):
                clf = LogisticRegression(C=c, max_iter=5000).fit(f(feats["train"]), arrays["train_labels"])
                row[f"auroc_{name}"] = float(roc_auc_score(arrays["test_labels"],
                                                           clf.predict_proba(f(feats["test"]))[:, 1]))
            rows.append(row)
            print(f"{size:4d} px C={c:<6g} AUROC raw {row['auroc_raw']:.4f} standardised "
                  f"{row['auroc_standardised']:.4f} ({seconds:.0f} s features)", flush=True)
    doc = load_doc(args.out)
    doc["probe"] = {"what": probe.__doc__.split("\n\n")[0].replace("\n", " "), "train_images": int(len(arrays["train_labels"])),
                    "test_images": int(len(arrays["test_labels"])), "rows": rows}
    save_doc(args.out, doc)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command")

    def common(q):
        q.add_argument("--mode", choices=["lora", "head", "full"], default="lora")
        q.add_argument("--sites", type=int, default=4)
        q.add_argument("--alpha", type=float, default=1.0)
        q.add_argument("--delta", type=float, default=1e-3)
        q.add_argument("--clip", type=float, default=1.0)
        q.add_argument("--max-train", type=int, default=None, help="data.max_train_per_site (0: all)")
        q.add_argument("--max-test", type=int, default=None, help="data.max_test_per_site (0: all)")
        q.add_argument("--out", type=Path, default=OUT)

    c = sub.add_parser("compare", help="federated / pooled / alone, no DP and one epsilon, one seed")
    common(c)
    c.add_argument("--rounds", type=int, default=5)
    c.add_argument("--local-steps", type=int, default=10)
    c.add_argument("--epsilon", type=float, default=8.0)
    c.add_argument("--seed", type=int, default=42)
    c.add_argument("--lr", type=float, default=None)
    c.add_argument("--batch-size", type=int, default=None)
    c.add_argument("--optimizer", default=None)
    c.set_defaults(func=compare)

    s = sub.add_parser("sweep", help="grid over the training settings, medians over seeds")
    common(s)
    s.set_defaults(func=sweep, mode="head", max_train=0, max_test=0, seed=42)
    s.add_argument("--lrs", type=float, nargs="+", default=[0.01])
    s.add_argument("--steps", type=int, nargs="+", default=[10])
    s.add_argument("--batches", type=int, nargs="+", default=[32])
    s.add_argument("--rounds", dest="rounds_list", type=int, nargs="+", default=[10])
    s.add_argument("--clips", type=float, nargs="+", default=[1.0])
    s.add_argument("--optimizers", nargs="+", default=["adam"], choices=["adam", "adamw", "sgd"])
    s.add_argument("--epsilons", nargs="+", default=["none"], help="DP targets; none = without DP")
    s.add_argument("--settings", nargs="+", default=["federated"], choices=["federated", "pooled", "alone"])
    s.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    s.add_argument("--tag", default="")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("compare", "sweep", "probe", "-h", "--help"):
        argv = ["compare", *argv]   # the issue-6 command line (no sub-command)
    b = sub.add_parser("probe", help="linear probe of the frozen features at several input sizes")
    b.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 128, 160, 224])
    b.add_argument("--cs", type=float, nargs="+", default=[0.001, 0.01, 0.1, 1.0, 10.0])
    b.add_argument("--out", type=Path, default=OUT)
    b.set_defaults(func=probe)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
