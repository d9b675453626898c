"""One-shot empirical privacy estimation at the hospital level (Andrew et al., ICLR 2024,
"One-shot empirical privacy estimation for federated learning").

``k`` canary clients take part in every round of one training run; canary ``i``'s update
is a fixed random unit direction ``c_i`` scaled to the clipping norm. After the run the
final model's change ``D`` is compared with every inserted canary and with ``m`` fresh
directions that were never inserted: ``cos(D, c_i)`` vs ``cos(D, u_j)``. The two sets are
fitted by Gaussians and read as a Gaussian-DP mechanism of
``mu = (mean_in - mean_out) / std_out``, whose (epsilon, delta) curve gives the estimate
(Dong, Roth, Su 2019: ``delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)``).
It is an estimate, not a bound: it is what an adversary who sees only the final model
and knows the canaries' directions could tell apart, and it should stay below the
accountant's epsilon when the noise is honest and be large when there is none.

``audit`` runs one training over any aggregation path given as a function from the
round's updates (vectors, the real sites' first, then the canaries') to the round's
aggregate update; ``paths`` builds fedcare's three (FedAvg, server-side client-level DP,
secure aggregation with distributed DP) over the same functions the round loop uses.
The real sites here train a quadratic objective each (numpy only, cheap at any size):
their updates are what the canaries compete with, not a model anyone would ship.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from fedcare import secagg as SA
from fedcare.config import RunConfig
from fedcare.secagg_local import run_local
from fedcare.strategies.aggregate import ServerState, Strategy, aggregate_states
from fedcare.strategies.client_dp import client_dp_of, private_aggregate
from fedcare.strategies.rules import Rule, fedavg

Path = Callable[[Sequence[np.ndarray], np.random.Generator], np.ndarray]   # updates -> aggregate update


@dataclass(frozen=True)
class Estimate:
    epsilon: float      # at ``delta``, from the Gaussian fit
    mu: float           # (mean_in - mean_out) / std_out
    epsilon_low: float  # the epsilons of mu -/+ 1.96 standard errors (delta method): the
    epsilon_high: float  # point estimate's sampling spread, one run
    delta: float
    mean_in: float
    std_in: float
    mean_out: float
    std_out: float
    canaries: int
    fresh: int


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def gdp_delta(epsilon: float, mu: float) -> float:
    """delta(epsilon) of a mu-GDP mechanism (Dong, Roth, Su 2019, Cor. 2.13)."""
    tail = _phi(-epsilon / mu - mu / 2)
    second = math.exp(epsilon + math.log(tail)) if tail > 0 else 0.0
    return max(0.0, _phi(-epsilon / mu + mu / 2) - second)


def gdp_epsilon(mu: float, delta: float) -> float:
    """Smallest epsilon >= 0 at which a mu-GDP mechanism is (epsilon, delta)-DP."""
    if mu <= 0 or gdp_delta(0.0, mu) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while gdp_delta(hi, mu) > delta:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            return float("inf")
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if gdp_delta(mid, mu) > delta else (lo, mid)
    return hi


def estimate(cos_in: np.ndarray, cos_out: np.ndarray, delta: float) -> Estimate:
    """The one-shot estimate from the cosines of inserted and fresh canaries."""
    mean_in, mean_out = float(np.mean(cos_in)), float(np.mean(cos_out))
    std_in, std_out = float(np.std(cos_in, ddof=1)), float(np.std(cos_out, ddof=1))
    k, m = len(cos_in), len(cos_out)
    mu = max(0.0, (mean_in - mean_out) / std_out)
    se = math.sqrt((std_in ** 2 / k + std_out ** 2 / m) / std_out ** 2 + mu ** 2 / (2 * (m - 1)))
    return Estimate(gdp_epsilon(mu, delta), mu, gdp_epsilon(max(0.0, mu - 1.96 * se), delta),
                    gdp_epsilon(mu + 1.96 * se, delta), delta, mean_in, std_in, mean_out, std_out, k, m)


def unit_directions(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal((n, dim))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@dataclass(frozen=True)
class QuadraticSites:
    """``n`` hospitals, each minimising ``|w - w_i|^2 / 2`` by ``steps`` gradient steps of
    ``lr`` from the global model; ``w_i`` is a common optimum plus the site's own offset."""

    optima: np.ndarray      # (n, dim)
    steps: int = 5
    lr: float = 0.1

    @classmethod
    def make(cls, n: int, dim: int, rng: np.random.Generator, spread: float = 0.5, **kw) -> "QuadraticSites":
        common = rng.standard_normal(dim) / math.sqrt(dim)
        return cls(common + spread * rng.standard_normal((n, dim)) / math.sqrt(dim), **kw)

    def updates(self, model: np.ndarray) -> list[np.ndarray]:
        return list((1 - (1 - self.lr) ** self.steps) * (self.optima - model))


