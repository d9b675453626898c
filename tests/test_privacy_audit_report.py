"""The privacy audit's record on the server side: stored per site, reported beside the
accountant's epsilon by ``fedcare report --json`` and the dashboard's query, with the
flag when the bound exceeds the accountant."""
from __future__ import annotations

import time

import pytest

from fedcare.schemas import ACCEPTED, AUDIT, Evaluation, RoundRecord, SiteRound
from fedcare.server import queries
from fedcare.server.report import build_report
from fedcare.server.store import Store


def _record(rnd: int, audits: dict[str, float], run_epsilon: dict[str, float | None]) -> RoundRecord:
    sites = [SiteRound(s, ACCEPTED, node_id=i, num_examples=10,
                       privacy=None if eps is None else {"epsilon": eps, "run_epsilon": eps, "delta": 1e-5,
                                                         "budget": 0.0, "accountant": "prv", "steps": 10})
             for i, (s, eps) in enumerate(run_epsilon.items())]
    evals = [Evaluation("global", {"accuracy": 0.7}, 20)]
    evals += [Evaluation(s, {"canaries": 52, "guesses": 52, "correct": 50, "epsilon_lower_bound": b,
                             "delta": 1e-5, "confidence": 0.95}, 0, kind=AUDIT) for s, b in audits.items()]
    return RoundRecord(round=rnd, started_at=time.time() - 1, ended_at=time.time(), metrics={}, sites=sites,
                       evaluations=evals, global_state=None)


@pytest.fixture
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'store.db'}")
    yield s
    s.close()


def test_report_and_dashboard_put_the_bound_beside_the_accountant_and_flag_a_bug(store):
    run_id = store.create_run("heart-disease", "fedavg", {"task": "heart-disease"}, "test")
    store.write_round(run_id, _record(1, {}, {"a": 0.5, "b": 0.5, "c": None}))
    store.write_round(run_id, _record(2, {"a": 0.3, "b": 2.2, "c": 1.7}, {"a": 1.0, "b": 1.0, "c": None}))

    audit = build_report(store, run_id)["privacy_audit"]
    assert audit["a"] == pytest.approx({"accountant_epsilon": 1.0, "epsilon_lower_bound": 0.3, "canaries": 52,
                                        "guesses": 52, "correct": 50, "delta": 1e-5, "confidence": 0.95,
                                        "round": 2, "exceeds": False})
    assert audit["b"]["exceeds"] is True                         # 2.2 > 1.0: a privacy bug
    assert audit["c"]["accountant_epsilon"] is None and audit["c"]["exceeds"] is False   # no DP: nothing claimed

    frame = queries.privacy_audit(store.engine, run_id).set_index("site")
    assert frame.loc["b", "exceeds"] and not frame.loc["a", "exceeds"] and not frame.loc["c", "exceeds"]
    assert frame.loc["a", "run_epsilon"] == 1.0 and frame.loc["b", "epsilon_lower_bound"] == 2.2
    assert queries.evaluation_kinds(store.engine, run_id) == ["federated"]   # the audit is no evaluation curve


def test_a_run_without_audit_reports_none(store):
    run_id = store.create_run("heart-disease", "fedavg", {"task": "heart-disease"}, "test")
    store.write_round(run_id, _record(1, {}, {"a": 0.5}))
    assert build_report(store, run_id)["privacy_audit"] == {}
    assert queries.privacy_audit(store.engine, run_id).empty


# ------------------------------------------------------- the site's ClientApp handlers
def test_a_deployed_site_that_opts_in_trains_with_canaries_and_sends_only_the_bound(tmp_path, identity):
    import json
    import shutil
    from pathlib import Path

    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from fedcare import schemas as S
    from fedcare.client import app as client_app
    from fedcare.client.privacy_audit import STATE_KEY
    from fedcare.config import RunConfig
    from fedcare.records import to_array_record
    from fedcare.server.federation import initial_state

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(Path(__file__).resolve().parent.parent / "data" / "heart-disease" / "processed.cleveland.data", data)
    cfg = RunConfig.from_flat({"task": "heart-disease", "rounds": 2, "train.local_steps": 3}).validate()
    cfg.runtime.run_id = "run-audit-test"
    ctx = Context(run_id=7, node_id=11, state=RecordDict(), run_config=cfg.to_flat(),
                  node_config={"site-id": "cleveland", "data-path": str(data), "ledger": str(tmp_path / "l.db"),
                               "audit-canaries": 13})

    def send(kind: str, rnd: int) -> Message:
        msg = Message(RecordDict({S.ARRAYS: to_array_record(initial_state(cfg)),
                                  S.CONFIG: ConfigRecord({"server-round": rnd})}), dst_node_id=11, message_type=kind)
        return getattr(client_app, kind)(msg, ctx)

    first = send("train", 1)
    seed_record = ctx.state[STATE_KEY]                        # the secret stays in the site's context
    assert first.content[S.METRICS][S.NUM_EXAMPLES] > 199    # 199 records + the included canaries
    assert int(seed_record["canaries"]) == 13
    assert S.AUDIT_JSON not in send("evaluate", 1).content[S.SITE]     # not before the last round
    assert send("train", 2).content[S.METRICS][S.NUM_EXAMPLES] == first.content[S.METRICS][S.NUM_EXAMPLES]
    record = json.loads(send("evaluate", 2).content[S.SITE][S.AUDIT_JSON])
    assert set(record) == set(S.AUDIT_KEYS) and record["canaries"] == 13 and record["guesses"] == 13
    assert 0 <= record["correct"] <= 13 and record["epsilon_lower_bound"] >= 0

    ctx.run_config["audit.planted_bug"] = "no_noise"          # a run cannot plant a bug at a real site
    refused = send("train", 3).content[S.SITE]
    assert refused[S.STATUS] == "refused" and "simulation tests only" in refused[S.REASON]
