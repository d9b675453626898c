"""Fairness counts at the sites, metrics at the server: checked against fairlearn's
MetricFrame on the pooled predictions of a model trained on the real heart-disease data."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from fairlearn.metrics import (MetricFrame, demographic_parity_difference, equalized_odds_difference,
                               false_positive_rate, selection_rate, true_positive_rate)
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, recall_score, roc_auc_score

from fedcare.config import RunConfig
from fedcare.models.fairness import aggregate, histogram_auroc, site_counts
from fedcare.models.registry import get_task

BINS = 10


@pytest.fixture(scope="module")
def heart_predictions():
    """site -> (probabilities [N, 2], labels, groups) on each real hospital's test split,
    from a logistic regression trained on the pooled train splits."""
    task, cfg = get_task("heart-disease"), RunConfig()
    splits = {s: task.load_site(s, cfg) for s in task.site_ids(cfg)}
    xs = np.concatenate([split.train.tensors[0].numpy() for split in splits.values()])
    ys = np.concatenate([split.train.tensors[1].numpy() for split in splits.values()])
    model = LogisticRegression(max_iter=1000).fit(xs, ys)
    out = {}
    for site, split in splits.items():
        x, y = (t.numpy() for t in split.test.tensors)
        out[site] = (model.predict_proba(x), y.astype(int), split.groups)
    return out


def pooled(preds, attribute, skip=lambda site, group: False):
    probs, labels, groups = [], [], []
    for site, (p, y, g) in preds.items():
        keep = np.array([not skip(site, v) for v in g[attribute]], dtype=bool)
        probs.append(p[keep]), labels.append(y[keep]), groups.append(g[attribute][keep])
    return np.concatenate(probs), np.concatenate(labels), np.concatenate(groups)


def exact_binned_ece(p: np.ndarray, y: np.ndarray, bins: int = BINS) -> float:
    idx = np.clip((p * bins).astype(int), 0, bins - 1)
    return sum(abs(y[idx == b].sum() - p[idx == b].sum()) for b in range(bins)) / len(y)


@pytest.mark.parametrize("attribute", ["sex", "age_band"])
def test_metrics_equal_fairlearn_on_pooled_predictions(heart_predictions, attribute):
    counts = {s: site_counts(p, y, g, min_group_size=1, site_id=s) for s, (p, y, g) in heart_predictions.items()}
    report = json.loads(json.dumps(aggregate(counts)))  # what the store keeps
    probs, y, g = pooled(heart_predictions, attribute)
    pred = probs.argmax(axis=1)
    frame = MetricFrame(metrics={"accuracy": accuracy_score, "tpr": true_positive_rate,
                                 "fpr": false_positive_rate, "selection_rate": selection_rate},
                        y_true=y, y_pred=pred, sensitive_features=g)
    ours = report[attribute]
    assert set(ours["by_group"]) == set(frame.by_group.index)
    for group, row in frame.by_group.iterrows():
        mine = ours["by_group"][group]
        assert mine["n"] == int((g == group).sum())
        for metric in ("accuracy", "tpr", "fpr", "selection_rate"):
            assert mine[metric] == pytest.approx(row[metric], abs=1e-12), (group, metric)
        # AUROC: exact value within half the mass of pairs tied in one histogram bin
        in_group = g == group
        s, yy = probs[in_group, 1], y[in_group]
        hp = np.bincount(np.clip((s[yy == 1] * BINS).astype(int), 0, BINS - 1), minlength=BINS)
        hn = np.bincount(np.clip((s[yy == 0] * BINS).astype(int), 0, BINS - 1), minlength=BINS)
        tie_mass = (hp * hn).sum() / (hp.sum() * hn.sum())
        assert abs(mine["auroc"] - roc_auc_score(yy, s)) <= 0.5 * tie_mass + 1e-12
        assert mine["auroc"] == pytest.approx(histogram_auroc(hp.tolist(), hn.tolist()))
        # ECE: bin means taken as bin centres, so within half a bin width
        assert abs(mine["ece"] - exact_binned_ece(s, yy)) <= 0.5 / BINS + 1e-12
    assert ours["demographic_parity_difference"] == pytest.approx(
        demographic_parity_difference(y, pred, sensitive_features=g), abs=1e-12)
    assert ours["equalized_odds_difference"] == pytest.approx(
        equalized_odds_difference(y, pred, sensitive_features=g), abs=1e-12)
    accuracies = frame.by_group["accuracy"]
    assert ours["worst_group"] == accuracies.idxmin()
    assert ours["worst_group_accuracy"] == pytest.approx(accuracies.min(), abs=1e-12)


def test_by_site_worst_gap_and_spread(heart_predictions):
    counts = {s: site_counts(p, y, g, min_group_size=5, site_id=s) for s, (p, y, g) in heart_predictions.items()}
    by_site = aggregate(counts)["by_site"]
    acc = {s: accuracy_score(y, p.argmax(axis=1)) for s, (p, y, _) in heart_predictions.items()}
    for site, value in acc.items():
        assert by_site["sites"][site]["accuracy"] == pytest.approx(value, abs=1e-12)
        assert by_site["sites"][site]["n"] == len(heart_predictions[site][1])
    assert by_site["worst_site"] == min(acc, key=acc.get)
    assert by_site["best_site"] == max(acc, key=acc.get)
    assert by_site["gap"] == pytest.approx(max(acc.values()) - min(acc.values()))
    assert by_site["spread"] == pytest.approx(np.std(list(acc.values())))


def test_group_suppressed_at_one_site_contributes_nothing_from_it(heart_predictions):
    # the hospital with the fewest women in its test split: suppressed there, reported elsewhere
    women = {s: int((g["sex"] == "female").sum()) for s, (_, _, g) in heart_predictions.items()}
    women = {s: n for s, n in women.items() if n > 0}   # a site without women lists no such group
    threshold = min(women.values()) + 1
    assert sum(n < threshold for n in women.values()) == 1
    small_site = min(women, key=women.get)
    counts = {s: site_counts(p, y, g, min_group_size=threshold, site_id=s)
              for s, (p, y, g) in heart_predictions.items()}
    assert counts[small_site]["attributes"]["sex"]["female"] == {"suppressed": True}
    report = aggregate(counts)["sex"]
    assert report["by_group"]["female"]["suppressed_at"] == [small_site]
    # complementary suppression hides the men too at that site (site total - women = men)
    assert report["by_group"]["male"]["suppressed_at"] == [small_site]
    probs, y, g = pooled(heart_predictions, "sex", skip=lambda site, group: site == small_site)
    pred = probs.argmax(axis=1)
    women_mask = g == "female"
    assert report["by_group"]["female"]["n"] == int(women_mask.sum())
    assert report["by_group"]["female"]["tpr"] == pytest.approx(true_positive_rate(y[women_mask], pred[women_mask]))
    assert report["equalized_odds_difference"] == pytest.approx(equalized_odds_difference(y, pred, sensitive_features=g))


def test_suppressed_groups_never_reveal_counts():
    rng = np.random.default_rng(0)
    n = 40
    labels = rng.integers(0, 2, n)
    probs = np.clip(labels * 0.6 + rng.normal(0.2, 0.2, n), 0, 1)
    # "rare" has 3 members, "middle" 6, "common" the rest; threshold 5
    attr = np.array(["rare"] * 3 + ["middle"] * 6 + ["common"] * (n - 9))
    counts = site_counts(probs, labels, {"origin": attr}, min_group_size=5, site_id="a")
    text = json.dumps(counts)
    cells = counts["attributes"]["origin"]
    assert cells["rare"] == {"suppressed": True}
    # rare alone (3 < 5) could be recovered from the total: middle is suppressed as well
    assert cells["middle"] == {"suppressed": True}
    assert cells["common"]["n"] == n - 9
    assert re.search(r'"rare": \{"suppressed": true\}', text)
    assert re.search(r'"middle": \{"suppressed": true\}', text)
    # no raw attribute values per patient and no per-patient scores in the output
    assert text.count("rare") == 1 and text.count("middle") == 1
    for p in probs:
        assert repr(float(p)) not in text
    # every group suppressed when the whole site is below the threshold
    few = [0, 3, 20, 21]                                  # rare, middle, common, common
    tiny = site_counts(probs[few], labels[few], {"origin": attr[few]}, min_group_size=5, site_id="b")
    assert set(tiny["attributes"]["origin"]) == {"rare", "middle", "common"}
    assert all(cell == {"suppressed": True} for cell in tiny["attributes"]["origin"].values())
    merged = aggregate({"a": counts, "b": tiny})["origin"]["by_group"]
    assert merged["rare"] == {"suppressed": True, "suppressed_at": ["a", "b"]}
    assert merged["common"]["n"] == n - 9 and merged["common"]["suppressed_at"] == ["b"]


def test_multiclass_one_vs_rest_macro_and_class_attribute():
    rng = np.random.default_rng(1)
    k, n = 5, 300
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 2.0 * np.eye(k)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    site = np.array(["s0", "s1", "s2"])[rng.integers(0, 3, n)]
    counts = {s: site_counts(probs[site == s], labels[site == s], {}, min_group_size=1, site_id=s)
              for s in ("s0", "s1", "s2")}
    report = aggregate(counts)
    assert set(report) == {"class", "by_site"}          # no demographics: per-class view
    pred = probs.argmax(axis=1)
    frame = MetricFrame(metrics={"accuracy": accuracy_score,
                                 "macro_tpr": lambda t, p: recall_score(t, p, labels=list(range(k)), average="macro",
                                                                        zero_division=0)},
                        y_true=labels, y_pred=pred, sensitive_features=site)
    for s, row in frame.by_group.iterrows():
        mine = report["by_site"]["sites"][s]
        assert mine["accuracy"] == pytest.approx(row["accuracy"], abs=1e-12)
        assert mine["tpr"] == pytest.approx(row["macro_tpr"], abs=1e-12)
        assert mine["auroc"] == pytest.approx(roc_auc_score(labels[site == s], probs[site == s],
                                                            multi_class="ovr", average="macro"), abs=0.05)
    # group "class k" = examples whose true label is k: its accuracy is that class's recall
    for c in range(k):
        assert report["class"]["by_group"][f"class {c}"]["accuracy"] == pytest.approx(
            recall_score(labels, pred, labels=[c], average="macro"), abs=1e-12)


def test_malformed_or_inconsistent_sites_are_excluded_with_a_reason():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 30)
    good = site_counts(rng.random(30), labels, {"sex": np.array(["f", "m"] * 15)}, 5, "good")
    forged = json.loads(json.dumps(good))
    forged["overall"]["classes"][0]["tp"] += 1000          # counts that do not add up
    other_bins = site_counts(rng.random(30), labels, {}, 5, "b", bins=20)
    report = aggregate({"good": good, "forged": forged, "bins": other_bins, "junk": {"x": 1}})
    assert set(report["by_site"]["sites"]) == {"good"}
    assert set(report["excluded_sites"]) == {"forged", "bins", "junk"}
    assert "tp+fp+tn+fn" in report["excluded_sites"]["forged"]


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        site_counts(np.zeros((3, 2)), np.zeros(4), {}, 1, "s")
    with pytest.raises(ValueError):
        site_counts(np.zeros((3, 2)), np.zeros(3), {"sex": np.array(["f"])}, 1, "s")
    assert aggregate({}) == {"by_site": {"sites": {}, "metric": "accuracy", "worst_site": None,
                                         "best_site": None, "gap": None, "spread": None}}
