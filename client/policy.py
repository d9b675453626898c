"""A site's policy: what the coordinator may run on this site's data.

The policy is a TOML file owned by the site (never sent by the server)::

    [privacy]
    epsilon_cap = 8.0            # lifetime epsilon cap of this site's data (0 = none)
    max_epsilon_per_run = 3.0    # refuse a run planned to spend more (0 = no limit)
    min_noise_multiplier = 0.8   # refuse weaker noise (0 = no limit)
    require_dp = true            # refuse runs without DP (sample- or client-level)
    require_client_level_dp = false
    require_secure_aggregation = false   # refuse runs without secure aggregation
    min_sites_in_sum = 0         # secure aggregation: never help unmask a sum of fewer sites

    [data]
    min_local_examples = 20      # refuse if the site has fewer training examples

    [code]
    allowed_tasks = ["heart-disease"]          # empty or absent: any task
    allowed_base_models = []                   # empty or absent: any base model
    allowed_fedcare_versions = ["0.1.0"]       # enforced when listed
    allowed_fab_hashes = []                    # enforced when listed

    [evaluation]
    send_group_counts = true     # false: evaluation replies carry no per-group counts
    min_group_size = 0           # suppress groups smaller than this (the run's value if higher)
    release = "noised"           # noised: counts with Gaussian noise, charged to the ledger
                                 # (client/release.py); exact: as computed; none: refuse evaluations
    evaluation_epsilon = 1.0     # epsilon of one noised evaluation (at the site's delta)
    max_evaluation_epsilon_per_run = 5.0   # refuse evaluations past this run's evaluation epsilon
    max_evaluations_per_run = 10 # refuse evaluations past this many in one run (0 = no limit)
    min_cell_size = 10           # refuse if the test split is smaller; suppress smaller groups
    evaluate_only_known_models = true   # evaluate only a model received for training in this
                                        # run, or a round's aggregate once after training in it

The policy is checked for every message kind (train, evaluate); a refusal is a normal
reply with the reason. Fault injection (``faults.*``) is refused at every deployed site.
Every list that is present and non-empty must contain the run's value (AND). The
policy's fingerprint is the sha256 of the file's bytes; it goes into every audit entry.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from fedcare.compat import tomllib
from fedcare.config import RunConfig
from fedcare.errors import ConfigError, PolicyRefusal

_SECTIONS: dict[str, dict[str, type]] = {
    "privacy": {"epsilon_cap": float, "max_epsilon_per_run": float, "min_noise_multiplier": float,
                "require_dp": bool, "require_client_level_dp": bool,
                "require_secure_aggregation": bool, "min_sites_in_sum": int},
    "data": {"min_local_examples": int},
    "code": {"allowed_tasks": list, "allowed_base_models": list,
             "allowed_fedcare_versions": list, "allowed_fab_hashes": list},
    "evaluation": {"send_group_counts": bool, "min_group_size": int, "release": str,
                   "evaluation_epsilon": float, "max_evaluation_epsilon_per_run": float,
                   "max_evaluations_per_run": int, "min_cell_size": int, "evaluate_only_known_models": bool},
}


@dataclass(frozen=True)
class SitePolicy:
    path: str = ""
    fingerprint: str = ""
    epsilon_cap: float = 0.0
    max_epsilon_per_run: float = 0.0
    min_noise_multiplier: float = 0.0
    require_dp: bool = False
    require_client_level_dp: bool = False
    require_secure_aggregation: bool = False   # refuse runs whose updates the coordinator would see
    min_sites_in_sum: int = 0      # secure aggregation: refuse to unmask a sum of fewer sites
    min_local_examples: int = 0
    allowed_tasks: tuple[str, ...] = ()
    allowed_base_models: tuple[str, ...] = ()
    allowed_fedcare_versions: tuple[str, ...] = ()
    allowed_fab_hashes: tuple[str, ...] = field(default=())
    send_group_counts: bool = True
    min_group_size: int = 0
    release: str = "noised"
    evaluation_epsilon: float = 1.0
    max_evaluation_epsilon_per_run: float = 5.0
    max_evaluations_per_run: int = 10
    min_cell_size: int = 10
    evaluate_only_known_models: bool = True

    # ------------------------------------------------------------------- loading
    @classmethod
    def load(cls, path: str | Path) -> "SitePolicy":
        path = Path(path)
        try:
            raw = path.read_bytes()
        except OSError as err:
            raise ConfigError(f"site policy {path} cannot be read: {err.strerror}") from None
        try:
            doc = tomllib.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
            raise ConfigError(f"site policy {path} is not valid TOML: {err}") from None
        values = _parse(doc, path)
        return cls(path=str(path), fingerprint=hashlib.sha256(raw).hexdigest(), **values)

    # ------------------------------------------------------------------- checking
    def check(self, cfg: RunConfig, app_identity: Mapping[str, str], num_local_examples: int) -> None:
        """Raise ``PolicyRefusal`` with the reason if this run may not use the site's data."""
        def refuse(reason: str) -> None:
            raise PolicyRefusal(f"site policy refuses the run: {reason}")

        if self.allowed_tasks and cfg.task not in self.allowed_tasks:
            refuse(f"task '{cfg.task}' is not in allowed_tasks {list(self.allowed_tasks)}")
        base = base_model_of(cfg)
        if self.allowed_base_models and base and base not in self.allowed_base_models:
            refuse(f"base model '{base}' is not in allowed_base_models {list(self.allowed_base_models)}")
        version = str(app_identity.get("fedcare_version", ""))
        if self.allowed_fedcare_versions and version not in self.allowed_fedcare_versions:
            refuse(f"fedcare version '{version or 'unknown'}' is not in allowed_fedcare_versions "
                   f"{list(self.allowed_fedcare_versions)}")
        fab = str(app_identity.get("fab_hash", ""))
        if self.allowed_fab_hashes and fab not in self.allowed_fab_hashes:
            refuse(f"app bundle hash '{fab or 'unknown'}' is not in allowed_fab_hashes")
        if num_local_examples < self.min_local_examples:
            refuse(f"the site has {num_local_examples} training examples, fewer than "
                   f"min_local_examples={self.min_local_examples}")
        level = cfg.dp.level
        if self.require_client_level_dp and level != "client":
            refuse(f"client-level DP is required (dp.level=client), the run has dp.level={level}")
        if self.require_dp and level == "none":
            refuse("differential privacy is required, the run has dp.level=none")
        if self.require_secure_aggregation and not cfg.secagg.enabled:
            refuse("secure aggregation is required (secagg.enabled=true); the run sends updates in the clear")
        if level != "sample" or not (self.min_noise_multiplier or self.max_epsilon_per_run or self.epsilon_cap):
            return
        from .privacy import plan_round

        noise = plan_round(cfg, num_local_examples).noise_multiplier
        if self.min_noise_multiplier and noise < self.min_noise_multiplier:
            refuse(f"noise multiplier {noise:.3g} is below min_noise_multiplier={self.min_noise_multiplier}")
        if not (self.max_epsilon_per_run or self.epsilon_cap):
            return
        _, epsilon = planned_sample_dp(cfg, num_local_examples)
        if self.max_epsilon_per_run and epsilon > self.max_epsilon_per_run * (1 + 1e-6):
            refuse(f"the run is planned to spend epsilon {epsilon:.3g} at this site, more than "
                   f"max_epsilon_per_run={self.max_epsilon_per_run}")
        if self.epsilon_cap and epsilon > self.epsilon_cap * (1 + 1e-6):
            refuse(f"the run alone is planned to spend epsilon {epsilon:.3g}, more than the "
                   f"site's epsilon_cap={self.epsilon_cap}")


