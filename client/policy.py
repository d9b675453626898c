"""A site's policy: what the coordinator may run on this site's data.

The policy is a TOML file owned by the site (never sent by the server)::

    [privacy]
    epsilon_cap = 8.0            # lifetime epsilon cap of this site's data (0 = none)
    max_epsilon_per_run = 3.0    # refuse a run planned to spend more (0 = no limit)
    min_noise_multiplier = 0.8   # refuse weaker noise (0 = no limit)
    require_dp = true            # refuse runs without record-level DP (DP-SGD here, dp.level=sample)
    accept_client_level_dp = false   # true: require_dp is also met by dp.level=client
    require_client_level_dp = false
    delta = 1e-5                 # the site's delta (0 or absent: min(1e-5, 1/(10 N)), N its
                                 # training records); a run may ask only for the same or smaller
    accountant = "prv"           # the site's accountant (absent: the run's); a run must use it
    require_secure_aggregation = false   # refuse runs without secure aggregation
    min_sites_in_sum = 0         # secure aggregation: never help unmask a sum of fewer sites

    [limits]                     # 0 or absent: no limit
    max_rounds_per_run = 100     # refuse longer runs
    max_local_steps = 1000       # refuse more optimiser steps per round
    max_batch_size = 256         # refuse larger training batches
    max_task_seconds = 3600      # stop a training task past this wall time, refuse it

    [data]
    min_local_examples = 20      # refuse if the site has fewer training examples

    [contract]                   # the data contract every run must carry (data.* keys; absent: any)
    labels = ["no disease", "disease"]         # or "no disease,disease": exactly these, in order
    features = ["age", "sex=f|m", "thalach"]   # a run may use these or fewer (same levels)
    image_size = 64              # image_size, text_length, prompt_template: exactly these
    # `fedcare site start --task T` checks the folder against it (--set may only narrow it)

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
Every epsilon the site checks (``max_epsilon_per_run``, ``epsilon_cap``, the ledger's
lifetime spend) is measured at the site's delta with the site's accountant, never at the
run's; the check bounds its own work (the limits first, then accounting whose memory is
capped, ``fedcare.accounting``), so any run is answered in bounded time and memory.
Every list that is present and non-empty must contain the run's value (AND). The
policy's fingerprint is the sha256 of the file's bytes; it goes into every audit entry.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from fedcare.accounting import accounting_note, epsilon_of, gaussian_noise_lower_bound
from fedcare.compat import tomllib
from fedcare.config import RunConfig
from fedcare.errors import ConfigError, PolicyRefusal
from fedcare.models.sitedata import Contract, parse_features

_SECTIONS: dict[str, dict[str, type]] = {
    "privacy": {"epsilon_cap": float, "max_epsilon_per_run": float, "min_noise_multiplier": float,
                "require_dp": bool, "require_client_level_dp": bool,
                "require_secure_aggregation": bool, "min_sites_in_sum": int,
                "accept_client_level_dp": bool, "delta": float, "accountant": str},
    "limits": {"max_rounds_per_run": int, "max_local_steps": int, "max_batch_size": int,
               "max_task_seconds": float},
    "data": {"min_local_examples": int},
    "contract": {f.name: str for f in fields(Contract)},   # parsed by _parse_contract
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
    accept_client_level_dp: bool = False
    delta: float = 0.0             # 0: derived from the site's record count (site_delta)
    accountant: str = ""           # "": the run's
    max_rounds_per_run: int = 0    # [limits]: 0 = no limit
    max_local_steps: int = 0
    max_batch_size: int = 0
    max_task_seconds: float = 0.0
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
    contract: tuple[tuple[str, str], ...] = ()   # [contract]: (data key, value as --set takes it)

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

        self.check_contract(cfg)
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
        self._check_limits(cfg, refuse)   # before any accounting: these cost nothing
        level = cfg.dp.level
        if self.require_client_level_dp and level != "client":
            refuse(f"client-level DP is required (dp.level=client), the run has dp.level={level}")
        if self.require_dp and level == "none":
            refuse("differential privacy is required, the run has dp.level=none")
        if self.require_dp and level == "client" and not (self.accept_client_level_dp or self.require_client_level_dp):
            refuse("record-level DP (DP-SGD at this site, dp.level=sample) is required; the run has "
                   "dp.level=client, noise the coordinator adds, which this policy does not accept "
                   "(accept_client_level_dp = false)")
        if level == "client" and self.min_noise_multiplier:
            noise = client_noise_at_least(cfg)
            if noise < self.min_noise_multiplier:
                refuse(f"client-level noise multiplier {noise:.3g} is below min_noise_multiplier="
                       f"{self.min_noise_multiplier}")
        if self.require_secure_aggregation and not cfg.secagg.enabled:
            refuse("secure aggregation is required (secagg.enabled=true); the run sends updates in the clear")
        if level == "sample":
            self._check_sample_dp(cfg, num_local_examples, refuse)

    def check_contract(self, cfg: RunConfig) -> None:
        """Raise ``PolicyRefusal`` if the run's data contract is not the site's
        ([contract]): a coordinator cannot relabel classes or read other columns."""
        reason = contract_conflict(self.contract, cfg)
        if reason:
            raise PolicyRefusal(f"site policy refuses the run: its data contract differs from the site's "
                                f"[contract]: {reason}")

    def contract_sets(self, sets: tuple[str, ...] | list[str]) -> tuple[str, ...]:
        """``site start``: the contract to check the folder against, as --set items: the
        policy's [contract], narrowed by ``sets``; a --set that widens or changes it is a
        ``ConfigError``."""
        merged = tuple(f"data.{key}={value}" for key, value in self.contract) + tuple(sets)
        reason = contract_conflict(self.contract, RunConfig().apply_sets(list(merged)))
        if reason:
            raise ConfigError(f"--set disagrees with the site policy {self.path} [contract]: {reason}")
        return merged

    def _check_limits(self, cfg: RunConfig, refuse) -> None:
        for value, limit, name, key in ((cfg.rounds, self.max_rounds_per_run, "rounds", "max_rounds_per_run"),
                                        (cfg.train.local_steps, self.max_local_steps, "train.local_steps",
                                         "max_local_steps"),
                                        (cfg.train.batch_size, self.max_batch_size, "train.batch_size",
                                         "max_batch_size")):
            if limit and value > limit:
                refuse(f"{name}={value} is more than the site's {key}={limit}")

    def _check_sample_dp(self, cfg: RunConfig, num_local_examples: int, refuse) -> None:
        """DP-SGD at this site: the run's delta and accountant against the site's, its
        noise against the floor, and its planned epsilon, measured at the site's delta
        with the site's accountant (bounded work), against the caps."""
        if self.delta and cfg.dp.delta > self.delta:
            refuse(f"dp.delta={cfg.dp.delta:g} is larger than the site's delta={self.delta:g}; "
                   "a run may ask only for the same or a smaller delta")
        if self.accountant and cfg.dp.accountant != self.accountant:
            refuse(f"dp.accountant={cfg.dp.accountant} is not the site's accountant={self.accountant}")
        if not (self.min_noise_multiplier or self.max_epsilon_per_run or self.epsilon_cap):
            return
        from .privacy import plan_round

        noise = plan_round(cfg, num_local_examples).noise_multiplier
        if self.min_noise_multiplier and noise < self.min_noise_multiplier:
            refuse(f"noise multiplier {noise:.3g} is below min_noise_multiplier={self.min_noise_multiplier}")
        if not (self.max_epsilon_per_run or self.epsilon_cap):
            return
        delta, accountant = self.site_delta(num_local_examples), self.site_accountant(cfg)
        events = planned_events(cfg, num_local_examples)
        epsilon = epsilon_of(events, delta, accountant)
        at = f" (at the site's delta {delta:g}, {accountant}){accounting_note(events, delta, accountant)}"
        if self.max_epsilon_per_run and epsilon > self.max_epsilon_per_run * (1 + 1e-6):
            refuse(f"the run is planned to spend epsilon {epsilon:.3g} at this site, more than "
                   f"max_epsilon_per_run={self.max_epsilon_per_run}{at}")
        if self.epsilon_cap and epsilon > self.epsilon_cap * (1 + 1e-6):
            refuse(f"the run alone is planned to spend epsilon {epsilon:.3g}, more than the "
                   f"site's epsilon_cap={self.epsilon_cap}{at}")

    # ------------------------------------------------------- the site's accounting
    def site_delta(self, num_local_examples: int) -> float:
        """The delta every epsilon of this site is measured at: the policy's, or
        min(1e-5, 1/(10 N)) for N training records."""
        return self.delta or min(1e-5, 1 / (10 * max(1, num_local_examples)))

    def site_accountant(self, cfg: RunConfig) -> str:
        """The policy's accountant, or the run's (each is an upper bound on epsilon)."""
        return self.accountant or cfg.dp.accountant


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
        if section == "contract":
            out["contract"] = _parse_contract(value, path)
            continue
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
    for key in ("max_rounds_per_run", "max_local_steps", "max_batch_size", "max_task_seconds"):
        if out.get(key, 0) < 0:
            raise ConfigError(f"site policy {path}: limits.{key} must be >= 0")
    if not 0 <= out.get("delta", 0.0) < 1:
        raise ConfigError(f"site policy {path}: privacy.delta must be in (0, 1), or 0 to derive it")
    if out.get("accountant", "") not in ("", "prv", "rdp"):
        raise ConfigError(f"site policy {path}: privacy.accountant must be prv or rdp")
    if out.get("release", "noised") not in ("noised", "exact", "none"):
        raise ConfigError(f"site policy {path}: evaluation.release must be noised, exact or none")
    return out


