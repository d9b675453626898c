"""Reading hospital-sized site folders: rows or images per second and peak memory.

Folders are generated from the bundled data (heart-disease rows resampled with jitter as
Parquet, abstracts resampled as Parquet, BreastMNIST images as PNG class folders), each
with its dataset.toml. Every measurement runs in a fresh process, so its peak resident
memory (resource.getrusage ru_maxrss) is its own: ``prepare`` (read, check against the
contract, split, standardise: what ``fedcare site check`` and training do first) and one
pass of a DataLoader over the training split (images decoded and resized, texts
tokenised; texts capped at --text-items since tokenising is per batch at training time).

    python bench/site_data.py                      # 10k and 100k rows; 2k and 10k images
    python bench/site_data.py --image-sizes 10000,100000
    python bench/site_data.py --sizes 1000000 --text-sizes "" --image-sizes 100000   # hospital-sized

Rows of sizes not measured in this invocation are kept from the earlier JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "bench")]


def make_tabular(folder: Path, n: int) -> Path:
    from sitefolders import HEART_TOML, write_toml

    from fedcare.models.data import bundled_dir
    from fedcare.models.heart_disease import COLUMNS, DROPPED, read_centre_file

    raw = read_centre_file(bundled_dir("heart-disease") / "processed.cleveland.data")
    cols = [c for c in COLUMNS if c not in DROPPED]
    rng = np.random.default_rng(0)
    df = pd.DataFrame(raw[rng.integers(0, len(raw), n)], columns=cols)
    for c in ("trestbps", "chol", "thalach", "oldpeak"):
        df[c] += rng.normal(0, 0.05 * df[c].std(), n)
    df["patient_id"] = [f"P{i:08d}" for i in range(n)]
    write_toml(folder, HEART_TOML.format(id=f"bench-tabular-{n}"))
    df.to_parquet(folder / "records.parquet")
    return folder


def make_text(folder: Path, n: int) -> Path:
    from sitefolders import abstracts_frame, write_toml

    df = abstracts_frame().sample(n=n, replace=True, random_state=0)[["medical_abstract", "condition"]]
    write_toml(folder, f'dataset_id = "bench-text-{n}"\nfamily = "text"\nformat = "parquet"\n'
                       'files = ["abstracts.parquet"]\n[columns]\ntext = "medical_abstract"\nlabel = "condition"\n')
    df.to_parquet(folder / "abstracts.parquet")
    return folder


def make_images(folder: Path, n: int) -> Path:
    from PIL import Image
    from sitefolders import BREAST_TOML, breast_arrays, write_toml

    images, labels = breast_arrays(min(n, 2 * 140))   # 140 malignant in the train split
    write_toml(folder, BREAST_TOML.format(id=f"bench-image-{n}", fmt="png", extra='layout = "class-folders"'))
    for name in ("malignant", "benign"):
        (folder / name).mkdir(exist_ok=True)
    for i in range(n):
        k = i % len(images)
        Image.fromarray(images[k]).save(folder / ("malignant" if labels[k] == 0 else "benign") / f"{i:07d}.png")
    return folder


CONTRACTS = {"tabular": "heart-disease", "text": "medical-abstracts", "image": "breastmnist"}


def measure(kind: str, folder: str, text_items: int) -> dict:
    """In this (fresh) process: prepare the folder, then one DataLoader pass."""
    import torch
    from torch.utils.data import DataLoader, Subset

    from fedcare.client.check import preset_contract
    from fedcare.models.families import prepare
    from fedcare.models.sitedata import describe

    torch.set_num_threads(1)
    _warm_up(kind)   # imports and the tokenizer load once per process: not part of reading the data
    t0 = time.perf_counter()
    p = prepare(describe(folder), preset_contract(CONTRACTS[kind]))
    t_prepare = time.perf_counter() - t0
    rows = len(p.split.train) + len(p.split.test)
    ds = p.split.train
    if kind == "text":
        ds = Subset(ds, range(min(text_items, len(ds))))
    t0 = time.perf_counter()
    seen = sum(len(b[0]) for b in DataLoader(ds, batch_size=64))
    t_iter = time.perf_counter() - t0
    return {"kind": kind, "rows": rows, "prepare_s": t_prepare, "rows_per_s": rows / t_prepare,
            "iterated": seen, "iter_per_s": seen / t_iter,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _warm_up(kind: str) -> None:
    import pyarrow.csv  # noqa: F401
    import pyarrow.dataset  # noqa: F401
    import sklearn.model_selection  # noqa: F401
    from PIL import Image  # noqa: F401

    if kind == "text":
        from fedcare.models.medical_abstracts import tokenizer

        tokenizer()("warm up")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000", help="table rows (tabular, and text unless --text-sizes)")
    ap.add_argument("--text-sizes", help="text rows (default: --sizes)")
    ap.add_argument("--image-sizes", default="2000,10000", help="images")
    ap.add_argument("--text-items", type=int, default=2000, help="texts tokenised in the DataLoader pass")
    ap.add_argument("--measure", nargs=2, metavar=("KIND", "FOLDER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], args.measure[1], args.text_items)))
        return
    from common import RESULTS, print_table, write_json

    text_sizes = args.sizes if args.text_sizes is None else args.text_sizes
    plan = [("tabular", int(n)) for n in args.sizes.split(",") if n]
    plan += [("text", int(n)) for n in text_sizes.split(",") if n]
    plan += [("image", int(n)) for n in args.image_sizes.split(",")]
    makers = {"tabular": make_tabular, "text": make_text, "image": make_images}
    results = []
    with tempfile.TemporaryDirectory(prefix="fedcare-bench-") as tmp:
        for kind, n in plan:
            folder = makers[kind](Path(tmp) / f"{kind}-{n}", n)
            out = subprocess.run([sys.executable, __file__, "--measure", kind, str(folder),
                                  "--text-items", str(args.text_items)], capture_output=True, text=True, check=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"{kind} {n}: done", file=sys.stderr)
    load = os.getloadavg()
    for r in results:
        r["load_avg_after"] = list(load)
    earlier = RESULTS / "site_data.json"   # rows of sizes not measured now are kept
    if earlier.exists():
        done = {(r["kind"], r["rows"]) for r in results}
        results = [r for r in json.loads(earlier.read_text())["results"] if (r["kind"], r["rows"]) not in done] + results
    results.sort(key=lambda r: (r["kind"], r["rows"]))
    rows = [[r["kind"], r["rows"], r["prepare_s"], round(r["rows_per_s"]), r["iterated"], round(r["iter_per_s"]),
             round(r["peak_rss_mb"])] for r in results]
    print_table(["family", "rows", "prepare s", "rows/s (prepare)", "iterated", "items/s (loader)",
                 "peak RSS MB"], rows)
    write_json("site_data", {"results": results, "uptime_load_avg": load,
                             "note": "2-core machine shared with other jobs: rows/s depend on the load "
                                     "(load_avg_after per row); peak memory does not"})


if __name__ == "__main__":
    main()
