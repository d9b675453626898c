"""Privacy accounting, in one place for both levels: the epsilon of a composition of
Gaussian mechanisms, computed from scratch by a fresh Opacus accountant. The site's
ledger (``client/ledger.py``, sample-level DP per patient) and the server's client-level
DP (``strategies/client_dp.py``, per hospital) both call ``epsilon_of``; neither room
imports the other for it."""
from __future__ import annotations

import functools
import math
import warnings
from collections import OrderedDict
from typing import Iterable


def compose_history(events: Iterable[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """Opacus accountant history from (noise_multiplier, sample_rate, steps) events:
    events with the same noise and rate are merged (composition is order-free, so
    this is the same mechanism with fewer terms for the accountant to convolve)."""
    merged: "OrderedDict[tuple[float, float], int]" = OrderedDict()
    for nm, q, steps in events:
        merged[(float(nm), float(q))] = merged.get((float(nm), float(q)), 0) + int(steps)
    return [(nm, q, steps) for (nm, q), steps in merged.items()]


def epsilon_of(events: Iterable[tuple[float, float, int]], delta: float, accountant: str) -> float:
    """Epsilon at ``delta`` of the composition of ``events``, computed from scratch by a
    fresh Opacus accountant ("prv" or "rdp")."""
    history = tuple(compose_history(events))
    return _epsilon_cached(history, float(delta), accountant) if history else 0.0


@functools.lru_cache(maxsize=1024)
def _epsilon_cached(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        eps = float(acc.get_epsilon(delta=delta))
    return eps if math.isfinite(eps) else float("inf")


# ------------------------------------------------- distributed DP (secure aggregation)
SKELLAM_ORDERS = tuple(range(2, 257))


def skellam_epsilon(mu_total: float, l1: float, l2: float, rounds: int, delta: float) -> float:
    """Epsilon at ``delta`` of ``rounds`` releases of a sum carrying Skellam noise of
    parameter ``mu_total`` per coordinate (variance ``2 mu_total``), for a hospital whose
    integer contribution has L1 / L2 norm at most ``l1`` / ``l2``. RDP of the Skellam
    mechanism (Agarwal, Kairouz, Liu 2021, Theorem 3.5) at integer orders, composed over
    rounds (every site takes part in every round: no amplification), then converted."""
    if mu_total <= 0:
        return float("inf")
    best = float("inf")
    for a in SKELLAM_ORDERS:
        rdp = a * l2 ** 2 / (4 * mu_total) + min(((2 * a - 1) * l2 ** 2 + 6 * l1) / (16 * mu_total ** 2),
                                                 3 * l1 / (4 * mu_total))
        best = min(best, rounds * rdp + math.log(1 / delta) / (a - 1))
    return best


def secagg_sensitivity(params, dim: int) -> tuple[float, float]:
    """(L1, L2) bounds of one hospital's integer input: its update clipped to
    ``params.clip`` and scaled, plus at most 1 per coordinate from stochastic rounding."""
    l2 = params.scale * params.clip + math.sqrt(dim)
    return min(math.sqrt(dim) * l2, l2 ** 2), l2


def secagg_epsilon(params, dim: int, rounds: int, delta: float) -> float:
    """Hospital-level epsilon of ``rounds`` sums, each of at least ``params.min_in_sum``
    sites adding Skellam(``params.noise_mu``): the same number at a site and at the
    coordinator."""
    l1, l2 = secagg_sensitivity(params, dim)
    return skellam_epsilon(params.noise_mu * params.min_in_sum, l1, l2, rounds, delta)


def secagg_noise_mu(params, cfg, dim: int) -> float:
    """Skellam parameter per site so that any sum of at least ``params.min_in_sum`` sites
    carries the run's distributed DP: ``secagg.noise_multiplier`` (total noise std over the
    L2 sensitivity), or the smallest that meets ``secagg.epsilon`` over ``cfg.rounds``."""
    l1, l2 = secagg_sensitivity(params, dim)
    m = params.min_in_sum

    def mu(z: float) -> float:
        return (z * l2) ** 2 / 2 / m

    z = cfg.secagg.noise_multiplier
    if z <= 0:
        lo, hi = 0.01, 100.0
        if skellam_epsilon(mu(hi) * m, l1, l2, cfg.rounds, cfg.dp.delta) > cfg.secagg.epsilon:
            return mu(hi)
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if skellam_epsilon(mu(mid) * m, l1, l2, cfg.rounds, cfg.dp.delta) \
                > cfg.secagg.epsilon else (lo, mid)
        z = hi
    return mu(z)
