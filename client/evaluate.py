"""A hospital checks and uses an exported model on its own data, on its own machine.

``evaluate`` gives the task's metrics, a calibration summary (top-label ECE and its
reliability bins) and metrics per patient group (the fairness module's definitions)
on the held-out part of the site's folder; ``predict_to_file`` writes predictions.
Nothing is sent anywhere. The folder is read by the task's own ``load_site`` with
``data.path`` set, exactly as a SuperNode reads it during training.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from fedcare.errors import DataError
from fedcare.models.base import SiteSplit
from fedcare.models.package import ExportedModel, load_model
from fedcare.models.sitedata import describe, has_description
from fedcare.models.training import pick_device, predict_dataset

BINS = 10
SPLITS = ("all", "train", "test")


def site_split(exported: ExportedModel, data: Path, site: str | None) -> tuple[str, SiteSplit]:
    """(site id, split) of the folder ``data`` for the exported model's task. Without
    ``site`` the folder is one site (no virtual partition, no per-site caps)."""
    data = Path(data).expanduser()
    if not data.exists():
        raise DataError(f"--data {data} does not exist")
    cfg, task = exported.cfg, exported.task
    cfg.data.path = str(data.resolve())
    if site is None:
        if task.fixed_sites is None:
            cfg.sites = 1
        cfg.data.max_train_per_site = cfg.data.max_test_per_site = 0
    if site is None and has_description(data):   # a described folder is its own site, by its dataset_id
        site_id = describe(data).dataset_id
        return site_id, task.load_site(site_id, cfg)
    ids = task.site_ids(cfg)
    site_id = site or ids[0]
    if site_id not in ids:
        raise DataError(f"--site {site_id} is not a site of {task.name} in this run ({', '.join(ids)})")
    return site_id, task.load_site(site_id, cfg)


def evaluate(model_dir: Path, data: Path, site: str | None = None) -> dict:
    from fedcare.models.fairness import aggregate, site_counts

    exported = load_model(model_dir, pick_device())
    site_id, split = site_split(exported, data, site)
    if len(split.test) == 0:
        raise DataError(f"--data {data}: no held-out (test) examples for site {site_id}")
    scores, labels = predict_dataset(exported.task, exported.model, split.test, exported.cfg, pick_device())
    fairness = aggregate({site_id: site_counts(scores, labels, split.groups, 1, site_id)})
    groups = {a: v["by_group"] for a, v in fairness.items() if a not in ("by_site", "excluded_sites")}
    return {"model": {k: exported.meta[k] for k in ("run_id", "round")} | {"task": exported.task.name,
                                                                           "folder": str(Path(model_dir))},
            "data": str(data), "site": site_id, "split": "test", "examples": int(len(labels)),
            "metrics": exported.task.metrics(scores, labels), "calibration": calibration(scores, labels),
            "groups": groups}


def calibration(scores: np.ndarray, labels: np.ndarray, bins: int = BINS) -> dict:
    """Top-label ECE over ``bins`` equal-width confidence bins, with the bins."""
    conf = scores.max(axis=1)
    correct = scores.argmax(axis=1) == labels
    idx = np.clip((conf * bins).astype(int), 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        sel = idx == b
        n = int(sel.sum())
        row = {"lower": b / bins, "upper": (b + 1) / bins, "count": n,
               "confidence": float(conf[sel].mean()) if n else None,
               "accuracy": float(correct[sel].mean()) if n else None}
        if n:
            ece += n / len(labels) * abs(row["accuracy"] - row["confidence"])
        rows.append(row)
    return {"ece": float(ece), "bins": rows}


def predict_to_file(model_dir: Path, data: Path, out: Path, site: str | None = None, split: str = "all") -> int:
    """Predictions of the folder's rows (``split``) into ``out`` (.csv or .parquet):
    row_id (split:position in the task's order), label, predicted_class, prob_<k>."""
    import pandas as pd

    out = Path(out)
    if out.suffix.lower() not in (".csv", ".parquet"):
        raise DataError(f"--out {out} must end in .csv or .parquet")
    if split not in SPLITS:
        raise DataError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    exported = load_model(model_dir, pick_device())
    _, parts = site_split(exported, data, site)
    chosen = [(name, ds) for name, ds in (("train", parts.train), ("test", parts.test)) if split in ("all", name)]
    row_ids = [f"{name}:{i}" for name, ds in chosen for i in range(len(ds))]
    scores, labels = _predict_with_progress(exported, ConcatDataset([ds for _, ds in chosen]))
    frame = pd.DataFrame({"row_id": row_ids, "label": labels, "predicted_class": scores.argmax(axis=1)})
    for k in range(scores.shape[1]):
        frame[f"prob_{k}"] = scores[:, k]
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(out, index=False) if out.suffix.lower() == ".parquet" else frame.to_csv(out, index=False)
    return len(frame)


@torch.no_grad()
def _predict_with_progress(exported: ExportedModel, ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    from rich.console import Console
    from rich.progress import track

    device = pick_device()
    loader = DataLoader(ds, batch_size=exported.cfg.train.eval_batch_size, shuffle=False)
    scores, labels = [], []
    for batch in track(loader, description="predicting", console=Console(stderr=True), total=len(loader)):
        s, y = exported.task.predict(exported.model, tuple(t.to(device) for t in batch))
        scores.append(s)
        labels.append(y)
    if not scores:
        return np.zeros((0, exported.task.num_classes)), np.zeros((0,), dtype=int)
    return np.concatenate(scores), np.concatenate(labels)
