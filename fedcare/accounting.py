"""Privacy accounting, in one place for both levels: the epsilon of a composition of
Gaussian mechanisms, computed from scratch by a fresh Opacus accountant. The site's
ledger (``client/ledger.py``, sample-level DP per patient) and the server's client-level
DP (``strategies/client_dp.py``, per hospital) both call ``epsilon_of``; neither room
imports the other for it.

The work is bounded: before the PRV accountant runs, the size of its grid is computed
from the RDP bound (as Opacus sizes it); above ``MAX_ACCOUNTING_BYTES`` the RDP bound
itself is the answer (a valid, looser upper bound on epsilon, whose cost does not grow
with the number of steps). So no epsilon, calibration or policy check ever holds more
than about that much memory, whatever number of rounds or steps a run asks for."""
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
    fresh Opacus accountant ("prv" or "rdp"). A PRV computation that would need more than
    ``MAX_ACCOUNTING_BYTES`` is replaced by the RDP bound (see the module's docstring)."""
    history = tuple(compose_history(events))
    if not history:
        return 0.0
    if accountant == "prv" and prv_bytes(history, delta) <= MAX_ACCOUNTING_BYTES:
        return _epsilon_cached(history, float(delta), accountant)
    if accountant not in ("prv", "rdp"):
        raise ValueError(f"unknown accountant {accountant!r}")
    return rdp_epsilon(history, delta)


@functools.lru_cache(maxsize=1024)
def _epsilon_cached(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        eps = float(acc.get_epsilon(delta=delta))
    return eps if math.isfinite(eps) else float("inf")



# ------------------------------------------------------------------------ bounded work
#: Memory one PRV computation may take; above it ``epsilon_of`` answers with the RDP bound.
MAX_ACCOUNTING_BYTES = 256 * 2**20
#: Opacus' PRV accountant peaks at about 67 bytes per grid point for one kind of step and
#: 23 more per further kind (measured with tracemalloc, opacus 1.6); these round up.
_PRV_BYTES_PER_POINT, _PRV_BYTES_PER_KIND = 64, 32
_MAX_SIGMA = 1e6   # as Opacus' get_noise_multiplier


@functools.lru_cache(maxsize=4096)
def _rdp_one_step(noise_multiplier: float, sample_rate: float):
    """RDP of one Poisson-subsampled Gaussian step at Opacus' default orders; a
    composition's RDP is the steps-weighted sum of these (its cost is independent of
    the number of steps)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    return compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                       orders=RDPAccountant.DEFAULT_ALPHAS)


def _rdp_to_epsilon(rdp, delta: float) -> float:
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import get_privacy_spent

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        warnings.filterwarnings("ignore", category=RuntimeWarning)
        eps, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    eps = float(eps)
    return eps if math.isfinite(eps) else float("inf")


def rdp_epsilon(events: Iterable[tuple[float, float, int]], delta: float) -> float:
    """The RDP accountant's epsilon (Opacus' numbers), in time and memory independent of
    the number of steps: an upper bound on epsilon, looser than PRV's."""
    history = compose_history(events)
    if not history:
        return 0.0
    return _rdp_to_epsilon(sum(steps * _rdp_one_step(nm, q) for nm, q, steps in history), delta)


def prv_bytes(events: Iterable[tuple[float, float, int]], delta: float, eps_error: float = 0.01) -> float:
    """About how much memory Opacus' PRV accountant takes for ``events`` at ``delta``:
    its grid is sized as ``PRVAccountant._get_domain`` sizes it (a domain of half-width
    L from the RDP bound, a mesh shrinking with the square root of the steps), computed
    here from cached RDP vectors without building it."""
    history = compose_history(events)
    if not history:
        return 0.0
    delta_error = delta / 1000
    total = sum(steps for _, _, steps in history)
    rdp = sum(steps * _rdp_one_step(nm, q) for nm, q, steps in history)
    half_width = max([_rdp_to_epsilon(rdp, delta_error / 4)]
                     + [_rdp_to_epsilon(_rdp_one_step(nm, q), delta_error / (8 * total)) for nm, q, _ in history])
    if not math.isfinite(half_width):
        return float("inf")
    mesh = eps_error / math.sqrt(total * math.log(12 / delta_error) / 2)
    points = 2 * (max(half_width, eps_error) + 3) / mesh + 2
    return points * (_PRV_BYTES_PER_POINT + _PRV_BYTES_PER_KIND * len(history))


def accounting_note(events: Iterable[tuple[float, float, int]], delta: float, accountant: str) -> str:
    """How ``epsilon_of`` computed the epsilon of ``events``, for a message: "" when with
    the accountant asked for, else that it is the RDP bound and why."""
    history = compose_history(events)
    if accountant != "prv" or not history:
        return ""
    need = prv_bytes(history, delta)
    if need <= MAX_ACCOUNTING_BYTES:
        return ""
    need_text = f"{need / 2**20:.3g} MiB" if math.isfinite(need) else "unbounded memory"
    return (f" (RDP upper bound: the PRV accountant would need {need_text}, more than the "
            f"site's accounting limit of {MAX_ACCOUNTING_BYTES // 2**20} MiB)")


def noise_for_epsilon(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str,
                      tolerance: float = 0.01) -> float:
    """Smallest noise multiplier (within ``tolerance`` of the target) whose ``steps``
    subsampled Gaussian steps spend at most ``target_epsilon`` by ``epsilon_of``: Opacus'
    ``get_noise_multiplier`` search, with bounded work per probe and a bounded number of
    probes. ValueError when no noise up to 1e6 reaches the target."""
    def eps(z: float) -> float:
        return epsilon_of([(z, sample_rate, steps)], delta, accountant)

    low, high, eps_high = 0.0, 10.0, float("inf")
    while eps_high > target_epsilon:
        high *= 2
        eps_high = eps(high)
        if high > _MAX_SIGMA:
            raise ValueError("The privacy budget is too low.")
    for _ in range(200):   # the RDP/PRV switch can leave a gap the tolerance never closes
        if target_epsilon - eps_high <= tolerance or high - low <= 1e-9 * high:
            break
        mid = (low + high) / 2
        e = eps(mid)
        if e < target_epsilon:
            high, eps_high = mid, e
        else:
            low = mid
    return high


def gaussian_noise_lower_bound(target_epsilon: float, delta: float, rounds: int) -> float:
    """The noise multiplier of ``rounds`` non-subsampled Gaussian releases that spends
    exactly ``target_epsilon`` at ``delta`` (the analytic Gaussian mechanism, Balle and
    Wang 2018: ``rounds`` releases at multiplier z are one at ``mu = sqrt(rounds) / z``).
    Every accountant's calibration (RDP, PRV) is an upper bound on epsilon and so picks at
    least this much noise: a closed-form floor for client-level DP's multiplier."""
    from scipy.special import log_ndtr, ndtr

    def delta_at(mu: float) -> float:
        a, b = -target_epsilon / mu + mu / 2, -target_epsilon / mu - mu / 2
        return float(ndtr(a) - math.exp(min(700.0, target_epsilon + float(log_ndtr(b)))))

    lo, hi = 1e-9, 1e4     # mu; delta_at grows with mu
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if delta_at(mid) < delta else (lo, mid)
    return math.sqrt(rounds) / hi

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
