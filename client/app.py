"""fedcare's ClientApp: decode the message, run the site's work, encode the reply.

Only the trainable tensors (LoRA adapter + head, or a small model's parameters) and
aggregate numbers ever leave the site. A refusal (privacy budget, site policy) is a
normal reply with status "refused" and the reason, so the server records it and the
round goes on with the other sites.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedcare import __version__, schemas as S
from fedcare.errors import FedcareError, PolicyRefusal, public_reason
from fedcare.models.state import get_trainable_state, set_trainable_state, state_nbytes
from fedcare.models.training import predict_dataset
from fedcare.records import from_array_record, to_array_record
from fedcare.secagg import STEPS

from . import faults
from .site import Site

log = logging.getLogger("fedcare.client")
app = ClientApp()


def _boundary(kind: str):
    """The site's error boundary: whatever a handler raises that it did not refuse itself
    (a bug, a library's error quoting the data) becomes a refusal with a fixed reason,
    the details kept in the site's log and audit log."""
    def wrap(handler):
        @functools.wraps(handler)
        def run(msg: Message, context: Context) -> Message:
            try:
                return handler(msg, context)
            except Exception as err:
                return _refuse_unexpected(msg, context, kind, err)
        return run
    return wrap


@app.train()
@_boundary("train")
def train(msg: Message, context: Context) -> Message:
    site = Site.from_context(context)
    rnd = int(msg.content[S.CONFIG].get("server-round", 0))
    run_id = site.cfg.runtime.run_id
    policy = _policy(site)
    evaluation = None
    try:
        split = _own_split(site, policy)
        _admit(site, policy, len(split.train))
        faults.before_training(site.cfg.faults, site.site_id, site.cfg.strategy.round_timeout)
        model = site.model()
        _remember(site, policy, rnd, msg)
        if msg.content[S.CONFIG].get(S.EVALUATE_FIRST):   # the last round's model, before training on
            evaluation = _riding_evaluation(site, policy, model, split, msg, context, rnd - 1)
        split = _with_canaries(site, context, split)
        received = _load_global(site, model, msg, context)
        if site.cfg.personalize.method == "ditto" or site.cfg.personalize.alone:
            from .personalize import before_training

            before_training(site, context, model, received, rnd, _budget(site, policy))
            received = _load_global(site, model, msg, context)
        from .ledger import SiteLedger
        from .training import train_on_site

        ledger = SiteLedger(site.ledger_path) if site.ledger_path else None
        outcome = train_on_site(
            site.task, model, split, site.cfg, site.device,
            run_id=run_id, server_round=rnd, ledger=ledger,
            budget=_budget(site, policy), dataset_id=site.dataset_id, policy=policy,
        )
    except FedcareError as err:
        return _refuse(msg, site, policy, rnd, "train", err, evaluation)

    state = get_trainable_state(model)
    shared = _shared_part(site, state, context)
    shared = faults.corrupt_update(site.cfg.faults, site.site_id, shared, received, site.cfg.seed + rnd)
    metrics = MetricRecord({
        S.NUM_EXAMPLES: outcome.result.num_examples,
        S.TRAIN_LOSS: outcome.result.train_loss,
        S.DURATION_S: outcome.result.duration_s,
        S.UPDATE_BYTES: state_nbytes(shared),
    })
    info = {S.SITE_ID: site.site_id, S.STATUS: "ok", S.REASON: "", S.NONCE: _nonce(msg)}
    if outcome.privacy is not None:
        info[S.PRIVACY_JSON] = json.dumps(outcome.privacy)
    if site.lora_rank:
        info[S.LORA_RANK] = site.lora_rank
    if site.worker:
        info[S.WORKER] = site.worker
    if site.cfg.secagg.enabled:   # nothing leaves in the clear: public keys now, the masked input later
        from .secagg_app import begin

        records, metrics[S.UPDATE_BYTES], ddp = begin(msg, context, site, policy, rnd, shared, received,
                                                      outcome.result.num_examples)
        if ddp is not None:   # the site's own hospital-level accountant, in its reply and audit log
            metrics["secagg_epsilon"] = ddp
        _audit(site, policy, rnd, "train", _digest(shared), state_nbytes(shared), outcome.privacy, "masked",
               "" if ddp is None else f"distributed DP epsilon {ddp:.4g} after {rnd} rounds")
        _remember(site, policy, rnd, None)   # it takes part in this round's sum
        return _reply(msg, records, metrics, info, evaluation)
    arrays = to_array_record(shared)
    _audit(site, policy, rnd, "train", _digest(shared), state_nbytes(shared), outcome.privacy, "sent", "")
    _remember(site, policy, rnd, None)
    return _reply(msg, {S.ARRAYS: arrays}, metrics, info, evaluation)


@app.evaluate()
@_boundary("evaluate")
def evaluate(msg: Message, context: Context) -> Message:
    site = Site.from_context(context)
    rnd = int(msg.content[S.CONFIG].get("server-round", 0))
    policy = _policy(site)
    try:
        split = _own_split(site, policy)
        _admit(site, policy, len(split.train))
        metrics, fields = _evaluation(site, policy, site.model(), split, msg, context, rnd)
    except FedcareError as err:
        return _refuse(msg, site, policy, rnd, "evaluate", err)
    info = {S.SITE_ID: site.site_id, S.STATUS: "ok", S.REASON: "", S.NONCE: _nonce(msg), **fields}
    return Message(RecordDict({S.METRICS: MetricRecord(metrics), S.SITE: ConfigRecord(info)}), reply_to=msg)


@_boundary("secagg")
def _secagg_step(msg: Message, context: Context) -> Message:
    """A later step of a securely aggregated round (client/secagg_app.py)."""
    from .secagg_app import step

    site = Site.from_context(context)
    rnd = int(msg.content[S.CONFIG].get("server-round", 0))
    try:
        records = step(msg, context, site)
    except FedcareError as err:
        return _refuse(msg, site, _policy(site), rnd, msg.metadata.message_type, err)
    return _reply(msg, records, None, {S.SITE_ID: site.site_id, S.STATUS: "ok", S.REASON: "", S.NONCE: _nonce(msg)})


for _step in STEPS:   # train.secagg_share, train.secagg_mask, train.secagg_unmask
    app.train(_step)(_secagg_step)


def _reply(msg: Message, records, metrics, info: dict, evaluation: dict | None = None) -> Message:
    records = dict(records.items())
    if metrics is not None:
        records[S.METRICS] = metrics
    records[S.SITE] = ConfigRecord(info)
    if evaluation is not None:
        records[S.EVALUATION] = ConfigRecord(evaluation)
    return Message(RecordDict(records), reply_to=msg)


def _evaluation(site: Site, policy, model, split, msg: Message, context: Context,
                rnd: int) -> tuple[dict, dict[str, str]]:
    """The global model of ``msg`` evaluated on the site's test split: (metrics with the
    example count, the JSON fields an evaluation carries: per-group counts as the policy
    allows, the personalised model's metrics, the privacy audit after the last round),
    recorded in the site's audit log as sent for round ``rnd``. Under a policy's noised
    release (client/release.py) only what noisy counts give leaves, charged to the
    ledger first; a refusal raises ``PolicyRefusal``. ``model`` is left with whatever
    state it was evaluated in; the caller loads what it needs next."""
    from fedcare.models.fairness import site_counts

    from . import release

    rules = release.Rules.of(policy, site.cfg.site.min_group_size, len(split.train))
    noised = rules is not None and rules.release != "exact"
    run_id = site.cfg.runtime.run_id
    if rules is not None:   # a policy's caps, known models and minimum cell apply whatever the release
        state = _release_state(site)
        digest = _digest(from_array_record(msg.content[S.ARRAYS]))
        release.admit(rules, state, run_id, rnd, digest, len(split.test))
        if not noised:
            state.remember_evaluation(run_id, rnd, digest)
    _load_global(site, model, msg, context, personal=False)
    scores, labels = predict_dataset(site.task, model, split.test, site.cfg, site.device)
    metrics = {S.NUM_EXAMPLES: len(labels), **site.task.metrics(scores, labels)}  # also drains a task's extras
    fields: dict[str, str] = {}
    audit = _privacy_audit(site, context, split, model, rnd)
    if audit is not None:
        fields[S.AUDIT_JSON] = json.dumps(audit)
    fairness = None
    if noised:
        from .ledger import SiteLedger

        z = release.noise_multiplier(rules.epsilon, rules.delta)
        ledger = SiteLedger(site.ledger_path) if site.ledger_path else None
        release.charge(rules, ledger, site.dataset_id, run_id, rnd, z)
        state.remember_evaluation(run_id, rnd, digest)
        metrics, fairness = release.noised_release(scores, labels, split.groups, rules, z, site.site_id)
    elif policy is None or policy.send_group_counts:
        min_group = max(site.cfg.site.min_group_size, getattr(policy, "min_group_size", 0),
                        getattr(policy, "min_cell_size", 0))
        fairness = site_counts(scores, labels, split.groups, min_group, site.site_id)
        if rnd >= site.cfg.rounds:   # the generalisation gap, once: the same counts on the training split
            from .generalisation import train_split_counts

            train = train_split_counts(site, model, split, min_group)
            if train is not None:
                fairness["train"] = train
    if fairness is not None:
        fields[S.FAIRNESS_JSON] = json.dumps(fairness)
    if not noised:   # personal and alone models' numbers cannot be derived from noised counts
        from .personalize import benefit_fields

        fields.update(benefit_fields(site, context, model,
                                     lambda personal: _load_global(site, model, msg, context, personal=personal),
                                     split, rnd, scores, labels, _budget(site, policy)))
    payload = json.dumps({"metrics": metrics, "fairness": fairness}, sort_keys=True).encode()
    _audit(site, policy, rnd, "evaluate", hashlib.sha256(payload).hexdigest(), len(payload), None, "sent", "")
    return metrics, fields


def _riding_evaluation(site: Site, policy, model, split, msg: Message, context: Context,
                       rnd: int) -> dict[str, str] | None:
    """The evaluation a train reply carries, or None when the site refuses it (audited;
    the training goes on)."""
    try:
        metrics, evaluation = _evaluation(site, policy, model, split, msg, context, rnd)
    except FedcareError as err:
        _audit(site, policy, rnd, "evaluate", "", 0, None, "refused", str(err))
        return None
    evaluation[S.METRICS_JSON] = json.dumps(metrics)
    return evaluation


def _release_state(site: Site):
    from .release import ReleaseState

    return ReleaseState.beside(site.ledger_path or site.audit_path, site.site_id)


def _remember(site: Site, policy, rnd: int, msg: Message | None) -> None:
    """At a site with a policy: the global state ``msg`` brings for training (None: that
    the site sent its update of round ``rnd``), for evaluate_only_known_models."""
    state = _release_state(site) if policy is not None else None
    if state is None:
        return
    if msg is None:
        state.remember_trained(site.cfg.runtime.run_id, rnd)
    else:
        state.remember_model(site.cfg.runtime.run_id, rnd, _digest(from_array_record(msg.content[S.ARRAYS])))


# ----------------------------------------------------------------------------- helpers
def app_identity() -> dict[str, str]:
    """What a site policy can allow-list: the fedcare release that runs here."""
    return {"fedcare_version": __version__}


def _admit(site: Site, policy, num_train: int) -> None:
    """Raise ``PolicyRefusal`` if this site may not take part in the run at all: the
    same check for every message kind. Fault injection is for simulations only."""
    if site.cfg.faults.kind and not site.simulated:
        raise PolicyRefusal(f"fault injection (faults.kind={site.cfg.faults.kind}) runs only in simulation; "
                            "a deployed site refuses it")
    if policy is not None:
        policy.check(site.cfg, app_identity(), num_train)


def _own_split(site: Site, policy):
    """The site's split, read only for a run whose data contract the policy allows."""
    if policy is not None:
        policy.check_contract(site.cfg)
    return site.split()


def _policy(site: Site):
    if not site.policy_path:
        return None
    from .policy import load_policy

    return load_policy(site.policy_path)


def _budget(site: Site, policy) -> float:
    caps = [c for c in (site.cfg.site.budget, getattr(policy, "epsilon_cap", 0.0) or 0.0) if c > 0]
    return min(caps) if caps else 0.0


def _personal_keys(site: Site, state) -> set[str]:
    from fedcare.strategies.personal import personal_split

    _, personal = personal_split(state, site.cfg)
    return set(personal)


def _personal_state(context: Context):
    rec = context.state.get("personal")
    return from_array_record(rec) if rec is not None else None


def _shared_part(site: Site, state, context: Context):
    personal = _personal_keys(site, state)
    if personal:
        context.state["personal"] = to_array_record({k: state[k] for k in personal})
    return {k: v for k, v in state.items() if k not in personal}


def _load_global(site: Site, model, msg: Message, context: Context, personal: bool = True) -> dict:
    """Load the global shared state from the server (fitted to this site's LoRA rank),
    the site's own personal part on top; returns the global state as loaded."""
    state = dict(from_array_record(msg.content[S.ARRAYS]))
    if site.lora_rank:
        from fedcare.strategies.hetero import state_for_site_rank

        state = state_for_site_rank(state, site.lora_rank, site.cfg)
    received = dict(state)
    local = _personal_state(context) if personal else None
    if local:
        state.update(local)
    elif site.cfg.lora.personalize or site.cfg.personalize.method == "personal_head":
        from .personalize import initial_personal   # the global model's own value of the part sites keep

        state.update(initial_personal(site, context))
    set_trainable_state(model, state, strict=False)
    return received


def _digest(state) -> str:
    """sha256 over the names and bytes of the tensors that leave the site."""
    h = hashlib.sha256()
    for k, v in state.items():
        h.update(k.encode())
        h.update(v.tobytes())
    return h.hexdigest()


def _audit(site: Site, policy, rnd: int, kind: str, sha256: str, nbytes: int, privacy,
           decision: str, reason: str) -> None:
    if site.audit_path is None:
        return
    from .audit import AuditLog

    AuditLog(site.audit_path).append(
        site.cfg.runtime.run_id, rnd, kind,
        payload_sha256=sha256, nbytes=nbytes, epsilon=(privacy or {}).get("epsilon"),
        policy_fingerprint=getattr(policy, "fingerprint", ""), decision=decision, reason=reason,
    )


def _nonce(msg: Message) -> str:
    """The server's nonce for this round, echoed so a reply cannot be replayed later."""
    return str(msg.content[S.CONFIG].get(S.NONCE, ""))


def _with_canaries(site: Site, context: Context, split):
    """The privacy audit's canaries joined to the training split (at sites that audit)."""
    from .privacy_audit import site_canaries

    canaries = site_canaries(site, context, split, create=True)
    return canaries.join(split) if canaries is not None else split


def _privacy_audit(site: Site, context: Context, split, model, rnd: int) -> dict | None:
    from .privacy_audit import audit_final_round

    return audit_final_round(site, context, split, model, rnd)


def _refuse(msg: Message, site: Site, policy, rnd: int, kind: str, err: BaseException,
            evaluation: dict | None = None) -> Message:
    """Refuse with ``public_reason(err)``: the full detail goes to the site's log and its
    audit log, with the sha256 and size of the reason that was sent."""
    public = public_reason(err)
    detail = str(err) if isinstance(err, FedcareError) else f"{type(err).__name__}: {err}"
    log.warning("site %s refused %s of round %s: %s", site.site_id, kind, rnd, detail,
                exc_info=not isinstance(err, FedcareError))
    sent = public.encode()
    _audit(site, policy, rnd, kind, hashlib.sha256(sent).hexdigest(), len(sent), None, "refused", detail)
    return _refusal(msg, site, public, evaluation)


def _refuse_unexpected(msg: Message, context: Context, kind: str, err: Exception) -> Message:
    """A refusal for what a handler raised, audited where the site can still be resolved."""
    rnd = int(msg.content[S.CONFIG].get("server-round", 0)) if S.CONFIG in msg.content else 0
    try:
        site = Site.from_context(context)
        policy = _policy(site)
    except Exception:    # the site cannot even be resolved: no audit log to write
        log.exception("a %s message could not be handled: %s", kind, err)
        info = {S.SITE_ID: str(context.node_config.get("site-id", "")), S.STATUS: "refused",
                S.REASON: public_reason(err), S.NONCE: _nonce(msg) if S.CONFIG in msg.content else ""}
        return Message(RecordDict({S.SITE: ConfigRecord(info)}), reply_to=msg)
    return _refuse(msg, site, policy, rnd, kind, err)


def _refusal(msg: Message, site: Site, reason: str, evaluation: dict | None = None) -> Message:
    """A refusal; one of a train message may still carry the evaluation done before it."""
    info = ConfigRecord({S.SITE_ID: site.site_id, S.STATUS: "refused", S.REASON: reason, S.NONCE: _nonce(msg)})
    records = {S.SITE: info}
    if evaluation is not None:
        records[S.EVALUATION] = ConfigRecord(evaluation)
    return Message(RecordDict(records), reply_to=msg)
