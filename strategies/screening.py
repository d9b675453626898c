"""Screening of incoming updates before aggregation.

Structural checks (every update): the exact key set, shapes, dtypes and finite values
of the global trainable state. Then, when ``norm_factor > 0``, a norm bound: an update
whose distance to the global state ``||update - global||`` exceeds ``norm_factor`` times
the median distance of the round's structurally valid updates is rejected. The median
is robust to a minority of outliers; with fewer than 3 valid updates the bound is not
applied (the median of two is their mean, so it cannot single one out).

Heterogeneous LoRA ranks (``allow_lower_rank=True``): a LoRA factor may have a smaller
rank than the global one (A: fewer rows, B: fewer columns); its distance is measured
against the same slice of the global factor.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from .lora import is_lora_a, is_lora_b

Expected = Mapping[str, tuple[tuple[int, ...], str]]
Reply = tuple[str, Mapping[str, np.ndarray], int]

MIN_UPDATES_FOR_NORM = 3


def expected_from_state(state: Mapping[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], str]]:
    """The ``expected`` argument of ``screen_updates`` for a global state."""
    return {k: (tuple(np.shape(v)), str(np.asarray(v).dtype)) for k, v in state.items()}


def shape_ok(key: str, got: tuple[int, ...], want: tuple[int, ...], allow_lower_rank: bool) -> bool:
    if got == want:
        return True
    if not allow_lower_rank or len(got) != len(want) or len(got) < 2:
        return False
    axis = 0 if is_lora_a(key) else 1 if is_lora_b(key) else None
    if axis is None:
        return False
    return (1 <= got[axis] <= want[axis]
            and all(g == w for i, (g, w) in enumerate(zip(got, want)) if i != axis))


def structural_problem(expected: Expected, update: Mapping[str, np.ndarray],
                       allow_lower_rank: bool = False) -> str | None:
    """Why ``update`` does not fit ``expected`` (None if it does)."""
    missing = [k for k in expected if k not in update]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        return f"missing key {missing[0]}{more}"
    unexpected = [k for k in update if k not in expected]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        return f"unexpected key {unexpected[0]}{more}"
    for k, (shape, dtype) in expected.items():
        v = update[k]
        got = tuple(np.shape(v))
        if not shape_ok(k, got, tuple(shape), allow_lower_rank):
            return f"shape {got} != {tuple(shape)} for {k}"
        if str(np.asarray(v).dtype) != dtype:
            return f"dtype {np.asarray(v).dtype} != {dtype} for {k}"
        if not np.all(np.isfinite(v)):
            return f"non-finite values in {k}"
    return None


def update_distance(update: Mapping[str, np.ndarray], global_state: Mapping[str, np.ndarray] | None) -> float:
    """``||update - global||_2`` over all tensors (``||update||`` without a global state).
    A lower-rank LoRA factor is compared with the matching slice of the global one."""
    total = 0.0
    for k, v in update.items():
        v = np.asarray(v, dtype=np.float64)
        if global_state is not None and k in global_state:
            g = np.asarray(global_state[k], dtype=np.float64)
            g = g[tuple(slice(0, n) for n in v.shape)]
            v = v - g
        total += float(np.sum(v * v))
    return float(np.sqrt(total))


def screen_updates(expected: Expected, replies: Sequence[Reply], norm_factor: float,
                   global_state: Mapping[str, np.ndarray] | None = None,
                   allow_lower_rank: bool = False) -> tuple[list[str], dict[str, str]]:
    """Split a round's replies ``(site_id, update, num_examples)`` into accepted site
    ids and ``{site_id: reason}`` for rejected ones. Pass ``global_state`` so that the
    norm bound measures the update itself (update - global)."""
    accepted: list[str] = []
    rejected: dict[str, str] = {}
    seen: set[str] = set()
    for site, update, num_examples in replies:
        if site in seen:
            rejected[site] = "duplicate reply from the same site in one round"
            if site in accepted:
                accepted.remove(site)
            continue
        seen.add(site)
        problem = structural_problem(expected, update, allow_lower_rank)
        if problem is None and not (num_examples and num_examples > 0):
            problem = f"num_examples {num_examples} is not positive"
        if problem:
            rejected[site] = problem
        else:
            accepted.append(site)
    if norm_factor > 0 and len(accepted) >= MIN_UPDATES_FOR_NORM:
        updates = {site: update for site, update, _ in replies if site in accepted}
        norms = {site: update_distance(updates[site], global_state) for site in accepted}
        median = float(np.median(list(norms.values())))
        if median > 0:
            for site in list(accepted):
                if norms[site] > norm_factor * median:
                    rejected[site] = (f"update norm {norms[site]:.3g} > {norm_factor:g} x "
                                      f"round median {median:.3g}")
                    accepted.remove(site)
    return accepted, rejected
