"""The run configuration: one typed tree with dotted keys, validated once.

``RunConfig`` is the single source of defaults. The Flower app's
``[tool.flwr.app.config]`` mirrors ``RunConfig().to_flat()`` (a test keeps them in
step); ``--set key=value`` on the command line and Flower's run config use the same
dotted names (``lora.r``, ``train.local_steps``...). The whole tree is stored with
each run.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from .errors import ConfigError


@dataclass
class DataConfig:
    dirichlet_alpha: float = 1.0   # label skew across virtual sites (smaller = more skewed)
    max_train_per_site: int = 0    # 0 = all; small values keep tests and demos fast
    max_test_per_site: int = 0
    test_fraction: float = 0.2     # for tasks that re-split their corpus
    path: str = ""                 # a site's own data folder (deployment); "" = bundled copy
    site_paths: str = ""           # simulation: each virtual site's own folder, "a=/data/a,b=/data/b" (--site)
    # the run's data contract (task families; "" / 0 = the preset's or family's default):
    labels: str = ""               # label names in order, comma-separated
    features: str = ""             # tabular: "age,sex,cp=1|2|3|4" (name = numeric, name=a|b = categorical)
    image_size: int = 0            # image: pixels per side every image is resized to
    text_length: int = 0           # text: tokens per text; instruction tuning: prompt tokens
    prompt_template: str = ""      # instruction tuning: e.g. "Question: {prompt}" ("" = the prompt as is)


TRAIN_MODES = ("lora", "head", "full")


@dataclass
class TrainConfig:
    local_steps: int = 100         # optimiser steps per round at each site
    batch_size: int = 4
    lr: float = 1e-3
    optimizer: str = "adam"        # adam | sgd | adamw
    eval_batch_size: int = 64
    mode: str = "lora"             # lora (adapter + head) | head (frozen encoder, head only) | full (all parameters)
    head_lr: float = 0.0           # learning rate of the non-LoRA trainable tensors (the head); 0 = train.lr


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: str = "query,value"   # comma-separated module names
    aggregation: str = "naive"            # naive | ffa | exact
    personalize: str = ""                 # "" | head | lora_B : part each site keeps local
    site_ranks: str = ""                  # simulation: rank per virtual site, e.g. "4,8,16,8" ("" = all lora.r)
    base_model: str = ""                  # HF model dir or name for tasks that accept one ("" = bundled)


@dataclass
class DPConfig:
    level: str = "none"            # none | sample (DP-SGD at each site) | client (server-side)
    epsilon: float = 0.0           # target epsilon for this run (0 = use noise_multiplier)
    delta: float = 1e-5
    max_grad_norm: float = 1.0     # per-sample clipping norm (sample) / update clip (client)
    noise_multiplier: float = 0.0  # used when epsilon is 0
    accountant: str = "prv"        # prv | rdp


@dataclass
class StrategyConfig:
    name: str = "fedavg"
    proximal_mu: float = 0.01      # fedprox
    eta: float = 0.01              # server learning rate: fedadam, fedyogi
    tau: float = 1e-3              # fedadam, fedyogi: adaptivity (larger: closer to server momentum)
    q: float = 0.1                 # qfedavg
    trim_beta: float = 0.25        # trimmedavg: fraction trimmed at each end (>= 1/sites)
    krum_f: int = 1                # krum: number of malicious sites tolerated
    min_sites: int = 2             # a round needs at least this many accepted updates
    fraction_train: float = 1.0    # share of the connected sites sampled to train each round
    fraction_evaluate: float = 1.0  # share sampled to evaluate (at least min_sites either way)
    round_timeout: float = 1800.0  # seconds to wait for replies in a round
    screen_norm_factor: float = 0.0  # reject updates with norm > factor x round median (0 = off)
    evaluate_with_train: bool = False  # sites evaluate the incoming global model in the train
                                       # message (one message per site per round, not two); the
                                       # last round's model is still evaluated on its own


@dataclass
class SiteConfig:
    budget: float = 0.0            # simulation: every virtual site's epsilon cap (0 = none)
    min_group_size: int = 5        # fairness: smaller groups are suppressed
    ledger_dir: str = ""           # simulation: folder of the virtual sites' ledgers


@dataclass
class FaultConfig:
    """Fault injection, to exercise the federation's defences in tests and drills: the
    named virtual site misbehaves. kind: nan | shape | scale | sign | random (a bad or
    hostile update), crash (the site errors), hang (the site never answers)."""

    site: str = ""
    kind: str = ""
    scale: float = 100.0


@dataclass
class AuditConfig:
    """Empirical privacy audit (client/privacy_audit.py): each audited site mixes
    ``canaries`` synthetic examples, each with probability 1/2, into its training data
    and bounds epsilon from below after the run. In deployment a site opts in with its
    node config ``audit-canaries``; these keys then only set guesses and confidence."""

    canaries: int = 0              # simulation: canaries per audited site (0 = no audit)
    sites: str = ""                # simulation: comma-separated audited sites ("" = all)
    guesses: int = 0               # guesses per site, half "in", half "out" (0 = every canary)
    confidence: float = 0.95       # of the lower bound
    planted_bug: str = ""          # simulation tests only: no_noise | no_clip (DP-SGD broken, accountant unaware)


@dataclass
class PersonalizeConfig:
    """Personalisation and the benefit of joining (client/personalize.py): each site keeps
    a personal model that never leaves it, and reports, on its own test split, the global
    model, its personal model and (``alone``) a model trained on its data alone at equal
    compute, with bootstrap intervals. Under DP-SGD every personal and alone step is a
    DP-SGD step charged to the site's ledger, and the noise is calibrated so that all the
    site's steps together reach dp.epsilon (``RunConfig.site_dp_steps``)."""

    method: str = ""               # "" | finetune | personal_head | ditto
    steps: int = 0                 # personal steps (finetune: per fine-tuning; ditto: per round); 0 = train.local_steps
    every_round: bool = False      # finetune: at every evaluation, not only the last round's
    lr: float = 0.0                # personal steps' learning rate (0 = train.lr)
    ditto_lambda: float = 0.1      # ditto: pull of the personal model toward the global one
    alone: bool = False            # also train and report a model on the site's data alone (equal compute)
    bootstrap: int = 500           # bootstrap resamples of the test split for the intervals


