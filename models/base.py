"""The task contract: what every workload (dataset + model + loss + metrics) provides.

Adding a task is one new module in ``models/`` that subclasses ``Task`` and registers
itself in ``models/registry.py``. Nothing in ``server/``, ``client/`` or ``dashboard/``
knows a task by name.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from fedcare.config import RunConfig


@dataclass
class SiteSplit:
    """One site's data. ``groups`` holds the sensitive attribute of every *test* example
    (attribute -> array of group labels as strings, aligned with ``test``). It is used
    only inside the site to compute per-group counts; it never leaves the site."""

    site_id: str
    train: Dataset
    test: Dataset
    groups: dict[str, np.ndarray] = field(default_factory=dict)
    #: the same attributes for the *train* examples (aligned with ``train``), where the task
    #: has them: the fairness generalisation gap (a group's metric on train beside test)
    train_groups: dict[str, np.ndarray] = field(default_factory=dict)


class Task(ABC):
    #: registry name, e.g. "heart-disease"
    name: ClassVar[str]
    #: sensitive attributes available per test example (may be empty)
    sensitive_attributes: ClassVar[tuple[str, ...]] = ()
    num_classes: ClassVar[int]
    #: dotted config keys this task sets differently from RunConfig's defaults
    defaults: ClassVar[dict[str, Any]] = {}
    #: per training mode ("lora", "head", "full") and per mode under DP-SGD ("head+dp"),
    #: the settings that learn in that mode, chosen by the sweeps in bench/; they apply
    #: over ``defaults`` (which may name the task's own ``train.mode``); explicit settings win
    mode_defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    #: per strategy name, dotted keys that strategy needs set differently on this task
    #: (tuned server learning rates, q-FedAvg's local SGD); explicit settings win
    strategy_defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    #: natural number of sites (None: any number of virtual sites, ``cfg.sites``)
    fixed_sites: ClassVar[int | None] = None
    #: whether the model is a base model + LoRA adapter (False: all parameters train)
    uses_lora: ClassVar[bool] = True
    #: privacy-audit canaries per site that ``fedcare audit`` plants by default
    audit_canaries: ClassVar[int] = 100
    #: name of the primary metric (for convergence plots and "rounds to X")
    primary_metric: ClassVar[str] = "accuracy"

    def settings(self, mode: str | None = None, dp: bool = False) -> dict[str, Any]:
        """The task's dotted settings for a run in ``mode`` (None: the task's own mode),
        with DP-SGD or without: ``defaults``, then the mode's, then the mode's under DP."""
        mode = mode or self.defaults.get("train.mode", "lora")
        out = {**self.defaults, "train.mode": mode, **self.mode_defaults.get(mode, {})}
        if dp:
            out.update(self.mode_defaults.get(f"{mode}+dp", {}))
        return out

    def site_ids(self, cfg: RunConfig) -> list[str]:
        n = self.fixed_sites or cfg.sites
        return [f"site-{i}" for i in range(n)]

    @abstractmethod
    def load_site(self, site_id: str, cfg: RunConfig) -> SiteSplit:
        """Train/test split of one site. ``cfg.data.path`` (if set) is the site's own
        data folder; raise ``DataError`` naming the file when it is unusable."""

    def load_pooled(self, cfg: RunConfig) -> tuple[Dataset, Dataset]:
        """All sites' train and test data together (the centralised baseline)."""
        from torch.utils.data import ConcatDataset

        splits = [self.load_site(s, cfg) for s in self.site_ids(cfg)]
        return ConcatDataset([s.train for s in splits]), ConcatDataset([s.test for s in splits])

    @abstractmethod
    def build_model(self, cfg: RunConfig) -> torch.nn.Module:
        """Base model with adapter attached; exactly the parameters that train have
        ``requires_grad=True``. Returned on the CPU in train mode; the caller moves it."""

    @abstractmethod
    def batch_loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Mean loss of one batch (tensors already on the model's device)."""

    @abstractmethod
    def predict(self, model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple[np.ndarray, np.ndarray]:
        """(scores, labels) for one batch: scores are class probabilities [N, C]."""

    def canaries(self, m: int, rng: np.random.Generator, train: Dataset) -> Dataset:
        """``m`` synthetic examples (same tensors as a training batch) that the privacy
        audit (client/privacy_audit.py) plants in a site's training data: built to be
        memorised, never copied from the site's records (``train``, which may shape them)."""
        from fedcare.errors import ConfigError

        raise ConfigError(f"task {self.name} has no privacy-audit canaries")

    def metrics(self, scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        from .metrics import classification_metrics

        return classification_metrics(scores, labels)
