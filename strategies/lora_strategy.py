"""``LoraAwareStrategy``: wraps any Flower strategy with LoRA-aware aggregation.

The base strategy (FedAvg, FedAdam, FedMedian, Krum...) keeps its own rule; the
wrapper changes the space it runs in:

- ``naive``: the base rule on the factors A and B (what FlowerTune does). Updates of a
  lower rank are zero-padded to the global rank first.
- ``ffa``: A is frozen at every site and never travels; the base rule on B is then
  exact. A reply carrying a ``lora_A`` key is a bug in the site and raises.
- ``exact``: every (A, B) pair is replaced by its product ``scale * B A``; the base rule
  runs on the products (FedAvg: the weighted mean of products; FedAdam: an adaptive
  step on the product; FedMedian: the coordinate-wise median of products; Krum: the
  most central product...), and the result is re-factorised to the global rank by a
  truncated SVD. ``last_diagnostics["svd_rel_error"]`` is the round's relative
  Frobenius truncation error. Mixed ranks meet naturally in product space.

Every combination of strategy and mode is well-defined this way; ``registry``
rejects the ones that make no sense (ffa/exact without LoRA, personalising B under
ffa/exact). Replies are copied before the base rule runs: some Flower strategies
(FedMedian, FedTrimmedAvg) pop arrays out of the messages they aggregate.
"""
from __future__ import annotations

import copy
from typing import Iterable, Sequence

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedcare.records import from_array_record, to_array_record
from fedcare.schemas import ARRAYS, METRICS

from .hetero import pad_to_rank
from .lora import RankScale, from_product_space, is_lora_a, lora_rank, to_product_space

LORA_MODES = ("naive", "ffa", "exact")


class LoraAwareStrategy(Strategy):
    """A Flower ``Strategy`` whose aggregation is LoRA-aware (see module docstring).
    Attributes of the base strategy (``min_train_nodes``, ``q``...) read through."""

    def __init__(self, base: Strategy, lora_mode: str = "naive", rank: int | None = None,
                 rank_scale: RankScale = None) -> None:
        if lora_mode not in LORA_MODES:
            raise ValueError(f"lora_mode must be one of {LORA_MODES}")
        self.base = base
        self.lora_mode = lora_mode
        self.rank = rank
        self.rank_scale = rank_scale
        self.last_diagnostics: dict[str, float] = {}
        self._global: dict[str, np.ndarray] | None = None

    def __getattr__(self, name: str):
        # only called for attributes not found on the wrapper itself
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    # ------------------------------------------------------------------ training
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = dict(from_array_record(arrays))
        messages = self.base.configure_train(server_round, arrays, config, grid)
        self._to_base_space_current()
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's interface: decode each reply's arrays, then ``aggregate_states``."""
        replies = list(replies)
        ok = [m for m in replies if not m.has_error()]
        if not ok:
            self.last_diagnostics = {}
            return self.base.aggregate_train(server_round, replies)
        state, metrics = self.aggregate_states(server_round,
                                               [(m, dict(from_array_record(m.content[ARRAYS]))) for m in ok])
        return (None if state is None else to_array_record(state)), metrics

    def aggregate_states(self, server_round: int, updates: Sequence[tuple[Message, dict[str, np.ndarray]]]
                         ) -> tuple[dict[str, np.ndarray] | None, MetricRecord | None]:
        """The new global (trainable) state from accepted replies whose arrays are already
        decoded, as the round loop decodes each reply once (server/replies.py). The base
        rule gets one copy of each reply with its state in the base rule's space."""
        self.last_diagnostics = {}
        if self._global is None:
            raise RuntimeError("configure_train must run before aggregate_train")
        states = [state for _, state in updates]
        if self.lora_mode == "ffa":
            carrying_a = [k for s in states for k in s if is_lora_a(k)]
            if carrying_a:
                raise ValueError(f"ffa: a site sent frozen factor {carrying_a[0]}; "
                                 "lora_A must stay at the site")
        ranks = [lora_rank(s) for s in states]
        if self.lora_mode == "ffa" and len({r for r in ranks if r is not None}) > 1:
            raise ValueError(f"ffa: sites sent B of different ranks {sorted(set(ranks))}; "
                             "ffa needs one rank at every site (each rank has its own frozen A)")
        if any(r is not None for r in ranks):
            self.last_diagnostics["lora_rank_min"] = float(min(r for r in ranks if r is not None))
            self.last_diagnostics["lora_rank_max"] = float(max(r for r in ranks if r is not None))
        copies = [_with_arrays(m, self._to_base_space(s)) for m, s in updates]
        arrays, metrics = self.base.aggregate_train(server_round, copies)
        if arrays is None:
            return None, metrics
        return self._from_base_space(dict(from_array_record(arrays))), metrics

    # ---------------------------------------------------------------- evaluation
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.base.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.base.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.base.summary()

    # -------------------------------------------------------------------- spaces
    @property
    def global_rank(self) -> int | None:
        return lora_rank(self._global) if self._global else self.rank

    def _to_base_space(self, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A site's state in the space the base rule runs in, keys in global order."""
        if self.lora_mode == "exact":
            state = to_product_space(state, self.rank_scale)
        elif self.global_rank is not None:
            state = pad_to_rank(state, self.global_rank, self.rank_scale)
        order = list(to_product_space(self._global, self.rank_scale)) if self.lora_mode == "exact" \
            else list(self._global)
        return {k: state[k] for k in order} if set(order) == set(state) else state

    def _from_base_space(self, aggregated: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert self._global is not None
        if self.lora_mode == "exact":
            res = from_product_space(aggregated, self._global, self.global_rank or self.rank or 1,
                                     self.rank_scale)
            self.last_diagnostics["svd_rel_error"] = res.rel_error
            self.last_diagnostics["svd_rel_error_max_layer"] = res.max_layer_rel_error
            return res.state
        return {k: np.asarray(aggregated[k]).astype(np.asarray(g).dtype, copy=False)
                for k, g in self._global.items()}

    def _to_base_space_current(self) -> None:
        """FedOpt (FedAdam, FedYogi) and QFedAvg remember the global arrays in
        ``configure_train`` to compute the round's step; in exact mode they must
        remember the products."""
        if self.lora_mode != "exact" or not hasattr(self.base, "current_arrays"):
            return
        product_global = to_product_space(self._global, self.rank_scale)
        if isinstance(self.base.current_arrays, ArrayRecord):
            self.base.current_arrays = to_array_record(product_global)
        else:
            self.base.current_arrays = product_global


def _with_arrays(msg: Message, state: dict[str, np.ndarray]) -> Message:
    """A copy of a reply whose ArrayRecord is ``state`` (other records kept, metrics
    copied), so the base strategy can consume it without touching the original."""
    content = RecordDict({ARRAYS: to_array_record(state)})
    for key, rec in msg.content.metric_records.items():
        content[key if key != ARRAYS else METRICS] = MetricRecord(dict(rec))
    return Message(content=content, metadata=copy.deepcopy(msg.metadata))
