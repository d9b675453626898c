"""Aggregation rules on plain ``name -> ndarray`` states (no Flower, no I/O).

A rule has two parts, so that secure aggregation (which only ever sees a sum) can use
the second without the first:

- ``combine(batch)``: the round's accepted states -> one state (FedAvg: the weighted
  mean; FedMedian, trimmed mean, Krum, q-FedAvg: their own), and the indices of the
  updates whose metrics describe it (Krum: the one it picked; the others: all);
- ``step(combined, global, round, moments)``: an optional server optimiser on the
  combined state (FedAdam, FedYogi: an adaptive step on ``mean - global``).

The arithmetic follows Flower's own strategies (``flwr.serverapp.strategy``) operation
by operation, dtypes included, so a run gives the numbers it gave when Flower's objects
aggregated (tests/test_strategies.py checks every rule against them).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

State = Mapping[str, np.ndarray]

# strategy names whose whole server rule is the weighted mean of the updates (no server
# step): what client-level DP's noise and secure aggregation's sum can stand in for
MEAN_STRATEGIES = ("fedavg", "fedprox")


@dataclass(frozen=True)
class Batch:
    """A round's accepted updates, in the space the rule runs in, global key order."""

    states: Sequence[State]
    weights: Sequence[float]            # examples per site (1 each under client-level DP)
    losses: Sequence[float | None]      # each site's train loss (q-FedAvg weighs by it)
    global_state: State                 # the state the sites started from


@dataclass(frozen=True)
class Moments:
    """A server optimiser's state (FedAdam, FedYogi): first and second moments."""

    m: dict[str, np.ndarray]
    v: dict[str, np.ndarray]


Combine = Callable[[Batch], tuple[dict[str, np.ndarray], list[int]]]
Step = Callable[[State, State, int, "Moments | None"], tuple[dict[str, np.ndarray], Moments]]


@dataclass(frozen=True)
class Rule:
    """A named rule: how states are combined, the server step after, and what the
    training message carries for the sites (FedProx: ``proximal-mu``)."""

    name: str
    combine: Combine
    step: Step | None = None
    train_config: Mapping[str, float] = field(default_factory=dict)

    @property
    def is_weighted_mean(self) -> bool:
        """``combine`` is the weighted mean: a (secure) weighted sum divided by the total
        weight can stand in for it."""
        return self.combine is fedavg


