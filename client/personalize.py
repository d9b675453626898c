"""Personalisation at the site, and the benefit of joining as the site measures it.

``personalize.method`` chooses the site's personal model, which never leaves the site
(only its metrics do):

* ``finetune``: the global model fine-tuned for ``personalize.steps`` steps on the site's
  training split, at the last round's evaluation (``personalize.every_round``: at every
  evaluation), from the global model each time;
* ``personal_head`` (FedPer): the part ``strategies.personal.personal_split`` names
  (LoRA tasks: the head; a model that is all head: its output bias, the site's class
  prior) is kept at the site and trained with the shared part, never sent;
* ``ditto``: a whole personal model kept at the site; each round it takes
  ``personalize.steps`` steps on the site's data, then the proximal step of Ditto's
  regulariser (lambda/2)||v - w||^2 towards the global model w the site received,
  v <- (v + a w) / (1 + a) with a = lr x steps x lambda (one proximal step per round for
  the round's steps: a splitting of Ditto's per-step pull that needs no change to the
  training loop, and costs no privacy, since it does not read the data).

``personalize.alone`` adds the baseline a hospital compares with: a model trained on its
data alone, from the federation's initial model, ``train.local_steps`` steps per round
(equal compute).

Every step on the site's data goes through ``client.training.train_on_site``: under
DP-SGD it is a DP-SGD step at the run's noise multiplier and sample rate, refused past
the site's budget and written to its ledger. ``RunConfig.site_dp_steps`` counts them, so
the noise that ``plan_round`` calibrates makes all of them together reach dp.epsilon.

At each evaluation the site scores the global model, its personal model and the alone
model on its own test split (``models.benefit.bootstrap_metrics``: point metrics with
bootstrap intervals) with the class prevalence of that split (classes smaller than the
run's minimum group size suppressed, as every group count is); that is the benefit
record, the only thing of it that leaves.
"""
from __future__ import annotations

import copy
import json
from typing import Callable

import numpy as np
from flwr.app import Context

from fedcare import schemas as S
from fedcare.config import RunConfig
from fedcare.errors import PrivacyError
from fedcare.models.benefit import bootstrap_metrics
from fedcare.models.fairness import suppressed_groups
from fedcare.models.state import get_trainable_state, set_trainable_state
from fedcare.models.training import predict_dataset
from fedcare.records import from_array_record, to_array_record
from fedcare.strategies.personal import personal_split

from .ledger import SiteLedger
from .policy import load_policy
from .privacy import plan_round
from .training import train_on_site

DITTO, ALONE, INITIAL = "ditto", "alone", "personal_initial"   # what the site keeps in its Flower context
PERSONAL_ROUND_OFFSET = 1_000_000       # ledger rounds of personal steps (apart from the federated ones)
ALONE_ROUND_OFFSET = 2_000_000


def steps_config(cfg: RunConfig, num_train: int, steps: int, lr: float) -> RunConfig:
    """``cfg`` for ``steps`` steps of personal or alone training: plain FedAvg-style local
    steps at ``lr``; under DP-SGD at the run's own noise multiplier (calibrated for all the
    site's steps) and sample rate, so that ``train_on_site`` plans, charges and checks
    them exactly as it does a federated round."""
    out = copy.deepcopy(cfg)
    out.train.local_steps, out.train.lr, out.strategy.name = steps, lr or cfg.train.lr, "fedavg"
    if cfg.dp.level == "sample":
        out.dp.noise_multiplier, out.dp.epsilon = plan_round(cfg, num_train).noise_multiplier, 0.0
    return out


def local_training(site, model, split, steps: int, lr: float, rnd: int, budget: float) -> None:
    """``steps`` steps of ``model`` on the site's training split (DP-SGD and the ledger
    when the run uses them)."""
    cfg = steps_config(site.cfg, len(split.train), steps, lr)
    ledger = SiteLedger(site.ledger_path) if site.ledger_path else None
    train_on_site(site.task, model, split, cfg, site.device, run_id=site.cfg.runtime.run_id, server_round=rnd,
                  ledger=ledger, budget=budget, dataset_id=site.dataset_id, policy=load_policy(site.policy_path))


def before_training(site, context: Context, model, received: dict, rnd: int, budget: float) -> None:
    """A round's personal work before the federated training: Ditto's personal steps and
    the alone model's. ``model`` is left in any state; the caller loads the global next."""
    p, split = site.cfg.personalize, site.split()    # the site's own data (no audit canaries)
    if p.method == "ditto":
        start = _kept(context, DITTO) or received
        set_trainable_state(model, start, strict=False)
        local_training(site, model, split, site.cfg.personal_steps, p.lr, PERSONAL_ROUND_OFFSET + rnd, budget)
        a = (p.lr or site.cfg.train.lr) * site.cfg.personal_steps * p.ditto_lambda
        _keep(context, DITTO, ditto_pull(get_trainable_state(model), received, a))
    if p.alone:
        start = _kept(context, ALONE) or get_trainable_state(_initial_model(site))
        set_trainable_state(model, start, strict=False)
        local_training(site, model, split, site.cfg.train.local_steps, 0.0, ALONE_ROUND_OFFSET + rnd, budget)
        _keep(context, ALONE, get_trainable_state(model))