def load_policy(path: str | Path | None) -> SitePolicy | None:
    """The site's policy, or None when the site has none (everything allowed)."""
    return SitePolicy.load(path) if path else None


def _parse(doc: Mapping[str, Any], path: Path) -> dict[str, Any]:
    known = {f.name for f in fields(SitePolicy)}
    out: dict[str, Any] = {}
    for section, value in doc.items():
        if section not in _SECTIONS or not isinstance(value, Mapping):
            raise ConfigError(f"site policy {path}: unknown section [{section}]; "
                              f"use {', '.join(f'[{s}]' for s in _SECTIONS)}")
        for key, raw in value.items():
            typ = _SECTIONS[section].get(key)
            if typ is None or key not in known:
                raise ConfigError(f"site policy {path}: unknown key '{key}' in [{section}]; "
                                  f"known: {', '.join(_SECTIONS[section])}")
            out[key] = _coerce(path, f"{section}.{key}", raw, typ)
    for key in ("epsilon_cap", "max_epsilon_per_run", "min_noise_multiplier", "min_local_examples", "min_sites_in_sum",
                "min_group_size", "evaluation_epsilon", "max_evaluation_epsilon_per_run",
                "max_evaluations_per_run", "min_cell_size"):
        if out.get(key, 0) < 0:
            raise ConfigError(f"site policy {path}: {key} must be >= 0")
    if out.get("release", "noised") not in ("noised", "exact", "none"):
        raise ConfigError(f"site policy {path}: evaluation.release must be noised, exact or none")
    return out


def _coerce(path: Path, key: str, raw: Any, typ: type) -> Any:
    bad = ConfigError(f"site policy {path}: {key} expects {typ.__name__}, got {raw!r}")
    if typ is bool:
        if not isinstance(raw, bool):
            raise bad
        return raw
    if typ is int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise bad
        return raw
    if typ is float:
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise bad
        return float(raw)
    if typ is str:
        if not isinstance(raw, str):
            raise bad
        return raw
    if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
        raise ConfigError(f"site policy {path}: {key} expects a list of strings, got {raw!r}")
    return tuple(raw)


def base_model_of(cfg: RunConfig) -> str:
    """The pretrained base model the run loads: ``lora.base_model`` when the run names
    one, else the task's default ('' for a model trained from scratch)."""
    from fedcare.models.registry import get_task

    override = getattr(cfg.lora, "base_model", "")
    return str(override or getattr(get_task(cfg.task), "base_model", "") or "")


def planned_sample_dp(cfg: RunConfig, num_local_examples: int) -> tuple[float, float]:
    """(noise multiplier, epsilon) DP-SGD will use at a site with this many training
    examples over the whole run, computed as the site's privacy engine and ledger do."""
    from .ledger import epsilon_of
    from .privacy import plan_round

    plan = plan_round(cfg, num_local_examples)
    run = [(plan.noise_multiplier, plan.sample_rate, plan.steps)] * cfg.rounds
    return plan.noise_multiplier, epsilon_of(run, cfg.dp.delta, cfg.dp.accountant)
