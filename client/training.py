"""One site round of local training, plain or under DP-SGD, with the site's budget and
ledger: the one function the ClientApp calls per train message."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedcare.config import RunConfig
from fedcare.errors import PrivacyError
from fedcare.models.base import SiteSplit, Task
from fedcare.models.training import TrainResult, make_optimizer, make_train_loader, train_steps

from .ledger import SiteLedger
from .privacy import DPPlan, check_training_moved, plan_round, private_round, snapshot_trainable


@dataclass
class TrainOutcome:
    result: TrainResult
    #: fedcare.schemas.PRIVACY_KEYS + "round_steps" (None without DP-SGD)
    privacy: dict[str, Any] | None


def train_on_site(task: Task, model: torch.nn.Module, split: SiteSplit, cfg: RunConfig, device: torch.device,
                  *, run_id: str, server_round: int, ledger: SiteLedger | None, budget: float,
                  dataset_id: str) -> TrainOutcome:
    """Train ``model`` (already on ``device``) for ``cfg.train.local_steps`` steps on the
    site's train split. Under ``dp.level=sample`` the site's budget is checked first (a
    round that would take the lifetime epsilon past ``budget`` raises PrivacyError before
    any training), and the round's spend is committed to the ledger before returning."""
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
                             after_first_step=lambda: check_training_moved(model, before, False, "after step 1"))
        return TrainOutcome(result, None)

    if ledger is None:
        raise PrivacyError("DP-SGD needs the site's privacy ledger (node config 'ledger', or "
                           "site.ledger_dir in simulation) so that the spend of every round is kept")
    plan = plan_round(cfg, len(split.train))
    check_budget(ledger, dataset_id, plan, budget)

    before = snapshot_trainable(model)
    optimizer = make_optimizer(model, cfg)
    spend_steps = 0
    try:
        with private_round(model, optimizer, split.train, plan, device, proximal_mu=proximal_mu) as dp:
            try:
                result = train_steps(task, model, dp.optimizer, dp.loader, plan.steps, device,
                                     after_first_step=lambda: check_training_moved(model, before, True, "after step 1"))
            finally:
                spend_steps = dp.steps_taken
    finally:
        # Whatever noisy steps touched the data are spent, even if the round fails later.
        if spend_steps:
            ledger.record(dataset_id, run_id, server_round, plan.noise_multiplier, plan.sample_rate,
                          spend_steps, plan.delta, plan.accountant, budget)
    if spend_steps != plan.steps:
        raise RuntimeError(f"DP-SGD accounted {spend_steps} steps, the round ran {plan.steps}")
    check_training_moved(model, before, True, f"in round {server_round}")
    return TrainOutcome(result, privacy_record(ledger, dataset_id, run_id, plan, budget))


def check_budget(ledger: SiteLedger, dataset_id: str, plan: DPPlan, budget: float) -> None:
    """Refuse (PrivacyError) a round whose planned steps would take the dataset's
    lifetime epsilon past ``budget`` (0 = no cap)."""
    if budget <= 0:
        return
    after = ledger.epsilon(dataset_id, plan.delta, plan.accountant, extra=[plan.event])
    if after > budget:
        spent = ledger.epsilon(dataset_id, plan.delta, plan.accountant)
        raise PrivacyError(f"site budget exceeded: spent {spent:.4g}, this round would reach {after:.4g} "
                           f"> cap {budget:g} (epsilon at delta {plan.delta:g}, {plan.accountant})")


def privacy_record(ledger: SiteLedger, dataset_id: str, run_id: str, plan: DPPlan, budget: float) -> dict[str, Any]:
    """The privacy numbers a train reply carries (fedcare.schemas.PRIVACY_KEYS)."""
    run_history = ledger.history(dataset_id, run_id)
    return {
        "epsilon": ledger.epsilon(dataset_id, plan.delta, plan.accountant),
        "run_epsilon": ledger.epsilon(dataset_id, plan.delta, plan.accountant, run_id=run_id),
        "delta": plan.delta,
        "budget": float(budget),
        "accountant": plan.accountant,
        "noise_multiplier": plan.noise_multiplier,
        "sample_rate": plan.sample_rate,
        "steps": int(sum(steps for _, _, steps in run_history)),
        "round_steps": plan.steps,
    }