PERSONALIZE_METHODS = ("", "finetune", "personal_head", "ditto")


@dataclass
class SecAggConfig:
    """Secure aggregation (fedcare/secagg.py): the coordinator sees only the sum of the
    sites' clipped, quantized, masked updates; distributed DP when epsilon or
    noise_multiplier is set (Skellam noise added at each site, delta = dp.delta)."""

    enabled: bool = False
    clip: float = 1.0              # L2 norm each site clips its update (new - received) to
    bits: int = 16                 # quantization bits per coordinate
    threshold: int = 0             # shares to unmask (0 = degree // 2 + 1)
    degree: int = 0                # neighbours per site (0 = all up to 16 sites, else ~4 log2 n)
    weight_cap: int = 1024         # a site's weight is min(examples, cap) (1 under distributed DP)
    min_sites_in_sum: int = 0      # fewest sites a released sum may hold (>= strategy.min_sites)
    epsilon: float = 0.0           # distributed DP target over the run (0 = noise_multiplier)
    noise_multiplier: float = 0.0  # total noise std / L2 sensitivity (0 with epsilon 0: no DP)


@dataclass
class RuntimeConfig:
    """Set by the fedcare CLI for one Flower run; not part of the stored experiment."""

    run_id: str = ""
    db: str = ""
    start_round: int = 1
    sites_file: str = ""     # JSON {node id: site id} written when site keys are registered


