"""Trainable state in and out of a model: what leaves a site is exactly this dict."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch


def trainable_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in _named(model) if p.requires_grad]


def get_trainable_state(model: torch.nn.Module) -> "OrderedDict[str, np.ndarray]":
    """Name -> float32 numpy copy of every parameter with requires_grad."""
    return OrderedDict(
        (n, p.detach().to("cpu", torch.float32).numpy().copy()) for n, p in _named(model) if p.requires_grad
    )


def set_trainable_state(model: torch.nn.Module, state: dict[str, np.ndarray], strict: bool = True) -> None:
    params = dict(_named(model))
    missing = [n for n in trainable_names(model) if n not in state]
    unknown = [n for n in state if n not in params]
    if strict and (missing or unknown):
        raise KeyError(f"state mismatch: missing {missing[:3]}, unknown {unknown[:3]}")
    with torch.no_grad():
        for name, value in state.items():
            if name in params:
                p = params[name]
                p.copy_(torch.as_tensor(np.asarray(value), dtype=p.dtype, device=p.device))


def state_nbytes(state: dict[str, np.ndarray]) -> int:
    return int(sum(np.asarray(v).nbytes for v in state.values()))


def _named(model: torch.nn.Module):
    # Opacus' GradSampleModule prefixes names with "_module."; strip it so that the
    # names that travel are the same with and without DP.
    for name, p in model.named_parameters():
        yield name.removeprefix("_module."), p
