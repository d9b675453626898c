"""The run report (``fedcare report RUN_ID --json``) and the run listing.

``build_report(store, run_id)`` returns one JSON-serialisable dict (no numpy types;
NaN/inf are null). Its keys are a contract; add keys, never rename them::

    run_id, task, strategy, status, config, code_version,
    created_at, started_at, ended_at (unix seconds, UTC), message,
    rounds_planned, rounds_done, sites, dp,
    rounds: [ {
        round, started_at, ended_at, duration_s, num_sites, num_accepted, state_sha256,
        metrics: {<aggregated train metrics, flat, as the strategy reported them>,
                  "eval": {<"global" federated evaluation metrics of this round; {} if none>},
                  "eval_local": {<"global" local (personalised) evaluation metrics; {} if none>}},
        sites: [ {site, node_id, num_examples, train_loss, update_bytes, duration_s,
                  accepted (bool), status (accepted|rejected|refused|failed), reason,
                  metrics, privacy (the dict the site sent, or null)} ],
        evaluations: [ {scope ("global" | site id), kind ("federated" | "local"),
                        num_examples, metrics} ],
        fairness: {<the fairness JSON the server stored for this round; {} if none>} } ],
    final: {round (of the latest round with a federated evaluation; null if none),
            metrics: {<global federated metrics of that round>},
            per_site: {site: {<federated metrics of the global model on that site's test split>}},
            local_metrics: {<global metrics of the personalised models>} ({} if none),
            local_per_site: {site: {<metrics of that site's personalised model>}} ({} if none),
            worst_sites: [{site, metric, value}] (the WORST_SITES sites of per_site lowest in
                accuracy, worst first; [] without per-site accuracy)},
    privacy: {site: {epsilon, run_epsilon, delta, budget, accountant, noise_multiplier,
                     sample_rate, steps}}  ({} without DP)
        from the latest round in which that site reported privacy; ``steps`` is the
        DP-SGD steps the site took in this run: its latest "steps" (the site ledger's
        total for the run), else the sum of its per-round "round_steps",
    secure_aggregation: {clip, bits, min_sites_in_sum, threshold, survivors: {round: n},
                         epsilon, delta}  (secagg.enabled only; {} otherwise): epsilon is the
        distributed-DP epsilon after the latest round (null without distributed DP),
    client_privacy: {epsilon, delta, accountant, noise_multiplier, clipping_norm,
                     releases, round}  (client-level DP only; {} otherwise): the server
        accountant's epsilon for a whole site's participation, after the latest release,
    privacy_audit: {site: {accountant_epsilon (the site's run epsilon, null without DP),
                           epsilon_lower_bound, canaries, guesses, correct, delta, confidence,
                           round, exceeds (bound > accountant: a privacy bug)}}  ({} without
        an audit): the site's empirical lower bound (client/privacy_audit.py) next to what
        its accountant claims; evaluations of kind "audit" hold the same records per round,
    fairness: {<latest non-empty round fairness JSON, as stored>} ({} if none),
    benefit: {round (the latest round with benefit numbers), level (of the intervals),
              sites: {site: {n, prevalence: {class: share of the site's test split}
                             (classes the site suppressed are absent),
                             global|personal|alone: {metric: {value, lo, hi}}}}}
        ({} unless the run personalises or trains the alone baseline): each site's own
        test split scored with the global model, its personal model and the model it
        trained alone (client/personalize.py), bootstrap intervals computed at the site,
    events: [ {time, kind, message, data} ]
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

from fedcare.models.benefit import CI_METRICS, LEVEL
from fedcare.schemas import AUDIT, AUDIT_KEYS, BENEFIT, BENEFIT_MODELS, PRIVACY_KEYS

from .store import Store, clean_json

GLOBAL = "global"
WORST_SITES = 5
FEDERATED = "federated"
LOCAL = "local"


def build_report(store: Store, run_id: str) -> dict:
    run = store.get_run(run_id)            # StoreError for an unknown id
    rounds = store.rounds(run_id)
    site_rounds = store.site_rounds(run_id)
    evaluations = store.evaluations(run_id)

    sites_by_round: dict[int, list[dict]] = defaultdict(list)
    for x in site_rounds:
        sites_by_round[x["round"]].append(_without_round(x))
    evals_by_round: dict[int, list[dict]] = defaultdict(list)
    for e in evaluations:
        evals_by_round[e["round"]].append(_without_round(e))

    report_rounds = []
    for r in rounds:
        evals = evals_by_round.get(r["round"], [])
        metrics = dict(r["metrics"])
        metrics["eval"] = _pick(evals, GLOBAL, FEDERATED)
        metrics["eval_local"] = _pick(evals, GLOBAL, LOCAL)
        report_rounds.append(dict(
            round=r["round"], started_at=r["started_at"], ended_at=r["ended_at"],
            duration_s=_duration(r["started_at"], r["ended_at"]),
            num_sites=r["num_sites"], num_accepted=r["num_accepted"], state_sha256=r["state_sha256"],
            metrics=metrics, sites=sites_by_round.get(r["round"], []), evaluations=evals,
            fairness=r["fairness"] or {},
        ))

    report = dict(
        run_id=run["run_id"], task=run["task"], strategy=run["strategy"], status=run["status"],
        config=run["config"], code_version=run["code_version"], created_at=run["created_at"],
        started_at=run["started_at"], ended_at=run["ended_at"], message=run["message"],
        rounds_planned=run["rounds_planned"], rounds_done=run["rounds_done"], sites=run["sites"],
        dp=run["dp"], rounds=report_rounds, final=final_metrics(evaluations),
        privacy=privacy_summary(site_rounds),
        client_privacy=client_privacy_summary(rounds, run["config"]),
        secure_aggregation=secure_aggregation_summary(rounds, run["config"]),
        privacy_audit=privacy_audit_summary(evaluations, site_rounds),
        fairness=next((r["fairness"] for r in reversed(rounds) if r["fairness"]), {}),
        benefit=benefit_summary(evaluations),
        events=store.events(run_id),
    )
    # no clean_json pass over the whole report: the store wrote JSON already cleaned
    # (clean_json at write), and columns are plain floats/ints (about 6 s saved at 1,000 x 50)
    return report


def final_metrics(evaluations: list[dict]) -> dict:
    """The ``final`` block from evaluation rows (any order)."""
    federated_rounds = [e["round"] for e in evaluations if e["kind"] == FEDERATED]
    local_rounds = [e["round"] for e in evaluations if e["kind"] == LOCAL]
    out: dict[str, Any] = dict(round=None, metrics={}, per_site={}, local_metrics={}, local_per_site={})
    if federated_rounds:
        last = max(federated_rounds)
        rows = [e for e in evaluations if e["round"] == last and e["kind"] == FEDERATED]
        out["round"] = last
        out["metrics"] = next((e["metrics"] for e in rows if e["scope"] == GLOBAL), {})
        out["per_site"] = {e["scope"]: e["metrics"] for e in rows if e["scope"] != GLOBAL}
    out["worst_sites"] = worst_sites(out["per_site"])
    if local_rounds:
        last = max(local_rounds)
        rows = [e for e in evaluations if e["round"] == last and e["kind"] == LOCAL]
        out["local_metrics"] = next((e["metrics"] for e in rows if e["scope"] == GLOBAL), {})
        out["local_per_site"] = {e["scope"]: e["metrics"] for e in rows if e["scope"] != GLOBAL}
    return out


def worst_sites(per_site: dict[str, dict], metric: str = "accuracy", n: int = WORST_SITES) -> list[dict]:
    """The ``n`` sites lowest in ``metric``, worst first (what a report of 1,000 sites names)."""
    scored = sorted((m[metric], site) for site, m in per_site.items() if isinstance(m.get(metric), (int, float)))
    return [dict(site=site, metric=metric, value=value) for value, site in scored[:n]]


def benefit_summary(evaluations: list[dict]) -> dict:
    """The ``benefit`` block from evaluation rows (any order): every site's benefit
    numbers of the latest round that has any."""
    prefix = BENEFIT + ":"
    rows = [e for e in evaluations if e["kind"].startswith(prefix)]
    if not rows:
        return {}
    last = max(e["round"] for e in rows)
    sites: dict[str, dict] = {}
    for e in sorted((e for e in rows if e["round"] == last), key=lambda e: (e["scope"], e["kind"])):
        model, m = e["kind"][len(prefix):], e["metrics"]
        if model not in BENEFIT_MODELS:
            continue
        entry = sites.setdefault(e["scope"], {"n": e["num_examples"], "prevalence": {}})
        if model == "global":
            entry["prevalence"] = {k.removeprefix("prevalence_"): v for k, v in m.items()
                                   if k.startswith("prevalence_")}
        entry[model] = {k: {"value": m[k], "lo": m.get(f"{k}_lo"), "hi": m.get(f"{k}_hi")}
                        for k in CI_METRICS if m.get(k) is not None}
    return {"round": last, "level": LEVEL, "sites": dict(sorted(sites.items()))}


def privacy_summary(site_rounds: list[dict]) -> dict[str, dict]:
    """Per site: PRIVACY_KEYS from its latest round that carried privacy. ``steps`` is
    the site's own count of this run's DP-SGD steps (its ledger's total, which also
    covers a round whose reply never arrived); a site that does not send "steps" gets
    the sum of its per-round "round_steps"."""
    latest: dict[str, dict] = {}
    round_steps: dict[str, float] = defaultdict(float)
    for x in sorted(site_rounds, key=lambda x: x["round"]):
        p = x.get("privacy")
        if not p:
            continue
        latest[x["site"]] = p
        if p.get("round_steps") is not None:
            round_steps[x["site"]] += float(p["round_steps"])
    out = {}
    for site, p in sorted(latest.items()):
        entry = {k: p.get(k) for k in PRIVACY_KEYS}
        if entry["steps"] is None and site in round_steps:
            entry["steps"] = int(round_steps[site])
        out[site] = entry
    return out


def privacy_audit_summary(evaluations: list[dict], site_rounds: list[dict]) -> dict[str, dict]:
    """Per audited site: its latest audit record beside its accountant's run epsilon."""
    privacy = privacy_summary(site_rounds)
    out: dict[str, dict] = {}
    for e in sorted((e for e in evaluations if e["kind"] == AUDIT), key=lambda e: e["round"]):
        claimed = privacy.get(e["scope"], {}).get("run_epsilon")
        bound = e["metrics"].get("epsilon_lower_bound")
        out[e["scope"]] = dict(accountant_epsilon=claimed, **{k: e["metrics"].get(k) for k in AUDIT_KEYS},
                               round=e["round"], exceeds=bool(claimed is not None and bound is not None
                                                              and bound > claimed))
    return dict(sorted(out.items()))


