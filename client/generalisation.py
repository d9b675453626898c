"""The fairness generalisation gap at the site (FairTune's measure): the global model's
per-group counts on the site's *training* split, beside the held-out ones, suppressed by
the same rule (``models.fairness.site_counts``); the server sums them into each group's
``train_accuracy`` and ``generalisation_gap``. Only counts leave, as for the test split."""
from __future__ import annotations

from fedcare.models.fairness import site_counts
from fedcare.models.training import predict_dataset


def train_split_counts(site, model, split, min_group_size: int) -> dict | None:
    """``site_counts`` of ``model`` on the training split, or None when the task has
    sensitive attributes for its test examples but not for its training ones."""
    if split.groups and not split.train_groups:
        return None
    scores, labels = predict_dataset(site.task, model, split.train, site.cfg, site.device)
    return site_counts(scores, labels, split.train_groups, min_group_size, site.site_id)
