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