def client_privacy_summary(rounds: list[dict], config: dict) -> dict:
    """Client-level DP (dp.level=client): the server accountant's epsilon after the
    latest round that released an aggregate ({} otherwise). The strategy reports it in
    the round metrics as client_epsilon, client_noise_multiplier, client_clipping_norm."""
    released = [r for r in rounds if r["metrics"].get("client_epsilon") is not None]
    if not released:
        return {}
    last, dp = released[-1]["metrics"], config.get("dp") or {}
    return dict(epsilon=last["client_epsilon"], delta=dp.get("delta"), accountant=dp.get("accountant"),
                noise_multiplier=last.get("client_noise_multiplier"),
                clipping_norm=last.get("client_clipping_norm"), releases=len(released),
                round=released[-1]["round"])


def secure_aggregation_summary(rounds: list[dict], config: dict) -> dict:
    """Secure aggregation (secagg.enabled; {} otherwise): the run's clipping, bits and
    threshold, the survivors whose inputs made each round's sum, and the distributed-DP
    epsilon after the latest round (the coordinator's accountant, server/secagg.py)."""
    sa = config.get("secagg") or {}
    if not sa.get("enabled"):
        return {}
    m = [r["metrics"] for r in rounds]
    eps = [x["secagg_epsilon"] for x in m if x.get("secagg_epsilon") is not None]
    return dict(clip=sa.get("clip"), bits=sa.get("bits"), min_sites_in_sum=sa.get("min_sites_in_sum"),
                threshold=next((x["secagg_threshold"] for x in reversed(m) if "secagg_threshold" in x), None),
                survivors={r["round"]: r["metrics"].get("secagg_survivors") for r in rounds},
                epsilon=eps[-1] if eps else None, delta=(config.get("dp") or {}).get("delta") if eps else None)


def list_runs(store: Store) -> list[dict]:
    """The runs for ``fedcare runs --json``: newest first, JSON-serialisable, without
    the config tree (``fedcare report`` has it)."""
    keys = ("run_id", "task", "strategy", "status", "created_at", "started_at", "ended_at",
            "rounds_done", "rounds_planned", "sites", "dp", "code_version", "message")
    return clean_json([{k: r[k] for k in keys} for r in store.list_runs()])


def _without_round(row: dict) -> dict:
    out = dict(row)
    del out["round"]
    return out


def _pick(evals: list[dict], scope: str, kind: str) -> dict:
    return next((e["metrics"] for e in evals if e["scope"] == scope and e["kind"] == kind), {})


def _duration(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else end - start
