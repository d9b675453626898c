"""Client-level DP (``dp.level=client``): what a whole hospital contributed is hidden.

A composition of three functions (McMahan et al. 2018, "Learning differentially private
recurrent language models"; Flower's ``DifferentialPrivacyServerSideFixedClipping``
does the same): ``clip_update`` bounds every site's update (its difference to the
global state) to ``dp.max_grad_norm``; the rule averages the clipped states with equal
weights; ``add_noise`` adds Gaussian noise of standard deviation ``z * C / m`` to the
mean of the ``m`` aggregated updates. With every site taking part in every round there
is no sampling amplification: each round is one Gaussian mechanism of multiplier ``z``
on the add/remove-one-hospital relation, and the server-side accountant composes the
released rounds into the client-level epsilon (``client_epsilon``, stored with each
round's metrics; ``restore_releases`` counts them again on resume).

The guarantee holds for the uniform mean of clipped updates only, so (a) every site
weighs the same (whatever its number of examples), (b) only rules whose server step is
that mean are accepted (fedavg, fedprox; LoRA naive or ffa), and (c) the noise is
scaled to the number of updates actually aggregated.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Sequence

import numpy as np

from fedcare.accounting import epsilon_of, noise_for_epsilon
from fedcare.config import RunConfig
from fedcare.errors import ConfigError, PrivacyError

from .rules import MEAN_STRATEGIES

if TYPE_CHECKING:   # types only: aggregate.py composes this module's functions
    from .aggregate import Aggregate, ServerState

State = Mapping[str, np.ndarray]

MEAN_LORA_MODES = ("naive", "ffa")


def client_level_epsilon(noise_multiplier: float, rounds: int, sample_rate: float, delta: float,
                         accountant: str) -> float:
    """Client-level epsilon at ``delta`` after ``rounds`` noisy aggregations in which each
    site takes part with probability ``sample_rate`` (1.0: every site, every round)."""
    if rounds <= 0:
        return 0.0
    return epsilon_of([(noise_multiplier, sample_rate, rounds)], delta, accountant)


def client_noise_multiplier(cfg: RunConfig, sample_rate: float = 1.0) -> float:
    """``dp.noise_multiplier``, or the one that makes ``cfg.rounds`` aggregations spend
    ``dp.epsilon`` at ``dp.delta`` (client level), by the accountant's bounded search
    (``accounting.noise_for_epsilon``: the PRV grid never outgrows its memory limit)."""
    dp = cfg.dp
    if dp.epsilon <= 0:
        if dp.noise_multiplier <= 0:
            raise PrivacyError("client-level DP: set dp.epsilon (a target for the run) or dp.noise_multiplier")
        return float(dp.noise_multiplier)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # Opacus' alpha-range and log(0) notes at rate 1
            return float(noise_for_epsilon(dp.epsilon, dp.delta, sample_rate, cfg.rounds, dp.accountant,
                                           tolerance=min(0.01, dp.epsilon / 20)))
    except (ValueError, OverflowError, FloatingPointError) as exc:
        raise PrivacyError(f"client-level dp.epsilon={dp.epsilon:g} at dp.delta={dp.delta:g} is impossible "
                           f"over {cfg.rounds} rounds ({exc}); raise dp.epsilon or lower rounds") from None


def check_client_dp(cfg: RunConfig) -> None:
    if cfg.strategy.name not in MEAN_STRATEGIES:
        raise ConfigError(f"dp.level=client needs a strategy whose server rule is a mean of the clipped "
                          f"updates ({', '.join(MEAN_STRATEGIES)}); {cfg.strategy.name} is not, so its "
                          "noise would not give the stated guarantee")
    if cfg.lora.aggregation not in MEAN_LORA_MODES:
        raise ConfigError(f"dp.level=client needs lora.aggregation naive or ffa (a mean of the factors); "
                          f"{cfg.lora.aggregation} re-factorises products, which the noise does not cover")
    if cfg.strategy.screen_norm_factor > 0:
        raise ConfigError("dp.level=client: turn update screening off (strategy.screen_norm_factor=0); "
                          "rejecting updates by their norm depends on the data and is not covered by the noise")
    if not cfg.dp.max_grad_norm > 0:
        raise ConfigError("dp.max_grad_norm (the clipping norm of each site's update) must be > 0")


@dataclass(frozen=True)
class ClientDP:
    """The run's client-level DP: clipping norm, noise multiplier and accountant."""

    noise_multiplier: float
    clipping_norm: float
    delta: float
    accountant: str

    def noise_std(self, aggregated: int) -> float:
        """Standard deviation of the noise on the mean of ``aggregated`` clipped updates."""
        return float((self.noise_multiplier * self.clipping_norm) / aggregated)

    def epsilon(self, releases: int) -> float:
        return client_level_epsilon(self.noise_multiplier, releases, 1.0, self.delta, self.accountant)


