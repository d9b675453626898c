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