@dataclass
class RunConfig:
    task: str = "heart-disease"
    rounds: int = 3
    sites: int = 4
    seed: int = 42
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    site: SiteConfig = field(default_factory=SiteConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    personalize: PersonalizeConfig = field(default_factory=PersonalizeConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    # ----------------------------------------------------------------- flat keys
    def to_flat(self, include_runtime: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                if f.name == "runtime" and not include_runtime:
                    continue
                for sub in fields(value):
                    out[f"{f.name}.{sub.name}"] = getattr(value, sub.name)
            else:
                out[f.name] = value
        return out

    def to_dict(self) -> dict[str, Any]:
        """The experiment as a nested dict (runtime excluded): what a run stores."""
        d = dataclasses.asdict(self)
        d.pop("runtime")
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def keys(cls) -> dict[str, type]:
        return {k: type(v) for k, v in cls().to_flat().items()}

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any], strict: bool = True) -> "RunConfig":
        cfg = cls()
        cfg.update(flat, strict=strict)
        return cfg

    @classmethod
    def from_dict(cls, nested: Mapping[str, Any]) -> "RunConfig":
        flat: dict[str, Any] = {}
        for k, v in nested.items():
            if isinstance(v, Mapping):
                flat.update({f"{k}.{sk}": sv for sk, sv in v.items()})
            else:
                flat[k] = v
        return cls.from_flat(flat)

    def update(self, flat: Mapping[str, Any], strict: bool = True) -> "RunConfig":
        known = self.keys()
        for key, raw in flat.items():
            if key not in known:
                if strict:
                    close = [k for k in known if k.split(".")[-1] == key.split(".")[-1]]
                    hint = f" (did you mean {close[0]}?)" if close else ""
                    raise ConfigError(
                        f"unknown setting '{key}'{hint}; `fedcare config keys` lists them"
                    )
                continue
            value = _coerce(key, raw, known[key])
            section, _, name = key.partition(".")
            if name:
                setattr(getattr(self, section), name, value)
            else:
                setattr(self, section, value)
        return self

    def apply_sets(self, assignments: list[str]) -> "RunConfig":
        """Apply ``key=value`` strings from ``--set``."""
        flat = {}
        for item in assignments:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"--set expects key=value, got '{item}'")
            flat[key.strip()] = value.strip()
        return self.update(flat)

    # ---------------------------------------------------------------- validation
    def validate(self) -> "RunConfig":
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(self.rounds >= 1, "rounds must be at least 1")
        need(self.sites >= 1, "sites must be at least 1")
        need(self.train.local_steps >= 1, "train.local_steps must be at least 1")
        need(self.train.batch_size >= 1, "train.batch_size must be at least 1")
        need(self.train.lr > 0, "train.lr must be positive")
        need(self.train.optimizer in ("adam", "adamw", "sgd"), "train.optimizer must be adam, adamw or sgd")
        need(self.train.mode in TRAIN_MODES, "train.mode must be lora, head or full")
        need(self.train.head_lr >= 0, "train.head_lr must be >= 0 (0 = train.lr)")
        need(self.train.mode == "lora" or (self.lora.aggregation == "naive" and not self.lora.site_ranks
                                           and not self.lora.personalize),
             f"train.mode={self.train.mode} trains no LoRA adapter: lora.aggregation must be naive and "
             "lora.site_ranks and lora.personalize empty (or use train.mode=lora)")
        need(self.data.dirichlet_alpha > 0, "data.dirichlet_alpha must be positive")
        need(0 < self.data.test_fraction < 1, "data.test_fraction must be in (0, 1)")
        need(self.data.image_size >= 0 and self.data.text_length >= 0,
             "data.image_size and data.text_length must be >= 0")
        need(self.lora.r >= 1, "lora.r must be at least 1")
        need(self.lora.aggregation in ("naive", "ffa", "exact"), "lora.aggregation must be naive, ffa or exact")
        need(self.lora.personalize in ("", "head", "lora_B"), "lora.personalize must be '', head or lora_B")
        try:
            ranks = self.lora_site_ranks
        except ValueError:
            raise ConfigError(f"lora.site_ranks must be comma-separated integers, got '{self.lora.site_ranks}'") from None
        need(all(r >= 1 for r in ranks), "lora.site_ranks must all be at least 1")
        dp = self.dp
        if dp.level == "none" and (dp.epsilon > 0 or dp.noise_multiplier > 0):
            dp.level = "sample"  # asking for an epsilon or a noise level means DP is on
        need(dp.level in ("none", "sample", "client"), "dp.level must be none, sample or client")
        need(dp.accountant in ("prv", "rdp"), "dp.accountant must be prv or rdp")
        if dp.level != "none":
            need(dp.max_grad_norm > 0, "dp.max_grad_norm (clipping norm) must be > 0")
            need(0 < dp.delta < 1, "dp.delta must be in (0, 1)")
            need(dp.epsilon >= 0 and dp.noise_multiplier >= 0, "dp.epsilon and dp.noise_multiplier must be >= 0")
            need(dp.epsilon > 0 or dp.noise_multiplier > 0,
                 "DP is on: set dp.epsilon (a target) or dp.noise_multiplier")
        need(self.strategy.min_sites >= 1, "strategy.min_sites must be at least 1")
        need(0 < self.strategy.fraction_train <= 1 and 0 < self.strategy.fraction_evaluate <= 1,
             "strategy.fraction_train and strategy.fraction_evaluate must be in (0, 1]")
        need(self.strategy.round_timeout > 0, "strategy.round_timeout must be positive")
        need(self.site.budget >= 0, "site.budget must be >= 0")
        need(self.faults.kind in ("", "nan", "shape", "scale", "sign", "random", "crash", "hang"),
             "faults.kind must be one of nan, shape, scale, sign, random, crash, hang")
        need(self.audit.canaries >= 0 and self.audit.guesses >= 0, "audit.canaries and audit.guesses must be >= 0")
        need(0 < self.audit.confidence < 1, "audit.confidence must be in (0, 1)")
        need(self.secagg.epsilon >= 0 and self.secagg.noise_multiplier >= 0,
             "secagg.epsilon and secagg.noise_multiplier must be >= 0")
        need(self.secagg.enabled or not (self.secagg.epsilon or self.secagg.noise_multiplier),
             "distributed DP (secagg.epsilon / secagg.noise_multiplier) needs secagg.enabled=true")
        need(self.audit.planted_bug in ("", "no_noise", "no_clip"), "audit.planted_bug must be '', no_noise or no_clip")
        p = self.personalize
        need(p.method in PERSONALIZE_METHODS, "personalize.method must be '', finetune, personal_head or ditto")
        need(not (p.method and self.lora.personalize),
             "personalize.method and lora.personalize both choose a personal part: set one "
             "(personalize.method=personal_head is lora.personalize=head on a LoRA task)")
        need(p.steps >= 0 and p.lr >= 0 and p.ditto_lambda >= 0, "personalize.steps, lr and ditto_lambda must be >= 0")
        need(p.bootstrap >= 0, "personalize.bootstrap must be >= 0 (0 = no intervals)")
        return self

    @property
    def personal_steps(self) -> int:
        return self.personalize.steps or self.train.local_steps

    @property
    def site_dp_steps(self) -> int:
        """DP-SGD steps one site takes over the whole run: the federated rounds', the
        personal model's and the alone baseline's. DP-SGD noise is calibrated for all of
        them together, so the site's epsilon for the run is dp.epsilon whatever it trains."""
        p, federated = self.personalize, self.rounds * self.train.local_steps
        personal = {"finetune": self.personal_steps * (self.rounds if p.every_round else 1),
                    "ditto": self.personal_steps * self.rounds}.get(p.method, 0)
        return federated + personal + (federated if p.alone else 0)

    @property
    def lora_site_ranks(self) -> list[int]:
        return [int(x) for x in self.lora.site_ranks.split(",") if x.strip()]

    @property
    def dp_enabled(self) -> bool:
        return self.dp.level != "none"


def flower_app_config_toml() -> str:
    """RunConfig's defaults as the ``[tool.flwr.app.config]`` tables of pyproject.toml."""
    import tomli_w

    nested: dict[str, Any] = {}
    for key, value in RunConfig().to_flat().items():
        section, _, name = key.partition(".")
        if name:
            nested.setdefault(section, {})[name] = value
        else:
            nested[key] = value
    text = "[tool.flwr.app.config]\n" + tomli_w.dumps({k: v for k, v in nested.items() if not isinstance(v, dict)})
    for section, values in nested.items():
        if isinstance(values, dict):
            text += f"\n[tool.flwr.app.config.{section}]\n" + tomli_w.dumps(values)
    return text


def _coerce(key: str, raw: Any, typ: type) -> Any:
    try:
        if typ is bool:
            if isinstance(raw, str):
                if raw.lower() in ("1", "true", "yes", "on"):
                    return True
                if raw.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(raw)
            return bool(raw)
        if typ is int:
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError(raw)
            return int(float(raw)) if isinstance(raw, str) and "." in raw else int(raw)
        if typ is float:
            return float(raw)
        return str(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"setting '{key}' expects {typ.__name__}, got '{raw}'") from None