# ------------------------------------------------------------------------ combine
def weighted_mean(states: Sequence[State], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """``sum_i x_i * (w_i / sum w)`` key by key, in the states' dtype, in their order
    (Flower's ``aggregate_arrayrecords``)."""
    total = sum(weights)
    out: dict[str, np.ndarray] = {}
    for state, w in zip(states, weights):
        factor = w / total
        for k, v in state.items():
            if k in out:
                out[k] += np.asarray(v) * factor
            else:
                out[k] = np.asarray(v) * factor
    return out


def fedavg(batch: Batch) -> tuple[dict[str, np.ndarray], list[int]]:
    return weighted_mean(batch.states, batch.weights), list(range(len(batch.states)))


def median(batch: Batch) -> tuple[dict[str, np.ndarray], list[int]]:
    """Coordinate-wise median (Flower's FedMedian)."""
    keys = list(batch.states[0])
    return ({k: np.asarray(np.median(np.stack([s[k] for s in batch.states]), axis=0)) for k in keys},
            list(range(len(batch.states))))


def trimmed_mean(batch: Batch, beta: float) -> tuple[dict[str, np.ndarray], list[int]]:
    """Coordinate-wise mean without the ``int(beta * n)`` lowest and highest values
    (Flower's FedTrimmedAvg, after scipy's ``trim_mean``)."""
    if not 0.0 <= beta < 0.5:
        raise ValueError("the trimmed fraction must be in [0, 0.5)")
    n = len(batch.states)
    low = int(beta * n)
    out = {}
    for k in batch.states[0]:
        parted = np.partition(np.stack([s[k] for s in batch.states]), (low, n - low - 1), 0)
        out[k] = np.asarray(np.mean(parted[low:n - low], axis=0))
    return out, list(range(n))


def krum_choice(states: Sequence[State], f: int) -> int:
    """The index of the state with the smallest sum of squared distances to its
    ``n - f - 2`` nearest others (Krum, Blanchard et al. 2017; Flower's arithmetic)."""
    flat = np.stack([np.concatenate(list(s.values()), axis=None).ravel() for s in states], axis=0)
    norms = np.square(flat).sum(axis=1)
    distance = norms[:, None] + norms[None, :] - 2 * flat @ flat.T
    closest = max(1, len(states) - f - 2)
    scores = [np.sum(row[np.argsort(row)[1:closest + 1].tolist()]) for row in distance]
    return int(np.argsort(scores)[:1][0])


def krum(batch: Batch, f: int) -> tuple[dict[str, np.ndarray], list[int]]:
    i = krum_choice(batch.states, f)
    return weighted_mean([batch.states[i]], [batch.weights[i]]), [i]


def qfedavg(batch: Batch, q: float, client_lr: float) -> tuple[dict[str, np.ndarray], list[int]]:
    """q-FedAvg (Li et al. 2020): each update weighted by its loss to the power q,
    step normalised by the estimated Lipschitz constant ``1 / client_lr`` (Flower's
    QFedAvg)."""
    lipschitz = 1.0 / client_lr
    keys = list(batch.global_state)
    global_weights = [np.asarray(batch.global_state[k]) for k in keys]
    sum_delta: list[np.ndarray] | None = None
    sum_h = 0.0
    for state, loss in zip(batch.states, batch.losses):
        if loss is None:
            raise ValueError("q-FedAvg needs every site's train_loss")
        grad = [np.array(state[k], copy=True) for k in keys]
        for gw, lw in zip(global_weights, grad):
            np.subtract(gw, lw, out=lw)
            lw *= lipschitz
        norm = float(sum(np.sum(np.square(g)) for g in grad))
        loss_pow_q = np.float_power(float(loss) + 1e-10, q)
        for g in grad:
            g *= loss_pow_q
        h = q * np.float_power(float(loss) + 1e-10, q - 1) * norm + lipschitz * loss_pow_q
        sum_delta = grad if sum_delta is None else [sd + d for sd, d in zip(sum_delta, grad)]
        sum_h += h
    assert sum_delta is not None
    return ({k: np.asarray(gw - (d / sum_h)) for k, gw, d in zip(keys, global_weights, sum_delta)},
            list(range(len(batch.states))))


# ----------------------------------------------------------------- server steps
def _first_moment(mean: State, global_state: State, moments: Moments | None, beta_1: float):
    delta = {k: np.asarray(x) - np.asarray(global_state[k]) for k, x in mean.items()}
    m = moments.m if moments and moments.m else {k: np.zeros_like(np.asarray(v)) for k, v in mean.items()}
    m = {k: beta_1 * v + (1 - beta_1) * delta[k] for k, v in m.items()}
    v = moments.v if moments and moments.v else {k: np.zeros_like(np.asarray(x)) for k, x in mean.items()}
    return delta, m, v


def adam_step(mean: State, global_state: State, rnd: int, moments: Moments | None, *,
              eta: float, tau: float, beta_1: float = 0.9, beta_2: float = 0.99
              ) -> tuple[dict[str, np.ndarray], Moments]:
    """FedAdam (Reddi et al. 2021) on the pseudo-gradient ``mean - global``, with
    Flower's bias-corrected rate."""
    delta, m, v = _first_moment(mean, global_state, moments, beta_1)
    v = {k: beta_2 * x + (1 - beta_2) * (delta[k] ** 2) for k, x in v.items()}
    eta_norm = eta * np.sqrt(1 - np.power(beta_2, rnd + 1.0)) / (1 - np.power(beta_1, rnd + 1.0))
    new = {k: np.asarray(x) + eta_norm * m[k] / (np.sqrt(v[k]) + tau) for k, x in global_state.items()}
    return new, Moments(m, v)


def yogi_step(mean: State, global_state: State, rnd: int, moments: Moments | None, *,
              eta: float, tau: float, beta_1: float = 0.9, beta_2: float = 0.99
              ) -> tuple[dict[str, np.ndarray], Moments]:
    """FedYogi (Reddi et al. 2021): as FedAdam with Yogi's additive second moment."""
    delta, m, v = _first_moment(mean, global_state, moments, beta_1)
    v = {k: x - (1.0 - beta_2) * (delta[k] ** 2) * np.sign(x - delta[k] ** 2) for k, x in v.items()}
    new = {k: np.asarray(x) + eta * m[k] / (np.sqrt(v[k]) + tau) for k, x in global_state.items()}
    return new, Moments(m, v)
