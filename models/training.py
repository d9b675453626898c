"""The local training and evaluation loops, shared by every task.

The optimiser and data loader come from outside, so the same loop runs plain or under
DP-SGD (``client/privacy.py`` hands in Opacus' private optimiser and Poisson loader).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fedcare.config import RunConfig
from fedcare.errors import DataError, PolicyRefusal

from .base import Task


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """The run's optimiser; with ``train.head_lr`` the tensors that are not LoRA factors
    (a fresh head) get their own, usually larger, learning rate."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params: list = [p for _, p in named]
    if cfg.train.head_lr > 0:
        groups = [[p for n, p in named if "lora_" in n], [p for n, p in named if "lora_" not in n]]
        params = [{"params": g, "lr": lr} for g, lr in zip(groups, (cfg.train.lr, cfg.train.head_lr)) if g]
    if cfg.train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.train.lr)
    if cfg.train.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.train.lr)
    return torch.optim.Adam(params, lr=cfg.train.lr)


def make_train_loader(ds: Dataset, cfg: RunConfig, seed: int) -> DataLoader:
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(ds, batch_size=cfg.train.batch_size, shuffle=True, generator=g, drop_last=False)


def _cycle(loader: DataLoader) -> Iterator:
    """Batches of ``loader`` forever. An empty Poisson epoch (possible under DP) is
    sampled again; an empty dataset can never yield a batch, so it is a data error."""
    if len(loader.dataset) == 0:
        raise DataError("the site's training split is empty: nothing to train on")
    while True:
        yield from loader


@dataclass
class TrainResult:
    num_examples: int
    train_loss: float
    steps: int
    duration_s: float


def train_steps(
    task: Task,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    steps: int,
    device: torch.device,
    proximal_mu: float = 0.0,
    after_first_step: Callable[[], None] | None = None,
    deadline: float = 0.0,
) -> TrainResult:
    """Run ``steps`` optimiser steps, cycling over ``loader``. With ``proximal_mu`` > 0
    adds FedProx's (mu/2)||w - w_global||^2 on the trainable parameters. With a
    ``deadline`` (a ``time.monotonic()`` value; the site's ``max_task_seconds``) the loop
    stops at the first step that starts past it and raises PolicyRefusal."""
    model.train()
    anchors = None
    if proximal_mu > 0:
        anchors = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    losses: list[float] = []
    t0 = time.perf_counter()
    it = _cycle(loader)
    for step in range(steps):
        if deadline and time.monotonic() > deadline:
            raise PolicyRefusal(f"site policy refuses the run: the training task ran past the site's "
                                f"max_task_seconds and was stopped after {step} of {steps} steps")
        batch = next(it)
        batch = tuple(t.to(device) for t in batch)
        if batch[0].shape[0] == 0:
            # Poisson sampling drew an empty batch: still a step for the accountant
            optimizer.zero_grad(set_to_none=True)
            optimizer.step()
            continue
        optimizer.zero_grad(set_to_none=True)
        loss = task.batch_loss(model, batch)
        if anchors is not None:
            trainable = [p for p in model.parameters() if p.requires_grad]
            loss = loss + 0.5 * proximal_mu * sum(((p - a) ** 2).sum() for p, a in zip(trainable, anchors))
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if step == 0 and after_first_step is not None:
            after_first_step()
    return TrainResult(
        num_examples=len(loader.dataset),
        train_loss=float(np.mean(losses)) if losses else float("nan"),
        steps=steps,
        duration_s=time.perf_counter() - t0,
    )


@torch.no_grad()
def predict_dataset(task: Task, model: torch.nn.Module, ds: Dataset, cfg: RunConfig,
                    device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """(scores [N, C], labels [N]) over a whole dataset, in dataset order."""
    model.eval()
    scores, labels = [], []
    for batch in DataLoader(ds, batch_size=cfg.train.eval_batch_size, shuffle=False):
        s, y = task.predict(model, tuple(t.to(device) for t in batch))
        scores.append(s)
        labels.append(y)
    model.train()
    if not scores:
        return np.zeros((0, task.num_classes)), np.zeros((0,), dtype=int)
    return np.concatenate(scores), np.concatenate(labels)


def evaluate_global(task: Task, cfg: RunConfig, state: dict[str, np.ndarray] | None) -> tuple[dict[str, float], int]:
    """(metrics, number of test examples) of a global trainable state (None: the model
    as built, before any training) on all sites' test splits together."""
    from torch.utils.data import ConcatDataset

    from .state import set_trainable_state

    device = pick_device()
    model = task.build_model(cfg).to(device)
    if state is not None:
        set_trainable_state(model, state)
    test = ConcatDataset([task.load_site(s, cfg).test for s in task.site_ids(cfg)])
    scores, labels = predict_dataset(task, model, test, cfg, device)
    return task.metrics(scores, labels), len(labels)
