"""LoRA-aware aggregation: the space a rule runs in, per ``lora.aggregation``.

Every rule (FedAvg, FedAdam, FedMedian, Krum...) keeps its own arithmetic; the LoRA
mode changes the space it runs in:

- ``naive``: the rule on the factors A and B (what FlowerTune does). Updates of a lower
  rank are zero-padded to the global rank first.
- ``ffa``: A is frozen at every site and never travels; the rule on B is then exact. An
  update carrying a ``lora_A`` key is a bug in the site and raises.
- ``exact``: every (A, B) pair is replaced by its product ``scale * B A``; the rule runs
  on the products (FedAvg: the weighted mean of products; FedAdam: an adaptive step on
  the product; FedMedian: the coordinate-wise median of products; Krum: the most
  central product...), and the result is re-factorised to the global rank by a
  truncated SVD; ``svd_rel_error`` is the round's relative Frobenius truncation error.
  Mixed ranks meet naturally in product space.

``registry`` rejects the combinations that make no sense (ffa/exact without LoRA,
personalising B under ffa/exact).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .hetero import pad_to_rank
from .lora import (
    RankScale,
    State,
    from_product_space,
    is_lora_a,
    lora_rank,
    product_space_keys,
    to_product_space,
)

LORA_MODES = ("naive", "ffa", "exact")


@dataclass(frozen=True)
class LoraPlan:
    """How a run aggregates LoRA factors: the mode, the global rank (``lora.r``, None
    without LoRA) and the LoRA scale of a rank."""

    mode: str = "naive"
    rank: int | None = None
    scale: RankScale = None

    def __post_init__(self) -> None:
        if self.mode not in LORA_MODES:
            raise ValueError(f"lora mode must be one of {LORA_MODES}")


def lora_diagnostics(states: Sequence[State], mode: str) -> dict[str, float]:
    """The round's LoRA ranks; ValueError for what ``ffa`` cannot aggregate."""
    if mode == "ffa":
        carrying_a = [k for s in states for k in s if is_lora_a(k)]
        if carrying_a:
            raise ValueError(f"ffa: a site sent frozen factor {carrying_a[0]}; lora_A must stay at the site")
    ranks = [r for r in (lora_rank(s) for s in states) if r is not None]
    if mode == "ffa" and len(set(ranks)) > 1:
        raise ValueError(f"ffa: sites sent B of different ranks {sorted(set(ranks))}; "
                         "ffa needs one rank at every site (each rank has its own frozen A)")
    return {"lora_rank_min": float(min(ranks)), "lora_rank_max": float(max(ranks))} if ranks else {}


def _global_rank(global_state: State, plan: LoraPlan) -> int | None:
    return lora_rank(global_state) if global_state else plan.rank


def to_base_space(state: State, global_state: State, plan: LoraPlan) -> dict[str, np.ndarray]:
    """A site's state in the space the rule runs in, keys in the global state's order
    (exact: products; otherwise factors padded to the global rank)."""
    if plan.mode == "exact":
        state = to_product_space(state, plan.scale)
        order = product_space_keys(list(global_state))
    else:
        rank = _global_rank(global_state, plan)
        state = pad_to_rank(state, rank, plan.scale) if rank is not None else dict(state)
        order = list(global_state)
    return {k: state[k] for k in order} if set(order) == set(state) else dict(state)


def from_base_space(aggregated: State, global_state: State, plan: LoraPlan
                    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The aggregate back in the global state's keys, shapes and dtypes (exact: the
    truncated SVD to the global rank, with its relative error)."""
    if plan.mode == "exact":
        res = from_product_space(aggregated, global_state, _global_rank(global_state, plan) or plan.rank or 1,
                                 plan.scale)
        return res.state, {"svd_rel_error": res.rel_error, "svd_rel_error_max_layer": res.max_layer_rel_error}
    return ({k: np.asarray(aggregated[k]).astype(np.asarray(g).dtype, copy=False) for k, g in global_state.items()},
            {})