def _parse_contract(section: Mapping[str, Any], path: Path) -> tuple[tuple[str, str], ...]:
    """[contract] as (key, value) pairs in --set's form; labels and features may be a
    list of strings or one comma-separated string."""
    out = []
    for key, raw in section.items():
        if key not in _SECTIONS["contract"]:
            raise ConfigError(f"site policy {path}: unknown key '{key}' in [contract]; "
                              f"known: {', '.join(_SECTIONS['contract'])}")
        typ = int if key in ("image_size", "text_length") else str
        if key in ("labels", "features") and isinstance(raw, list):
            raw = ",".join(_coerce(path, f"contract.{key}", raw, list))
        value = _coerce(path, f"contract.{key}", raw, typ)
        if typ is int and value < 1:
            raise ConfigError(f"site policy {path}: contract.{key} must be at least 1")
        out.append((key, str(value)))
    try:
        Contract.from_config(RunConfig().apply_sets([f"data.{k}={v}" for k, v in out]))
    except ConfigError as err:
        raise ConfigError(f"site policy {path}: [contract]: {err}") from None
    return tuple(out)


def contract_conflict(contract: tuple[tuple[str, str], ...], cfg: RunConfig) -> str:
    """Why the run's data.* differs from a site's [contract] ('' if it does not): labels,
    image_size, text_length and prompt_template exactly; features the same or fewer,
    each with the same levels."""
    effective = Contract.from_config(cfg) if contract else None   # image_size 0: the family's default
    for key, want in contract:
        have = str(getattr(cfg.data, key) if key in ("labels", "features") else getattr(effective, key))
        if key == "labels":
            same = _names(have) == _names(want)
        elif key == "features":
            allowed = {f.name: f for f in parse_features(want)}
            same = bool(have.strip()) and all(allowed.get(f.name) == f for f in parse_features(have))
        else:
            same = have == want
        if not same:
            return f"data.{key} is '{have}', the site's contract says '{want}'" + \
                (" (or fewer of them)" if key == "features" else "")
    return ""


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


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


