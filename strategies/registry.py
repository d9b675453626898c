"""Strategies by name: ``build_strategy(cfg, task)`` -> the run's ``Strategy``.

A strategy is a rule (``rules.py``: FedAvg, FedAdam, FedMedian, Krum...) with its
parameters from the run config, the LoRA mode it runs in (``lora.aggregation``) and,
under ``dp.level=client``, client-level DP around it; ``aggregate.aggregate`` applies
it to a round's updates. Allowed combinations:

- any rule x ``naive``; any rule x ``ffa`` / ``exact`` on a LoRA task
  (robust and adaptive rules then run on B alone, or on the products B A);
- ``ffa`` / ``exact`` on a task without LoRA, or with ``lora.personalize=lora_B``
  (B stays at the sites, so there is no product to average and nothing of the
  adapter but A to share): ConfigError.

``fedprox``: the server side is FedAvg; the training message carries ``proximal-mu``
and the client adds the proximal term. Adding a rule: its function in ``rules.py`` and
one line in ``_RULES`` (with its checks in ``check_strategy_config``).
"""
from __future__ import annotations

from functools import partial
from typing import Callable

from fedcare.config import RunConfig
from fedcare.errors import ConfigError
from fedcare.models.base import Task

from . import rules
from .aggregate import Strategy
from .client_dp import client_dp_of
from .hetero import rank_scale
from .lora_strategy import LoraPlan
from .rules import Rule
from .secagg import check_secagg_config

_RULES: dict[str, Callable[[RunConfig], Rule]] = {
    "fedavg": lambda cfg: Rule("fedavg", rules.fedavg),
    "fedprox": lambda cfg: Rule("fedprox", rules.fedavg, train_config={"proximal-mu": cfg.strategy.proximal_mu}),
    "fedadam": lambda cfg: Rule("fedadam", rules.fedavg,
                                partial(rules.adam_step, eta=cfg.strategy.eta, tau=cfg.strategy.tau)),
    "fedyogi": lambda cfg: Rule("fedyogi", rules.fedavg,
                                partial(rules.yogi_step, eta=cfg.strategy.eta, tau=cfg.strategy.tau)),
    "qfedavg": lambda cfg: Rule("qfedavg", partial(rules.qfedavg, q=cfg.strategy.q, client_lr=cfg.train.lr)),
    "fedmedian": lambda cfg: Rule("fedmedian", rules.median),
    "trimmedavg": lambda cfg: Rule("trimmedavg", partial(rules.trimmed_mean, beta=cfg.strategy.trim_beta)),
    "krum": lambda cfg: Rule("krum", partial(rules.krum, f=cfg.strategy.krum_f)),
}


def strategy_names() -> list[str]:
    return list(_RULES)


def check_strategy_config(cfg: RunConfig, task: Task) -> None:
    """Raise ConfigError for an unknown name, an out-of-range parameter or a
    combination that makes no sense."""
    s = cfg.strategy
    if s.name not in _RULES:
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


def build_strategy(cfg: RunConfig, task: Task) -> Strategy:
    """The run's strategy: the rule by ``cfg.strategy.name``, LoRA-aware per
    ``cfg.lora.aggregation``, with client-level DP under ``dp.level=client``."""
    check_strategy_config(cfg, task)
    lora = LoraPlan(cfg.lora.aggregation, cfg.lora.r, rank_scale(cfg)) if task.uses_lora else LoraPlan()
    return Strategy(_RULES[cfg.strategy.name](cfg), lora,
                    client_dp_of(cfg) if cfg.dp.level == "client" else None)
