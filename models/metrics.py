"""Metric definitions used everywhere (client evaluation, benchmarks, report)."""
from __future__ import annotations

import numpy as np


def classification_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """accuracy, macro_f1, balanced_accuracy, loss (cross-entropy) and, for two
    classes, auroc. ``scores`` are probabilities [N, C]."""
    from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=np.float64)
    if len(labels) == 0:
        return {}
    pred = scores.argmax(axis=1)
    out = {
        "accuracy": float((pred == labels).mean()),
        "macro_f1": float(f1_score(labels, pred, average="macro", labels=np.arange(scores.shape[1]), zero_division=0)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, pred)),
        "loss": float(-np.log(np.clip(scores[np.arange(len(labels)), labels], 1e-12, 1.0)).mean()),
    }
    if scores.shape[1] == 2 and len(np.unique(labels)) == 2:
        out["auroc"] = float(roc_auc_score(labels, scores[:, 1]))
    return out