def client_dp_of(cfg: RunConfig) -> ClientDP:
    """The run's client-level DP (every site in every round), checked and calibrated."""
    check_client_dp(cfg)
    noise = client_noise_multiplier(cfg, sample_rate=1.0)
    if not math.isfinite(noise) or noise <= 0:
        raise PrivacyError(f"client-level DP: noise multiplier {noise} is not usable")
    return ClientDP(noise, float(cfg.dp.max_grad_norm), float(cfg.dp.delta), cfg.dp.accountant)


def clip_update(state: State, global_state: State, clipping_norm: float) -> dict[str, np.ndarray]:
    """``global + (state - global) * min(1, C / ||state - global||)``, keys in the global
    state's order (a lower-rank LoRA factor against the same slice of the global one)."""
    if set(state) != set(global_state):
        raise ValueError(f"update keys differ from the global state's: {sorted(set(state) ^ set(global_state))[:3]}")
    base = {k: np.asarray(global_state[k])[tuple(slice(0, n) for n in np.shape(state[k]))] for k in global_state}
    update = {k: np.subtract(state[k], base[k]) for k in global_state}
    norm = float(np.sqrt(sum([np.linalg.norm(u.flat) ** 2 for u in update.values()])))
    factor = min(1, clipping_norm / norm) if norm > 0 else 1
    for u in update.values():
        u *= factor
    return {k: base[k] + update[k] for k in global_state}


def add_noise(state: State, std: float, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """Each array plus Gaussian noise of standard deviation ``std``, in its dtype."""
    rng = rng if rng is not None else np.random.default_rng()
    return {k: np.asarray(v) + rng.normal(0, std, np.shape(v)).astype(np.asarray(v).dtype) for k, v in state.items()}


Rule = Callable[..., "Aggregate"]   # (states, weights, losses, global_state, round, server_state)


def private_aggregate(dp: ClientDP, rule: Rule, states: Sequence[State], losses: Sequence[float | None],
                      global_state: State, rnd: int, server_state: "ServerState",
                      rng: np.random.Generator | None = None) -> "Aggregate":
    """Clip each update, apply ``rule`` with equal weights, add noise for the number of
    updates aggregated; one more release counted in the returned server state."""
    clipped = [clip_update(s, global_state, dp.clipping_norm) for s in states]
    result = rule(clipped, [1.0] * len(clipped), losses, global_state, rnd, server_state)
    releases = result.server_state.releases + 1
    std = dp.noise_std(len(clipped))
    return replace(result, state=add_noise(result.state, std, rng),
                   server_state=replace(result.server_state, releases=releases),
                   diagnostics={**result.diagnostics, "client_epsilon": dp.epsilon(releases),
                                "client_noise_multiplier": float(dp.noise_multiplier),
                                "client_clipping_norm": float(dp.clipping_norm), "client_noise_std": std})


def restore_releases(server_state: "ServerState", stored_rounds: Iterable[dict]) -> "ServerState":
    """On resume: the noisy aggregates already released in the stored rounds (each round
    that released one stored its ``client_epsilon``) count towards the epsilon."""
    return replace(server_state,
                   releases=sum("client_epsilon" in (r.get("metrics") or {}) for r in stored_rounds))
