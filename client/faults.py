"""Fault injection for drills and tests (``faults.site`` / ``faults.kind``): the named
site sends a malformed or hostile update, errors, or never answers. Off by default;
the server's screening and robust strategies are what these exercise."""
from __future__ import annotations

import time

import numpy as np

from fedcare.config import FaultConfig


def applies(faults: FaultConfig, site_id: str) -> bool:
    return bool(faults.kind) and faults.site == site_id


def before_training(faults: FaultConfig, site_id: str, timeout: float) -> None:
    if not applies(faults, site_id):
        return
    if faults.kind == "crash":
        raise RuntimeError(f"injected fault: site {site_id} crashed")
    if faults.kind == "hang":
        time.sleep(timeout + 30)


def corrupt_update(faults: FaultConfig, site_id: str, update: dict[str, np.ndarray],
                   global_state: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    if not applies(faults, site_id) or faults.kind in ("crash", "hang"):
        return update
    rng = np.random.default_rng(seed)
    out = dict(update)
    first = next(iter(out))
    if faults.kind == "nan":
        out[first] = out[first].copy()
        out[first].flat[0] = np.nan
    elif faults.kind == "shape":
        out[first] = np.zeros(tuple(d + 1 for d in out[first].shape), dtype=out[first].dtype)
    else:
        for k, v in out.items():
            delta = v - global_state[k]
            if faults.kind == "scale":
                delta = delta * faults.scale
            elif faults.kind == "sign":
                delta = -faults.scale * delta
            elif faults.kind == "random":
                delta = rng.normal(0, faults.scale * (np.abs(delta).mean() + 1e-3), size=v.shape)
            out[k] = (global_state[k] + delta).astype(v.dtype)
    return out