def planned_events(cfg: RunConfig, num_local_examples: int) -> list[tuple[float, float, int]]:
    """(noise multiplier, sample rate, steps) of every DP-SGD step the run plans at a
    site with this many training examples (``cfg.site_dp_steps``: the rounds' and any
    personal or alone-baseline steps), as its privacy engine will take them."""
    from .privacy import plan_round

    plan = plan_round(cfg, num_local_examples)
    return [(plan.noise_multiplier, plan.sample_rate, cfg.site_dp_steps)]


def planned_sample_dp(cfg: RunConfig, num_local_examples: int, delta: float | None = None,
                      accountant: str | None = None) -> tuple[float, float]:
    """(noise multiplier, epsilon) DP-SGD will use at a site with this many training
    examples over the whole run, computed as the site's privacy engine and ledger do, at
    ``delta`` with ``accountant`` (default: the run's)."""
    events = planned_events(cfg, num_local_examples)
    return events[0][0], epsilon_of(events, cfg.dp.delta if delta is None else delta,
                                    accountant or cfg.dp.accountant)


def client_noise_at_least(cfg: RunConfig) -> float:
    """A lower bound on the noise multiplier client-level DP will use: dp.noise_multiplier,
    or, for a target dp.epsilon over the rounds, the exact Gaussian mechanism's multiplier
    (the server's accountant calibrates to at least as much noise)."""
    if cfg.dp.epsilon > 0:
        return gaussian_noise_lower_bound(cfg.dp.epsilon, cfg.dp.delta, cfg.rounds)
    return float(cfg.dp.noise_multiplier)
