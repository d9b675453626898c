"""One round's aggregation over decoded states, as functions (no Flower, no I/O).

``aggregate(strategy, updates, global_state, round, server_state)``: the accepted
``SiteUpdate``s (their arrays, example counts and train losses, decoded once by
server/replies.py) and the global state they started from -> the new global state.

    states --LoRA space (lora_strategy)--> rule.combine --> rule.step --> global space
    client-level DP: clip each --> the above with equal weights --> noise  (client_dp)

``strategy`` is the run's choice (``registry.build_strategy``); ``server_state`` is what
the server carries from round to round (FedAdam/FedYogi moments, client-level DP
releases), kept by the round loop and returned anew with each aggregate.

Secure aggregation, which sees only a weighted sum, divides it by the total weight and
calls ``aggregate_mean`` (the server step and the way back) for rules whose
``combine`` is the weighted mean (``strategy.rule.is_weighted_mean``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Sequence

import numpy as np

from fedcare.schemas import SiteUpdate

from .client_dp import ClientDP, private_aggregate
from .lora_strategy import LoraPlan, from_base_space, lora_diagnostics, to_base_space
from .rules import Batch, Moments, Rule, State


@dataclass(frozen=True)
class Strategy:
    """The run's aggregation, chosen once from its configuration."""

    rule: Rule
    lora: LoraPlan = LoraPlan()
    client_dp: ClientDP | None = None

    @property
    def name(self) -> str:
        return self.rule.name

    @property
    def train_config(self) -> dict[str, float]:
        """What a training message tells the sites about the rule (FedProx: its mu)."""
        return dict(self.rule.train_config)


@dataclass(frozen=True)
class ServerState:
    """What the server's aggregation carries between rounds."""

    moments: Moments | None = None   # FedAdam / FedYogi
    releases: int = 0                # client-level DP: noisy aggregates released so far


@dataclass(frozen=True)
class Aggregate:
    state: dict[str, np.ndarray]     # the new global state (the keys aggregated)
    server_state: ServerState
    train_loss: float | None = None  # weighted like the state (Krum: the chosen site's)
    diagnostics: dict[str, float] = field(default_factory=dict)


def aggregate(strategy: Strategy, updates: Sequence[SiteUpdate], global_state: State, rnd: int,
              server_state: ServerState = ServerState()) -> Aggregate:
    """The new global state from the round's accepted updates."""
    if not updates:
        raise ValueError("no update to aggregate")
    states = [u.arrays for u in updates]
    losses = [u.train_loss for u in updates]
    if strategy.client_dp is not None:
        return private_aggregate(strategy.client_dp, partial(aggregate_states, strategy), states, losses,
                                 global_state, rnd, server_state)
    return aggregate_states(strategy, states, [float(u.num_examples) for u in updates], losses,
                            global_state, rnd, server_state)


def aggregate_states(strategy: Strategy, states: Sequence[State], weights: Sequence[float],
                     losses: Sequence[float | None], global_state: State, rnd: int,
                     server_state: ServerState) -> Aggregate:
    """``aggregate`` on bare states and weights."""
    diagnostics = lora_diagnostics(states, strategy.lora.mode)
    global_base = to_base_space(global_state, global_state, strategy.lora)
    batch = Batch([to_base_space(s, global_state, strategy.lora) for s in states], weights, losses, global_base)
    combined, used = strategy.rule.combine(batch)
    return aggregate_mean(strategy, combined, global_state, rnd, server_state,
                          train_loss=_weighted_loss([losses[i] for i in used], [weights[i] for i in used]),
                          diagnostics=diagnostics, global_base=global_base)


def aggregate_mean(strategy: Strategy, combined: State, global_state: State, rnd: int,
                   server_state: ServerState, train_loss: float | None = None,
                   diagnostics: dict[str, float] | None = None, global_base: State | None = None) -> Aggregate:
    """The rest of a round from the combined state in the rule's space (for a weighted
    mean rule: the weighted mean, e.g. a secure sum over the total weight): the server
    step, then the way back to the global state's space."""
    moments = server_state.moments
    if strategy.rule.step is not None:
        if global_base is None:
            global_base = to_base_space(global_state, global_state, strategy.lora)
        combined, moments = strategy.rule.step(combined, global_base, rnd, moments)
    state, space_diagnostics = from_base_space(combined, global_state, strategy.lora)
    return Aggregate(state=state, server_state=ServerState(moments, server_state.releases), train_loss=train_loss,
                     diagnostics={**(diagnostics or {}), **space_diagnostics})


def _weighted_loss(losses: Sequence[float | None], weights: Sequence[float]) -> float | None:
    """The weighted mean of the losses the sites sent, with the weights of all of them
    (as Flower's metric aggregation: a site without a loss adds nothing)."""
    total = sum(weights)
    if not any(loss is not None for loss in losses) or total <= 0:
        return None
    return float(sum(float(loss) * (w / total) for loss, w in zip(losses, weights) if loss is not None))
