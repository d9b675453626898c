"""Fairness across patient groups and hospitals, from counts only.

Two halves, and the metric definitions live here once:

* ``site_counts`` runs **at the site** on its test split. For every sensitive attribute
  and group it returns confusion counts and fixed-bin score histograms; raw attributes
  and per-patient predictions never appear in its output. Groups with fewer than
  ``min_group_size`` examples are reported as ``{"suppressed": true}`` with no counts.
* ``aggregate`` runs **at the server**: it sums the sites' counts exactly and turns
  them into metrics (the report's ``fairness`` object). Counts a site released with
  noise (``client/release.py``) carry a ``release`` field; their histograms need not
  add up to ``n``.

Definitions (those of fairlearn, whose ``MetricFrame`` the tests compare against):

* prediction = argmax of the class probabilities (as ``models.metrics``);
* binary tasks: positive class 1; ``tpr``/``fpr``/``selection_rate`` as usual;
* multi-class tasks: one-vs-rest counts per class; a group's ``tpr``, ``fpr``,
  ``selection_rate``, ``auroc`` and ``ece`` are the macro average over classes whose
  rate is defined (fairlearn has no multi-class parity metrics; this is our choice);
* ``accuracy`` = correct / n (exact for any number of classes);
* ``auroc`` from the per-label histograms of the class score, scores in one bin
  counted as ties (exact AUROC lies within half the tied-pair mass of it);
* ``ece``: expected calibration error of the class score (binary: P(y=1), as a
  reliability diagram) over ``bins`` equal-width bins, the mean score of a bin taken
  as its centre (so within half a bin width of the exact binned ECE);
* ``demographic_parity_difference`` = max - min over groups of ``selection_rate``;
  ``equalized_odds_difference`` = max(tpr difference, fpr difference) (fairlearn's
  ``between_groups`` / ``worst_case``); ``worst_group`` has the lowest accuracy.

Complementary suppression: if the suppressed groups of an attribute together hold
fewer than ``min_group_size`` examples (so they could be recovered by subtracting the
published groups from the site's total), the smallest published group is suppressed
too, until they do or every group is suppressed.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np

from .benefit import wilson

COUNT_KEYS = ("tp", "fp", "tn", "fn")
CLASS_ATTRIBUTE = "class"
SUPPRESSED = {"suppressed": True}
VERSION = 1


# ------------------------------------------------------------------ site side
def site_counts(scores: np.ndarray, labels: np.ndarray, groups: dict[str, np.ndarray],
                min_group_size: int, site_id: str, bins: int = 10) -> dict:
    """Per-attribute, per-group counts of one site's test predictions (JSON-able).

    ``scores``: class probabilities [N, C] (or [N] positive-class scores);
    ``groups``: attribute -> group label per example. With no attributes, the
    attribute ``"class"`` (groups = true labels) is derived so every task has one.
    """
    probs = _as_probabilities(scores)
    labels = np.asarray(labels).astype(int).reshape(-1)
    if len(labels) != len(probs):
        raise ValueError(f"{len(probs)} scores but {len(labels)} labels")
    if bins < 2:
        raise ValueError("bins must be at least 2")
    if not groups:
        groups = {CLASS_ATTRIBUTE: np.array([f"class {k}" for k in labels])}
    attributes: dict[str, dict[str, Any]] = {}
    for attribute, values in groups.items():
        values = np.asarray(values).astype(str).reshape(-1)
        if len(values) != len(labels):
            raise ValueError(f"attribute {attribute!r} has {len(values)} values for {len(labels)} examples")
        names, sizes = np.unique(values, return_counts=True)
        hidden = suppressed_groups(dict(zip(names.tolist(), sizes.tolist())), min_group_size)
        attributes[str(attribute)] = {
            name: dict(SUPPRESSED) if name in hidden else _cell(probs[values == name], labels[values == name], bins)
            for name in names.tolist()
        }
    return {"version": VERSION, "site": site_id, "num_classes": probs.shape[1], "bins": bins,
            "min_group_size": min_group_size, "overall": _cell(probs, labels, bins),
            "attributes": attributes}


def _as_probabilities(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim == 1:
        scores = np.stack([1.0 - scores, scores], axis=1)
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must be [N, C>=2] probabilities or [N] positive scores, got {scores.shape}")
    return scores


def suppressed_groups(sizes: dict[str, int], min_group_size: int) -> set[str]:
    hidden = {g for g, n in sizes.items() if n < min_group_size}
    while hidden and len(hidden) < len(sizes) and sum(sizes[g] for g in hidden) < min_group_size:
        hidden.add(min((g for g in sizes if g not in hidden), key=lambda g: (sizes[g], g)))
    return hidden


def _scored_classes(num_classes: int) -> list[int]:
    """Classes with their own one-vs-rest counts: class 1 when binary, else all."""
    return [1] if num_classes == 2 else list(range(num_classes))


def _cell(probs: np.ndarray, labels: np.ndarray, bins: int) -> dict:
    pred = probs.argmax(axis=1)
    edges_idx = lambda s: np.clip((s * bins).astype(int), 0, bins - 1)  # noqa: E731
    per_class = []
    for k in _scored_classes(probs.shape[1]):
        is_true, is_pred = labels == k, pred == k
        idx = edges_idx(probs[:, k])
        per_class.append({
            "class": k,
            "tp": int((is_true & is_pred).sum()), "fp": int((~is_true & is_pred).sum()),
            "tn": int((~is_true & ~is_pred).sum()), "fn": int((is_true & ~is_pred).sum()),
            "hist_pos": np.bincount(idx[is_true], minlength=bins).tolist(),
            "hist_neg": np.bincount(idx[~is_true], minlength=bins).tolist(),
        })
    return {"n": int(len(labels)), "correct": int((pred == labels).sum()), "classes": per_class}


# ---------------------------------------------------------------- server side
def aggregate(counts_by_site: dict[str, dict]) -> dict:
    """The report's ``fairness`` object from the sites' ``site_counts`` outputs.

    ``{attribute: {"by_group": {group: {accuracy, tpr, fpr, selection_rate, auroc, ece,
    n, suppressed_at}}, "demographic_parity_difference", "equalized_odds_difference",
    "worst_group_accuracy", "worst_group"}, "by_site": {"sites": {site: metrics},
    "metric": "accuracy", "worst_site", "best_site", "gap", "spread"}}``.
    Sites whose counts are malformed or inconsistent are left out and listed under
    ``"excluded_sites"`` with the reason. Undefined rates are ``None``.
    """
    excluded = {s: p for s, c in counts_by_site.items() if (p := _check_counts(c))}
    shapes = {s: (c["num_classes"], c["bins"]) for s, c in counts_by_site.items() if s not in excluded}
    if shapes:  # the shape most sites report wins; the others cannot be summed with it
        shape = Counter(shapes.values()).most_common(1)[0][0]
        for site, this in shapes.items():
            if this != shape:
                excluded[site] = f"num_classes/bins {this} differ from the other sites' {shape}"
    valid = {s: counts_by_site[s] for s in sorted(shapes) if s not in excluded}
    out: dict[str, Any] = {}
    attributes = sorted({a for c in valid.values() for a in c["attributes"]})
    for attribute in attributes:
        out[attribute] = _attribute_summary(attribute, valid)
    _add_train_side(out, valid)
    out["by_site"] = _site_summary({s: c["overall"] for s, c in valid.items()})
    if excluded:
        out["excluded_sites"] = excluded
    return out


def _add_train_side(out: dict, sites: dict[str, dict]) -> None:
    """FairTune's generalisation gap: where sites sent counts on their training split
    (``"train"``, a ``site_counts`` output), each published group's ``train_accuracy``
    (with ``train_n`` and its Wilson interval) and ``generalisation_gap`` = train - held-out
    accuracy. A group suppressed on either side gets neither."""
    train = {s: c["train"] for s, c in sites.items()
             if isinstance(c.get("train"), dict) and _check_counts(c["train"]) is None}
    if not train:
        return
    for attribute, summary in out.items():
        if attribute == "by_site":
            continue
        sums = _attribute_summary(attribute, train)["by_group"]
        for group, m in summary["by_group"].items():
            t = sums.get(group, {})
            if m.get("suppressed") or t.get("suppressed") or t.get("accuracy") is None or m.get("accuracy") is None:
                continue
            m.update(train_accuracy=t["accuracy"], train_n=t["n"], train_accuracy_lo=t["accuracy_lo"],
                     train_accuracy_hi=t["accuracy_hi"], generalisation_gap=t["accuracy"] - m["accuracy"])


def cell_metrics(cell: dict) -> dict:
    """accuracy, tpr, fpr, selection_rate, auroc, ece and n of one (summed) cell."""
    n = cell["n"]
    rates = {"tpr": [], "fpr": [], "selection_rate": [], "auroc": [], "ece": []}
    for c in cell["classes"]:
        pos, neg = c["tp"] + c["fn"], c["fp"] + c["tn"]
        rates["tpr"].append(c["tp"] / pos if pos else None)
        rates["fpr"].append(c["fp"] / neg if neg else None)
        rates["selection_rate"].append((c["tp"] + c["fp"]) / n if n else None)
        rates["auroc"].append(histogram_auroc(c["hist_pos"], c["hist_neg"]))
        rates["ece"].append(histogram_ece(c["hist_pos"], c["hist_neg"]))
    out = {"n": n, "accuracy": cell["correct"] / n if n else None}
    out.update({k: _mean(v) for k, v in rates.items()})
    out.update(rate_intervals(cell))
    return out


def rate_intervals(cell: dict) -> dict:
    """``<rate>_lo``/``<rate>_hi``: 95% Wilson intervals from the cell's counts, for
    accuracy and (two classes: one scored class) tpr, fpr and selection_rate; a
    macro-averaged multi-class rate has none."""
    n = cell["n"]
    counts = {"accuracy": (cell["correct"], n)}
    if len(cell["classes"]) == 1:
        c = cell["classes"][0]
        counts.update(tpr=(c["tp"], c["tp"] + c["fn"]), fpr=(c["fp"], c["fp"] + c["tn"]),
                      selection_rate=(c["tp"] + c["fp"], n))
    out = {}
    for rate, (k, total) in counts.items():
        interval = wilson(k, total) if total and k <= total else None
        out[f"{rate}_lo"], out[f"{rate}_hi"] = interval or (None, None)
    return out


def histogram_auroc(hist_pos: list[int], hist_neg: list[int]) -> float | None:
    """P(score of a positive > score of a negative), pairs in one bin as ties."""
    pos, neg = np.asarray(hist_pos, dtype=np.float64), np.asarray(hist_neg, dtype=np.float64)
    if pos.sum() == 0 or neg.sum() == 0:
        return None
    neg_below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
    return float(((pos * neg_below).sum() + 0.5 * (pos * neg).sum()) / (pos.sum() * neg.sum()))


def histogram_ece(hist_pos: list[int], hist_neg: list[int]) -> float | None:
    """sum_b n_b/N * |fraction positive in b - centre of b|."""
    pos, neg = np.asarray(hist_pos, dtype=np.float64), np.asarray(hist_neg, dtype=np.float64)
    n_bin = pos + neg
    total = n_bin.sum()
    if total == 0:
        return None
    centres = (np.arange(len(pos)) + 0.5) / len(pos)
    filled = n_bin > 0
    return float((np.abs(pos[filled] - n_bin[filled] * centres[filled])).sum() / total)


def _attribute_summary(attribute: str, sites: dict[str, dict]) -> dict:
    summed: dict[str, dict] = {}
    suppressed_at: dict[str, list[str]] = {}
    for site, counts in sites.items():
        for group, cell in counts["attributes"].get(attribute, {}).items():
            if cell.get("suppressed"):
                suppressed_at.setdefault(group, []).append(site)
            else:
                summed[group] = _add_cells(summed[group], cell) if group in summed else _copy_cell(cell)
    by_group: dict[str, dict] = {}
    for group in sorted(set(summed) | set(suppressed_at)):
        entry = cell_metrics(summed[group]) if group in summed else {"suppressed": True}
        entry["suppressed_at"] = sorted(suppressed_at.get(group, []))
        by_group[group] = entry
    reported = {g: m for g, m in by_group.items() if not m.get("suppressed")}
    dpd = _difference([m["selection_rate"] for m in reported.values()])
    tpr_d = _difference([m["tpr"] for m in reported.values()])
    fpr_d = _difference([m["fpr"] for m in reported.values()])
    eod = None if tpr_d is None and fpr_d is None else max(x for x in (tpr_d, fpr_d) if x is not None)
    worst = _argmin({g: m["accuracy"] for g, m in reported.items()})
    return {"by_group": by_group, "demographic_parity_difference": dpd,
            "equalized_odds_difference": eod,
            "worst_group": worst, "worst_group_accuracy": reported[worst]["accuracy"] if worst else None}


def _site_summary(overall_by_site: dict[str, dict]) -> dict:
    sites = {s: cell_metrics(c) for s, c in overall_by_site.items()}
    acc = {s: m["accuracy"] for s, m in sites.items() if m["accuracy"] is not None}
    worst, best = _argmin(acc), (max(acc, key=lambda s: (acc[s], s)) if acc else None)
    return {"sites": sites, "metric": "accuracy", "worst_site": worst, "best_site": best,
            "gap": acc[best] - acc[worst] if acc else None,
            "spread": float(np.std(list(acc.values()))) if acc else None}


def _check_counts(counts: Any) -> str | None:
    """Why these site counts cannot be summed, or None when they can."""
    try:
        k, bins = counts["num_classes"], counts["bins"]
        if not (isinstance(k, int) and k >= 2 and isinstance(bins, int) and bins >= 2):
            return "num_classes and bins must be integers >= 2"
        expected = _scored_classes(k)
        cells = [counts["overall"]] + [c for groups in counts["attributes"].values()
                                       for c in groups.values() if not c.get("suppressed")]
        for cell in cells:
            if not _count(cell["n"]) or not _count(cell["correct"]) or cell["correct"] > cell["n"]:
                return "n/correct must be counts with correct <= n"
            if [c["class"] for c in cell["classes"]] != expected:
                return f"expected one-vs-rest counts for classes {expected}"
            for c in cell["classes"]:
                hist = c["hist_pos"] + c["hist_neg"]
                if len(c["hist_pos"]) != bins or len(c["hist_neg"]) != bins or not all(map(_count, hist)):
                    return f"histograms must be {bins} counts per label"
                if not all(_count(c[key]) for key in COUNT_KEYS) or sum(c[key] for key in COUNT_KEYS) != cell["n"]:
                    return "tp+fp+tn+fn must equal n"
                if sum(hist) != cell["n"] and "release" not in counts:   # noisy histograms need not
                    return "histogram counts must add up to n"
    except (KeyError, TypeError, AttributeError) as exc:
        return f"malformed fairness counts ({type(exc).__name__}: {exc})"
    return None


def _count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _copy_cell(cell: dict) -> dict:
    return {"n": cell["n"], "correct": cell["correct"],
            "classes": [{**c, "hist_pos": list(c["hist_pos"]), "hist_neg": list(c["hist_neg"])}
                        for c in cell["classes"]]}


def _add_cells(a: dict, b: dict) -> dict:
    classes = []
    for ca, cb in zip(a["classes"], b["classes"]):
        merged = {"class": ca["class"], **{k: ca[k] + cb[k] for k in COUNT_KEYS}}
        merged["hist_pos"] = [x + y for x, y in zip(ca["hist_pos"], cb["hist_pos"])]
        merged["hist_neg"] = [x + y for x, y in zip(ca["hist_neg"], cb["hist_neg"])]
        classes.append(merged)
    return {"n": a["n"] + b["n"], "correct": a["correct"] + b["correct"], "classes": classes}


def _mean(values: list[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(sum(defined) / len(defined)) if defined else None


def _difference(values: list[float | None]) -> float | None:
    defined = [v for v in values if v is not None and not math.isnan(v)]
    return float(max(defined) - min(defined)) if len(defined) >= 2 else (0.0 if defined else None)


def _argmin(values: dict[str, float | None]) -> str | None:
    defined = {k: v for k, v in values.items() if v is not None}
    return min(defined, key=lambda k: (defined[k], k)) if defined else None
