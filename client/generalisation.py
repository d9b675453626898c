"""The fairness generalisation gap at the site (FairTune's measure): the global model's
per-group counts on the site's *training* split, beside the held-out ones, suppressed by
the same rule (``models.fairness.site_counts``); the server sums them into each group's
``train_accuracy`` and ``generalisation_gap``. Only counts leave, as for the test split.

At most as many training examples as the test split holds are scored (a seeded sample),
so the pass costs no more than one more evaluation, even for a task that generates text."""
from __future__ import annotations

import numpy as np
from torch.utils.data import Subset

from fedcare.models.fairness import site_counts
from fedcare.models.training import predict_dataset


def train_split_counts(site, model, split, min_group_size: int) -> dict | None:
    """``site_counts`` of ``model`` on (a sample of) the training split, or None when the
    task has sensitive attributes for its test examples but not for its training ones."""
    if split.groups and not split.train_groups:
        return None
    n = len(split.train)
    keep = np.sort(np.random.default_rng(site.cfg.seed).choice(n, size=min(n, len(split.test)), replace=False))
    scores, labels = predict_dataset(site.task, model, Subset(split.train, keep.tolist()), site.cfg, site.device)
    groups = {a: np.asarray(g)[keep] for a, g in split.train_groups.items()}
    return site_counts(scores, labels, groups, min_group_size, site.site_id)
