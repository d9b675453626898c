"""One site round of local training, plain or under DP-SGD, with the site's budget and
ledger: the one function the ClientApp calls per train message."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from fedcare.config import RunConfig
from fedcare.errors import PolicyRefusal, PrivacyError
from fedcare.models.base import SiteSplit, Task
from fedcare.models.training import TrainResult, make_optimizer, make_train_loader, train_steps

from .ledger import SiteLedger
from .privacy import DPPlan, check_training_moved, plan_round, private_round, snapshot_trainable

if TYPE_CHECKING:   # annotation only: the policy module is not needed to train
    from .policy import SitePolicy


@dataclass
class TrainOutcome:
    result: TrainResult
    #: fedcare.schemas.PRIVACY_KEYS + "round_steps" (None without DP-SGD)
    privacy: dict[str, Any] | None


def train_on_site(task: Task, model: torch.nn.Module, split: SiteSplit, cfg: RunConfig, device: torch.device,
                  *, run_id: str, server_round: int, ledger: SiteLedger | None, budget: float,
                  dataset_id: str, policy: "SitePolicy | None" = None) -> TrainOutcome:
    """Train ``model`` (already on ``device``) for ``cfg.train.local_steps`` steps on the
    site's train split. Under ``dp.level=sample`` the site's budget is checked first (a
    round that would take the lifetime epsilon past ``budget``, or with a ``policy`` this
    run's epsilon past its ``max_epsilon_per_run``, is refused before any training), and
    the round's spend is committed to the ledger before returning. With a policy, every
    epsilon is measured at the site's delta with the site's accountant (the run's without
    one), and training past ``max_task_seconds`` stops and raises PolicyRefusal."""
    deadline = time.monotonic() + policy.max_task_seconds if policy is not None and policy.max_task_seconds else 0.0
    proximal_mu = cfg.strategy.proximal_mu if cfg.strategy.name == "fedprox" else 0.0
    seed = cfg.seed * 100_003 + server_round
    if cfg.dp.level != "sample":
        if budget > 0:
            raise PrivacyError(
                f"this site caps its privacy budget at epsilon {budget:g}, but the run trains without "
                f"DP-SGD at the site (dp.level={cfg.dp.level}), which has no finite record-level epsilon; "
                "run with dp.level=sample (dp.epsilon or dp.noise_multiplier)")
        model.train()
        before = snapshot_trainable(model)
        optimizer = make_optimizer(model, cfg)
        loader = make_train_loader(split.train, cfg, seed)
        result = train_steps(task, model, optimizer, loader, cfg.train.local_steps, device, proximal_mu=proximal_mu,
                             after_first_step=lambda: check_training_moved(model, before, False, "after step 1"),
                             deadline=deadline)
        return TrainOutcome(result, None)

    if ledger is None:
        raise PrivacyError("DP-SGD needs the site's privacy ledger (node config 'ledger', or "
                           "site.ledger_dir in simulation) so that the spend of every round is kept")
    plan = plan_round(cfg, len(split.train))
    delta = policy.site_delta(len(split.train)) if policy is not None else plan.delta
    accountant = policy.site_accountant(cfg) if policy is not None else plan.accountant
    check_budget(ledger, dataset_id, plan, budget, delta, accountant)
    if policy is not None and policy.max_epsilon_per_run:
        check_run_cap(ledger, dataset_id, run_id, plan, policy.max_epsilon_per_run, delta, accountant)

    before = snapshot_trainable(model)
    optimizer = make_optimizer(model, cfg)
    spend_steps = 0
    try:
        with private_round(model, optimizer, split.train, plan, device, proximal_mu=proximal_mu) as dp:
            try:
                result = train_steps(task, model, dp.optimizer, dp.loader, plan.steps, device,
                                     after_first_step=lambda: check_training_moved(model, before, True, "after step 1"),
                                     deadline=deadline)
            finally:
                spend_steps = dp.steps_taken
    finally:
        # Whatever noisy steps touched the data are spent, even if the round fails later.
        if spend_steps:
            ledger.record(dataset_id, run_id, server_round, plan.noise_multiplier, plan.sample_rate,
                          spend_steps, delta, accountant, budget)
    if spend_steps != plan.steps:
        raise RuntimeError(f"DP-SGD accounted {spend_steps} steps, the round ran {plan.steps}")
    check_training_moved(model, before, True, f"in round {server_round}")
    return TrainOutcome(result, privacy_record(ledger, dataset_id, run_id, plan, budget, delta, accountant))


def check_budget(ledger: SiteLedger, dataset_id: str, plan: DPPlan, budget: float,
                 delta: float, accountant: str) -> None:
    """Refuse (PrivacyError) a round whose planned steps would take the dataset's
    lifetime epsilon at ``delta`` past ``budget`` (0 = no cap)."""
    if budget <= 0:
        return
    after = ledger.epsilon(dataset_id, delta, accountant, extra=[plan.event])
    if after > budget:
        spent = ledger.epsilon(dataset_id, delta, accountant)
        raise PrivacyError(f"site budget exceeded: spent {spent:.4g}, this round would reach {after:.4g} "
                           f"> cap {budget:g} (epsilon at delta {delta:g}, {accountant})")


def check_run_cap(ledger: SiteLedger, dataset_id: str, run_id: str, plan: DPPlan, cap: float,
                  delta: float, accountant: str) -> None:
    """Refuse (PolicyRefusal) a round that would take this run's epsilon at the site past
    the policy's ``max_epsilon_per_run``: what the ledger holds of the run, not what the
    run's configuration announces (a coordinator can resume a run or repeat a round)."""
    after = ledger.epsilon(dataset_id, delta, accountant, run_id=run_id, extra=[plan.event])
    if after > cap * (1 + 1e-6):
        raise PolicyRefusal(f"site policy refuses the run: this round would take the run's epsilon at this "
                            f"site to {after:.4g}, more than max_epsilon_per_run={cap:g} "
                            f"(at the site's delta {delta:g}, {accountant})")


def privacy_record(ledger: SiteLedger, dataset_id: str, run_id: str, plan: DPPlan, budget: float,
                   delta: float, accountant: str) -> dict[str, Any]:
    """The privacy numbers a train reply carries (fedcare.schemas.PRIVACY_KEYS), at the
    delta and with the accountant the site measures with."""
    run_history = ledger.history(dataset_id, run_id)
    return {
        "epsilon": ledger.epsilon(dataset_id, delta, accountant),
        "run_epsilon": ledger.epsilon(dataset_id, delta, accountant, run_id=run_id),
        "delta": delta,
        "budget": float(budget),
        "accountant": accountant,
        "noise_multiplier": plan.noise_multiplier,
        "sample_rate": plan.sample_rate,
        "steps": int(sum(steps for _, _, steps in run_history)),
        "round_steps": plan.steps,
    }
