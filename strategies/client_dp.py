"""Client-level DP (``dp.level=client``): what a whole hospital contributed is hidden.

Flower's ``DifferentialPrivacyServerSideFixedClipping`` clips every site's update (its
difference to the global state) to ``dp.max_grad_norm`` and adds Gaussian noise of
standard deviation ``z * C / m`` to the mean of the ``m`` aggregated updates (McMahan et
al. 2018, "Learning differentially private recurrent language models"). With every site
taking part in every round there is no sampling amplification: each round is one
Gaussian mechanism of multiplier ``z`` on the add/remove-one-hospital relation, and the
server-side accountant composes the released rounds into the client-level epsilon
(``last_diagnostics["client_epsilon"]``, stored with each round's metrics).

The guarantee holds for the uniform mean of clipped updates only, so this wrapper
(a) weights every site equally (whatever its number of examples), (b) accepts only
strategies whose server rule is that mean (fedavg, fedprox; LoRA naive or ffa), and
(c) scales the noise to the number of updates actually aggregated.
"""
from __future__ import annotations

import copy
import math
import warnings
from typing import Iterable, Sequence

import numpy as np

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, Strategy

from fedcare.accounting import epsilon_of
from fedcare.config import RunConfig
from fedcare.errors import ConfigError, PrivacyError
from fedcare.records import from_array_record, to_array_record
from fedcare.schemas import ARRAYS, NUM_EXAMPLES

MEAN_STRATEGIES = ("fedavg", "fedprox")
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
    ``dp.epsilon`` at ``dp.delta`` (client level)."""
    dp = cfg.dp
    if dp.epsilon <= 0:
        if dp.noise_multiplier <= 0:
            raise PrivacyError("client-level DP: set dp.epsilon (a target for the run) or dp.noise_multiplier")
        return float(dp.noise_multiplier)
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # Opacus' alpha-range and log(0) notes at rate 1
            return float(get_noise_multiplier(target_epsilon=dp.epsilon, target_delta=dp.delta,
                                              sample_rate=sample_rate, steps=cfg.rounds,
                                              accountant=dp.accountant,
                                              epsilon_tolerance=min(0.01, dp.epsilon / 20)))
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


class ClientLevelDP(DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed-clipping DP wrapper, with uniform site weights, noise
    for the number of updates actually aggregated, and a client-level accountant."""

    def __init__(self, strategy: Strategy, noise_multiplier: float, clipping_norm: float, num_sites: int,
                 delta: float, accountant: str) -> None:
        super().__init__(strategy, noise_multiplier, clipping_norm, num_sites)
        self.num_sites = num_sites
        self.delta = delta
        self.accountant_name = accountant
        self.releases = 0
        self._diagnostics: dict[str, float] = {}

    def __getattr__(self, name: str):
        # attributes of the wrapped strategy (min_train_nodes...) read through
        if name in ("strategy", "__setstate__") or name.startswith("aggregate"):
            raise AttributeError(name)   # an aggregation read through would skip the clipping and noise
        return getattr(self.strategy, name)

    @property
    def client_epsilon(self) -> float:
        return client_level_epsilon(self.noise_multiplier, self.releases, 1.0, self.delta, self.accountant_name)

    @property
    def last_diagnostics(self) -> dict[str, float]:
        return {**getattr(self.strategy, "last_diagnostics", {}), **self._diagnostics}

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        ok = [m for m in replies if not m.has_error()]
        self._diagnostics = {}
        if not ok:
            return None, None
        current = dict(from_array_record(self.current_arrays))
        copies = [_uniform_copy(m, current) for m in ok]
        self.num_sampled_clients = len(copies)   # noise std z * C / m for the mean of m updates
        arrays, metrics = super().aggregate_train(server_round, copies)
        if arrays is not None:
            self.releases += 1
            self._diagnostics = {
                "client_epsilon": self.client_epsilon,
                "client_noise_multiplier": float(self.noise_multiplier),
                "client_clipping_norm": float(self.clipping_norm),
                "client_noise_std": float(self.noise_multiplier * self.clipping_norm / len(copies)),
            }
        return arrays, metrics

    def aggregate_states(self, server_round: int, updates: Sequence[tuple[Message, dict[str, np.ndarray]]]
                         ) -> tuple[dict[str, np.ndarray] | None, MetricRecord | None]:
        """The round loop's entry (as ``LoraAwareStrategy.aggregate_states``): clipped
        and noised like ``aggregate_train``, from the replies themselves."""
        arrays, metrics = self.aggregate_train(server_round, [m for m, _ in updates])
        return (None if arrays is None else dict(from_array_record(arrays))), metrics


def restore_releases(strategy: Strategy, stored_rounds: Iterable[dict]) -> None:
    """On resume: the noisy aggregations already released in the stored rounds (each
    round that released one stored its ``client_epsilon``) count towards the epsilon."""
    if isinstance(strategy, ClientLevelDP):
        strategy.releases = sum("client_epsilon" in (r.get("metrics") or {}) for r in stored_rounds)


def _uniform_copy(msg: Message, current: dict[str, np.ndarray]) -> Message:
    """A copy of a reply with its arrays in the global state's key order (Flower's
    clipping pairs arrays by position) and a weight of 1 (uniform mean)."""
    arrays = dict(from_array_record(msg.content[ARRAYS]))
    if set(arrays) != set(current):
        raise ValueError(f"update keys differ from the global state's: {sorted(set(arrays) ^ set(current))[:3]}")
    arrays = {k: np.array(arrays[k], copy=True) for k in current}
    if all(np.array_equal(arrays[k], current[k]) for k in current):
        # Flower's clipping divides by the update's norm; an unchanged state (norm 0)
        # is moved by 1e-12 (or one ulp) in one coordinate so it aggregates as the zero update it is.
        first = next(k for k in current if arrays[k].size)
        flat = arrays[first].reshape(-1)
        flat[0] = flat[0] + max(float(np.spacing(np.abs(flat[0]))), 1e-12)
    content = RecordDict({ARRAYS: to_array_record(arrays)})
    for key, rec in msg.content.metric_records.items():
        content[key] = MetricRecord({**dict(rec), NUM_EXAMPLES: 1})
    return Message(content=content, metadata=copy.deepcopy(msg.metadata))


def wrap_client_dp(strategy: Strategy, cfg: RunConfig, num_sites: int) -> ClientLevelDP:
    """The run's strategy under client-level DP (every site in every round)."""
    check_client_dp(cfg)
    noise = client_noise_multiplier(cfg, sample_rate=1.0)
    if not math.isfinite(noise) or noise <= 0:
        raise PrivacyError(f"client-level DP: noise multiplier {noise} is not usable")
    return ClientLevelDP(strategy, noise, cfg.dp.max_grad_norm, num_sites, cfg.dp.delta, cfg.dp.accountant)
