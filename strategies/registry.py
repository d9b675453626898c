"""Strategies by name: ``build_strategy(cfg, task)`` -> a Flower ``Strategy``.

Every strategy is Flower's own (``flwr.serverapp.strategy``) wrapped in
``LoraAwareStrategy`` so that ``lora.aggregation`` (naive | ffa | exact) applies to
all of them. Allowed combinations:

- any strategy x ``naive``; any strategy x ``ffa`` / ``exact`` on a LoRA task
  (robust and adaptive rules then run on B alone, or on the products B A);
- ``ffa`` / ``exact`` on a task without LoRA, or with ``lora.personalize=lora_B``
  (B stays at the sites, so there is no product to average and nothing of the
  adapter but A to share): ConfigError.

``fedprox``: the server side is FedAvg; Flower's FedProx puts ``proximal-mu`` in the
train config and the client adds the proximal term.
"""
from __future__ import annotations

from typing import Any, Callable

from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    QFedAvg,
    Strategy,
)

from fedcare.config import RunConfig
from fedcare.errors import ConfigError
from fedcare.models.base import Task
from fedcare.schemas import ARRAYS, CONFIG, NUM_EXAMPLES, TRAIN_LOSS

from .hetero import rank_scale
from .lora_strategy import LoraAwareStrategy
from .secagg import check_secagg_config


def _common(cfg: RunConfig) -> dict[str, Any]:
    n = cfg.strategy.min_sites
    return dict(fraction_train=cfg.strategy.fraction_train, fraction_evaluate=cfg.strategy.fraction_evaluate,
                min_train_nodes=n, min_evaluate_nodes=n, min_available_nodes=n, weighted_by_key=NUM_EXAMPLES,
                arrayrecord_key=ARRAYS, configrecord_key=CONFIG)


_BUILDERS: dict[str, Callable[[RunConfig], Strategy]] = {
    "fedavg": lambda cfg: FedAvg(**_common(cfg)),
    "fedprox": lambda cfg: FedProx(**_common(cfg), proximal_mu=cfg.strategy.proximal_mu),
    "fedadam": lambda cfg: FedAdam(**_common(cfg), eta=cfg.strategy.eta, eta_l=cfg.train.lr, tau=cfg.strategy.tau),
    "fedyogi": lambda cfg: FedYogi(**_common(cfg), eta=cfg.strategy.eta, eta_l=cfg.train.lr, tau=cfg.strategy.tau),
    "qfedavg": lambda cfg: QFedAvg(client_learning_rate=cfg.train.lr, q=cfg.strategy.q,
                                   train_loss_key=TRAIN_LOSS, **_common(cfg)),
    "fedmedian": lambda cfg: FedMedian(**_common(cfg)),
    "trimmedavg": lambda cfg: FedTrimmedAvg(**_common(cfg), beta=cfg.strategy.trim_beta),
    "krum": lambda cfg: Krum(**_common(cfg), num_malicious_nodes=cfg.strategy.krum_f),
}


def strategy_names() -> list[str]:
    return list(_BUILDERS)


def check_strategy_config(cfg: RunConfig, task: Task) -> None:
    """Raise ConfigError for an unknown name, an out-of-range parameter or a
    combination that makes no sense."""
    s = cfg.strategy
    if s.name not in _BUILDERS:
        raise ConfigError(f"unknown strategy '{s.name}'; choose one of: {', '.join(strategy_names())}")
    n_sites = task.fixed_sites or cfg.sites
    if s.name in ("fedadam", "fedyogi") and s.eta <= 0:
        raise ConfigError(f"strategy.eta must be positive for {s.name}")
    if s.name in ("fedadam", "fedyogi") and s.tau <= 0:
        raise ConfigError(f"strategy.tau must be positive for {s.name}")
    if s.name == "fedprox" and s.proximal_mu < 0:
        raise ConfigError("strategy.proximal_mu must be >= 0")
    if s.name == "qfedavg" and s.q < 0:
        raise ConfigError("strategy.q must be >= 0 (0 is FedAvg)")
    if s.name == "trimmedavg":
        if not 0 <= s.trim_beta < 0.5:
            raise ConfigError("strategy.trim_beta must be in [0, 0.5)")
        if int(s.trim_beta * n_sites) < 1:
            raise ConfigError(f"trimmedavg with strategy.trim_beta={s.trim_beta:g} trims nothing at "
                              f"{n_sites} sites (it would be FedAvg); set strategy.trim_beta >= "
                              f"{1 / n_sites:.3g}")
    if s.name == "krum" and s.krum_f < 0:
        raise ConfigError("strategy.krum_f must be >= 0")
    if s.screen_norm_factor < 0:
        raise ConfigError("strategy.screen_norm_factor must be >= 0 (0 = off)")
    mode = cfg.lora.aggregation
    if mode != "naive" and not task.uses_lora:
        raise ConfigError(f"lora.aggregation={mode} needs a LoRA task; task '{task.name}' trains all "
                          "parameters: use lora.aggregation=naive")
    ranks = cfg.lora_site_ranks
    if ranks:
        if not task.uses_lora:
            raise ConfigError(f"lora.site_ranks needs a LoRA task; task '{task.name}' has no adapter")
        if max(ranks) > cfg.lora.r:
            raise ConfigError(f"lora.site_ranks {cfg.lora.site_ranks} exceeds lora.r={cfg.lora.r}; "
                              "lora.r is the global rank, the largest a site may train")
        if mode == "ffa" and len(set(ranks)) > 1:
            raise ConfigError("lora.aggregation=ffa needs one rank at every site (each rank has its "
                              "own frozen A); drop lora.site_ranks or use exact or naive")
    if mode in ("ffa", "exact") and cfg.lora.personalize == "lora_B":
        raise ConfigError(f"lora.personalize=lora_B keeps B at the sites, which leaves nothing for "
                          f"lora.aggregation={mode} to aggregate; use naive or personalize=head")
    check_secagg_config(cfg, n_sites)


def build_strategy(cfg: RunConfig, task: Task) -> LoraAwareStrategy:
    """The run's strategy: Flower's rule by ``cfg.strategy.name``, LoRA-aware per
    ``cfg.lora.aggregation`` (see module docstring)."""
    check_strategy_config(cfg, task)
    base = _BUILDERS[cfg.strategy.name](cfg)
    return LoraAwareStrategy(base, lora_mode=cfg.lora.aggregation,
                             rank=cfg.lora.r if task.uses_lora else None,
                             rank_scale=rank_scale(cfg) if task.uses_lora else None)
