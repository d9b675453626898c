"""Heterogeneous LoRA ranks: sites train the rank they can afford.

The global state has the run's rank ``r_global`` (``cfg.lora.r``, the largest rank a
site may use). A site of rank ``r_site`` builds its peft adapter with ``r=r_site`` and
the run's ``lora_alpha``, so its LoRA scale is ``alpha / r_site`` (peft's default);
pass ``scale=lambda r: alpha / r`` so products are compared at their true size
(``None``: every rank has the same scale, e.g. when a site sets alpha proportional to r).

- ``exact``: mixed ranks meet in product space (``scale_i B_i A_i`` is ``[out, in]``
  whatever the rank); each site receives the SVD re-factorisation of the global
  product to its own rank.
- ``naive`` (and ``ffa``): factors are zero-padded to ``r_global`` (HetLoRA-style);
  each site receives the first ``r_site`` components.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .lora import (
    RankScale,
    State,
    exact_aggregate,
    factorise,
    is_lora_a,
    is_lora_b,
    lora_pairs,
    lora_rank,
    naive_aggregate,
    product,
)


def _ratio(scale: RankScale, r_from: int, r_to: int) -> float:
    return scale(r_from) / scale(r_to) if scale else 1.0


def pad_to_rank(state: State, r_max: int, scale: RankScale = None) -> dict[str, np.ndarray]:
    """Zero-pad every LoRA factor to rank ``r_max`` (A: extra zero rows; B: extra zero
    columns). B is multiplied by ``scale(r)/scale(r_max)`` so that the padded layer's
    update ``scale(r_max) B' A'`` equals the site's ``scale(r) B A``."""
    r = lora_rank(state)
    if r is None or r == r_max:
        return {k: np.asarray(v) for k, v in state.items()}
    if r > r_max:
        raise ValueError(f"state has rank {r} above the global rank {r_max}")
    ratio = _ratio(scale, r, r_max)
    out: dict[str, np.ndarray] = {}
    for k, v in state.items():
        v = np.asarray(v)
        if is_lora_a(k):
            pad = np.zeros((r_max - r, *v.shape[1:]), dtype=v.dtype)
            out[k] = np.concatenate([v, pad], axis=0)
        elif is_lora_b(k):
            pad = np.zeros((v.shape[0], r_max - r, *v.shape[2:]), dtype=v.dtype)
            out[k] = np.concatenate([(v * ratio).astype(v.dtype), pad], axis=1)
        else:
            out[k] = v
    return out


def truncate_for_site(global_state: State, r_site: int, mode: str = "exact",
                      scale: RankScale = None) -> dict[str, np.ndarray]:
    """The global state at a site's rank. ``exact``: re-factorise ``B A`` by truncated
    SVD (the best rank-``r_site`` approximation); ``naive``/``ffa``: keep the first
    ``r_site`` components. Non-LoRA keys pass unchanged."""
    r_global = lora_rank(global_state)
    if r_global is None or r_site == r_global:
        return {k: np.asarray(v) for k, v in global_state.items()}
    if r_site < 1 or r_site > r_global:
        raise ValueError(f"site rank {r_site} must be in [1, {r_global}]")
    ratio = _ratio(scale, r_global, r_site)
    out = {k: np.asarray(v) for k, v in global_state.items()}
    pairs = lora_pairs(list(global_state))
    if mode == "exact" and pairs:
        for p in pairs:
            a, b = np.asarray(global_state[p.a_key]), np.asarray(global_state[p.b_key])
            na, nb, _, _ = factorise(product(a, b) * ratio, r_site, a.shape[1:], b.shape[2:])
            out[p.a_key], out[p.b_key] = na.astype(a.dtype), nb.astype(b.dtype)
        return out
    for k, v in out.items():
        if is_lora_a(k):
            out[k] = v[:r_site].copy()
        elif is_lora_b(k):
            out[k] = (v[:, :r_site] * ratio).astype(v.dtype)
    return out


def aggregate_mixed_ranks(states: Sequence[State], weights: Sequence[float], r_global: int,
                          mode: str, template: State, scale: RankScale = None
                          ) -> tuple[dict[str, np.ndarray], float]:
    """Weighted aggregation of updates of different ranks into a rank-``r_global``
    state shaped like ``template``. Returns (state, relative SVD truncation error;
    0.0 for naive)."""
    if mode == "exact":
        res = exact_aggregate(states, weights, r_global, template=template, scale=scale)
        return res.state, res.rel_error
    padded = [pad_to_rank(s, r_global, scale) for s in states]
    mean = naive_aggregate(padded, weights)
    return {k: mean[k].astype(np.asarray(template[k]).dtype) for k in template}, 0.0


def rank_scale(cfg) -> RankScale:
    """The LoRA scale of a rank under ``cfg`` (peft: ``lora_alpha / r``), the one
    definition shared by the server's strategy and the sites."""
    alpha = float(cfg.lora.alpha)
    return lambda r: alpha / r


def state_for_site_rank(global_state: State, r_site: int | None, cfg) -> dict[str, np.ndarray]:
    """What a site of rank ``r_site`` loads from a global state (call it at the site or
    at the server): the global state re-factorised (exact) or sliced (naive) to its
    rank. ``ffa`` cannot mix ranks (each rank has its own frozen A): ValueError."""
    r_global = lora_rank(global_state)
    if r_site is None or r_global is None or r_site == r_global:
        return dict(global_state)
    if cfg.lora.aggregation == "ffa":
        raise ValueError("lora.aggregation=ffa needs one rank at every site (each rank has its own frozen A)")
    return truncate_for_site(global_state, int(r_site), cfg.lora.aggregation, rank_scale(cfg))


def per_site_arrays(plan, global_state: State, site_rank: int | None) -> dict[str, np.ndarray]:
    """What one site receives: the global state at the site's declared rank (``plan``:
    the run's ``LoraPlan``, ``build_strategy(...).lora``, which knows the mode and LoRA
    scale). ``site_rank`` None or equal to the global rank: the global state."""
    if site_rank is None or lora_rank(global_state) in (None, site_rank):
        return dict(global_state)
    return truncate_for_site(global_state, int(site_rank), plan.mode, plan.scale)
