"""Intervals for the benefit of joining and for per-group rates, defined once.

* ``bootstrap_metrics`` (at the site): the task's point metrics of one model on the
  site's test split, and for accuracy, balanced accuracy, macro-F1 and (two classes)
  AUROC a percentile bootstrap interval over resamples of the test examples. The
  resampled metrics use the definitions of ``models.metrics`` (macro-F1 over every class,
  a class with no example and no prediction scoring 0; balanced accuracy over the classes
  present; AUROC with ties counted half), computed from weighted counts so that a few
  hundred resamples cost milliseconds.
* ``wilson`` (anywhere): the Wilson score interval of a proportion from its counts,
  which the fairness numbers use for every per-group rate.
"""
from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from .metrics import classification_metrics

CI_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc")
LEVEL = 0.95


def bootstrap_metrics(scores: np.ndarray, labels: np.ndarray, resamples: int, seed: int,
                      level: float = LEVEL) -> dict[str, float]:
    """Point metrics (``classification_metrics``) with ``<metric>_lo``/``<metric>_hi``
    (percentile bootstrap, ``resamples`` draws; none when 0) and ``n``."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(int)
    out = dict(classification_metrics(scores, labels))
    out["n"] = float(len(labels))
    if resamples <= 0 or len(labels) < 2:
        return out
    rng = np.random.default_rng(seed)
    n, c = len(labels), scores.shape[1]
    idx = rng.integers(0, n, size=(resamples, n))
    weights = np.bincount((idx + np.arange(resamples)[:, None] * n).ravel(),
                          minlength=resamples * n).reshape(resamples, n).astype(np.float64)
    draws = _weighted_metrics(weights, scores, labels, c)
    alpha = (1 - level) / 2
    for name, values in draws.items():
        if name in out and np.isfinite(values).any():
            lo, hi = np.nanquantile(values, [alpha, 1 - alpha])
            out[f"{name}_lo"], out[f"{name}_hi"] = float(lo), float(hi)
    return out


def _weighted_metrics(w: np.ndarray, scores: np.ndarray, labels: np.ndarray, c: int) -> dict[str, np.ndarray]:
    """Each metric for every row of example weights ``w`` [B, N]."""
    pred = scores.argmax(axis=1)
    cells = np.zeros((len(labels), c * c))
    cells[np.arange(len(labels)), labels * c + pred] = 1.0
    cm = (w @ cells).reshape(-1, c, c)                       # [B, true, predicted]
    total = cm.sum(axis=(1, 2))
    tp = np.diagonal(cm, axis1=1, axis2=2)
    support, predicted = cm.sum(axis=2), cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, tp / support, np.nan)
        f1_den = support + predicted
        f1 = np.where(f1_den > 0, 2 * tp / f1_den, 0.0)
        out = {"accuracy": tp.sum(axis=1) / total, "balanced_accuracy": np.nanmean(recall, axis=1),
               "macro_f1": f1.mean(axis=1)}
    if c == 2:
        out["auroc"] = _weighted_auroc(w, scores[:, 1], labels)
    return out


def _weighted_auroc(w: np.ndarray, score: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """P(a positive scores above a negative), ties half, for every weight row."""
    values, group = np.unique(score, return_inverse=True)
    onehot = np.zeros((len(score), len(values)))
    onehot[np.arange(len(score)), group] = 1.0
    pos = w @ (onehot * (labels == 1)[:, None])               # [B, G] positive weight per distinct score
    neg = w @ (onehot * (labels != 1)[:, None])
    below = np.cumsum(neg, axis=1) - neg
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((pos * (below + 0.5 * neg)).sum(axis=1) / (pos.sum(axis=1) * neg.sum(axis=1)))


def wilson(successes: float, n: float, level: float = LEVEL) -> tuple[float, float] | None:
    """The Wilson score interval (lo, hi) of ``successes`` / ``n``; None when n is 0."""
    if not n:
        return None
    z = _z(level)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _z(level: float) -> float:
    return NormalDist().inv_cdf(0.5 + level / 2)
