"""Trainable state in and out of a model: what leaves a site is exactly this dict."""
from __future__ import annotations

import hashlib
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


def state_sha256(state: dict[str, np.ndarray]) -> str:
    """Content hash of a state dict: names, dtypes, shapes and values, in name order.
    Independent of the container (npz or safetensors bytes differ)."""
    h = hashlib.sha256()
    for name in sorted(state):
        arr = np.ascontiguousarray(state[name])
        h.update(f"{name}\0{arr.dtype.str}\0{arr.shape}\0".encode())
        h.update(arr.tobytes())
    return h.hexdigest()