def audit(path: Path, sites: QuadraticSites, rounds: int, canaries: int, fresh: int, clip: float,
          delta: float, rng: np.random.Generator) -> Estimate:
    """Train ``rounds`` rounds through ``path`` with ``canaries`` canary clients in every
    round; the estimate from the final model's change."""
    dim = sites.optima.shape[1]
    inserted = unit_directions(canaries, dim, rng)
    model = np.zeros(dim)
    for _ in range(rounds):
        model = model + path(sites.updates(model) + list(clip * inserted), rng)
    change = model / np.linalg.norm(model)
    return estimate(inserted @ change, unit_directions(fresh, dim, rng) @ change, delta)


# ------------------------------------------------------------------ fedcare's paths
def _as_states(updates: Sequence[np.ndarray]) -> tuple[list[dict], dict]:
    zero = {"w": np.zeros_like(updates[0])}
    return [{"w": np.asarray(u)} for u in updates], zero


def fedavg_path(updates: Sequence[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Plain FedAvg (every client weighs 1, as the canaries have no examples to count)."""
    states, zero = _as_states(updates)
    out = aggregate_states(Strategy(Rule("fedavg", fedavg)), states, [1.0] * len(states),
                           [None] * len(states), zero, 1, ServerState())
    return out.state["w"]


def client_dp_path(cfg: RunConfig) -> Path:
    """Server-side client-level DP (``dp.level=client``): clip, equal-weight mean, noise."""
    strategy = Strategy(Rule("fedavg", fedavg), client_dp=client_dp_of(cfg))

    def path(updates: Sequence[np.ndarray], rng: np.random.Generator) -> np.ndarray:
        states, zero = _as_states(updates)
        out = private_aggregate(strategy.client_dp, lambda *a: aggregate_states(strategy, *a), states,
                                [None] * len(states), zero, 1, ServerState(), rng)
        return out.state["w"]
    return path


def secagg_path(cfg: RunConfig, n_clients: int, dim: int, protocol: bool = False) -> Path:
    """Secure aggregation (with distributed DP when ``secagg.epsilon`` or
    ``secagg.noise_multiplier`` is set): every client clips, quantizes, adds its Skellam
    share and the coordinator decodes the sum; every client weighs 1. ``protocol``: run the masking protocol
    (``secagg_local.run_local``); otherwise the ring sum of the encoded inputs, which the
    protocol's unmasking returns exactly (tests/test_secagg.py)."""
    params = SA.params_of(cfg, n_clients, dim)

    def path(updates: Sequence[np.ndarray], rng: np.random.Generator) -> np.ndarray:
        inputs = {i: SA.encode_input(np.asarray(u, dtype=np.float64), 1, params, rng)
                  for i, u in enumerate(updates)}
        if protocol:
            total = run_local(inputs, params).total
        else:
            total = SA.to_ring(np.sum([i.astype(np.int64) for i in inputs.values()], axis=0))
        mean, _ = SA.decode_sum(total, params)
        return mean
    return path