def ditto_pull(personal: dict, global_state: dict, a: float) -> dict:
    """The proximal step of (a/2)||v - w||^2 from v: (v + a w) / (1 + a), key by key
    (keys the global state lacks stay as they are)."""
    return {k: ((v + a * global_state[k]) / (1 + a)).astype(v.dtype) if k in global_state else v
            for k, v in personal.items()}


def benefit_fields(site, context: Context, model, load: Callable[[bool], None], split, rnd: int,
                   scores: np.ndarray, labels: np.ndarray, budget: float) -> dict[str, str]:
    """The evaluation's personal fields: LOCAL_METRICS_JSON (the personal model's metrics)
    and BENEFIT_JSON ({"global"|"personal"|"alone": metrics with intervals, prevalence in
    "global"}). ``load(personal)`` loads the global model (with the site's personal part)."""
    cfg = site.cfg
    p = cfg.personalize
    personal_part = bool(cfg.lora.personalize) or p.method == "personal_head"
    if not (p.method or p.alone or personal_part):
        return {}
    seed = cfg.seed * 1_000 + rnd
    benefit = {"global": {**bootstrap_metrics(scores, labels, p.bootstrap, seed),
                          **prevalence(labels, site.task.num_classes, cfg.site.min_group_size)}}
    personal = _personal_scores(site, context, model, load, split, rnd, budget)
    fields: dict[str, str] = {}
    if personal is not None:
        benefit["personal"] = bootstrap_metrics(personal, labels, p.bootstrap, seed)
        fields[S.LOCAL_METRICS_JSON] = json.dumps(site.task.metrics(personal, labels))
    alone = _kept(context, ALONE) if p.alone else None
    if alone is not None:
        set_trainable_state(model, alone, strict=False)
        benefit["alone"] = bootstrap_metrics(_predict(site, model, split), labels, p.bootstrap, seed)
    fields[S.BENEFIT_JSON] = json.dumps(benefit)
    return fields


def prevalence(labels: np.ndarray, num_classes: int, min_group_size: int) -> dict[str, float]:
    """``prevalence_<k>``: the share of class k in the test split, for the classes the
    fairness counts would publish (a class smaller than ``min_group_size``, and the
    complementary ones, left out)."""
    counts = np.bincount(np.asarray(labels).astype(int), minlength=num_classes)
    sizes = {str(k): int(c) for k, c in enumerate(counts)}
    hidden = suppressed_groups(sizes, min_group_size)
    n = max(1, int(counts.sum()))
    return {f"prevalence_{k}": c / n for k, c in sizes.items() if k not in hidden}


def _personal_scores(site, context, model, load, split, rnd: int, budget: float) -> np.ndarray | None:
    """The personal model's test scores, or None when this evaluation has none (finetune
    before the last round, no personal part yet, or the site's budget refused the steps)."""
    cfg, p = site.cfg, site.cfg.personalize
    if p.method == "finetune":
        if not (p.every_round or rnd >= cfg.rounds):
            return None
        load(False)
        try:
            local_training(site, model, split, cfg.personal_steps, p.lr, PERSONAL_ROUND_OFFSET + rnd, budget)
        except PrivacyError:
            return None
        return _predict(site, model, split)
    if p.method == "ditto":
        kept = _kept(context, DITTO)
        if kept is None:
            return None
        set_trainable_state(model, kept, strict=False)
        return _predict(site, model, split)
    if context.state.get("personal") is None:    # personal_head / lora.personalize: before the first round
        return None
    load(True)
    return _predict(site, model, split)


def initial_personal(site, context: Context) -> dict:
    """The part the sites keep, as the federation's initial model holds it: what the global
    model has there, since no site sends it. Loaded under the shared part when the global
    model is evaluated (not a site's own part left in the model) and before a site's first
    training; computed once per site and kept in its context."""
    kept = _kept(context, INITIAL)
    if kept is None:
        state = get_trainable_state(_initial_model(site))
        _, keys = personal_split(state, site.cfg)
        kept = {k: state[k] for k in keys}
        _keep(context, INITIAL, kept)
    return kept


def _predict(site, model, split) -> np.ndarray:
    return predict_dataset(site.task, model, split.test, site.cfg, site.device)[0]


def _initial_model(site):
    """The federation's initial model (the task's model built with the run's seed)."""
    cfg = copy.deepcopy(site.cfg)
    if site.lora_rank:
        cfg.lora.r = site.lora_rank
    return site.task.build_model(cfg)


def _kept(context: Context, key: str) -> dict | None:
    rec = context.state.get(key)
    return dict(from_array_record(rec)) if rec is not None else None


def _keep(context: Context, key: str, state: dict) -> None:
    context.state[key] = to_array_record(state)
