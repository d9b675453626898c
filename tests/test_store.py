"""The SQL store and the report, on SQLite and on PostgreSQL (fixture ``db_url``)."""
from __future__ import annotations

import json
import multiprocessing
import re
import time

import numpy as np
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from fedcare.errors import StoreError
from fedcare.models.state import state_sha256
from fedcare.schemas import ACCEPTED, PRIVACY_KEYS, REFUSED, REJECTED, Evaluation, RoundRecord, SiteRound
from fedcare.server import migrations
from fedcare.server.report import build_report, list_runs
from fedcare.server.store import Base, Store, default_db_url

CONFIG = {"task": "heart-disease", "rounds": 3, "sites": 3, "seed": 42,
          "dp": {"level": "sample", "epsilon": 3.0, "delta": 1e-5, "noise_multiplier": 0.0}}
SITES = ("site-0", "site-1", "site-2")


def make_state(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"linear.weight": rng.standard_normal((2, 13)).astype(np.float32),
            "linear.bias": rng.standard_normal(2).astype(np.float32)}


def make_record(rnd: int, *, refused: str | None = None, fairness: dict | None = None,
                local: bool = False) -> RoundRecord:
    sites = []
    for i, name in enumerate(SITES):
        if name == refused:
            sites.append(SiteRound(name, REFUSED, reason="budget 3.0 would be exceeded", node_id=100 + i))
            continue
        privacy = {"epsilon": 0.5 * rnd + i, "run_epsilon": 0.5 * rnd, "delta": 1e-5, "budget": 10.0,
                   "accountant": "prv", "noise_multiplier": 1.1, "sample_rate": 0.02,
                   "steps": 100 * rnd, "round_steps": 100}
        sites.append(SiteRound(name, ACCEPTED, node_id=100 + i, num_examples=50 + i,
                               train_loss=np.float32(0.7 - 0.1 * rnd), update_bytes=112,
                               duration_s=0.25, metrics={"accuracy": np.float64(0.6)}, privacy=privacy))
    evals = [Evaluation("global", {"accuracy": 0.5 + 0.1 * rnd, "loss": float("nan")}, 150)]
    evals += [Evaluation(s, {"accuracy": 0.4 + 0.1 * i}, 50) for i, s in enumerate(SITES)]
    if local:
        evals += [Evaluation("global", {"accuracy": 0.9}, 150, kind="local")]
        evals += [Evaluation(s, {"accuracy": 0.95}, 50, kind="local") for s in SITES]
    now = time.time()
    return RoundRecord(round=rnd, started_at=now - 2, ended_at=now,
                       metrics={"train_loss": np.float32(0.6), "num_accepted": 3},
                       sites=sites, evaluations=evals, global_state=make_state(rnd), fairness=fairness)


@pytest.fixture
def store(db_url):
    s = Store(db_url)
    yield s
    s.close()


def snapshot(store: Store, run_id: str) -> tuple:
    return (store.rounds(run_id), store.site_rounds(run_id), store.evaluations(run_id),
            store.last_round(run_id), {k: v.tolist() for k, v in (store.load_global_state(run_id) or {}).items()})


def test_round_trip(store):
    run_id = store.create_run("heart-disease", "fedavg", CONFIG, "0.1.0+abc")
    assert re.fullmatch(r"run-\d{8}-\d{4}-[0-9a-f]{6}", run_id)
    assert store.get_run(run_id)["status"] == "pending" and store.last_round(run_id) == 0
    assert store.load_global_state(run_id) is None
    store.set_status(run_id, "running")
    for rnd in (1, 2):
        store.write_round(run_id, make_record(rnd, refused="site-2" if rnd == 2 else None))
    assert store.last_round(run_id) == 2

    latest, first = store.load_global_state(run_id), store.load_global_state(run_id, round=1)
    for got, want in ((latest, make_state(2)), (first, make_state(1))):
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k])
    assert [r["state_sha256"] for r in store.rounds(run_id)] == [state_sha256(make_state(1)),
                                                                  state_sha256(make_state(2))]
    assert store.load_global_state(run_id, round=7) is None

    sr = store.site_rounds(run_id)
    assert len(sr) == 6
    refused = [x for x in sr if x["status"] == REFUSED]
    assert [(x["round"], x["site"], x["reason"], x["accepted"]) for x in refused] == \
        [(2, "site-2", "budget 3.0 would be exceeded", False)]
    ok = sr[0]
    assert ok["num_examples"] == 50 and ok["update_bytes"] == 112 and ok["node_id"] == "100"
    assert ok["train_loss"] == pytest.approx(0.6) and ok["privacy"]["accountant"] == "prv"
    evals = store.evaluations(run_id)
    assert len(evals) == 8 and evals[0]["scope"] == "global" and evals[0]["metrics"]["loss"] is None
    assert [e["round"] for e in store.evaluations(run_id, round=2)] == [2] * 4
    assert {x["site"] for x in store.site_rounds(run_id, round=1)} == set(SITES)

    store.add_event(run_id, "site_refused", "site-2 refused round 2", {"site": "site-2", "round": 2})
    store.set_status(run_id, "completed", "3 rounds")
    run = store.get_run(run_id)
    assert run["status"] == "completed" and run["message"] == "3 rounds"
    assert run["ended_at"] >= run["started_at"] >= run["created_at"]
    assert run["config"] == CONFIG and run["rounds_done"] == 2
    kinds = [e["kind"] for e in store.events(run_id)]
    assert kinds == ["site_refused"]
    assert store.events(run_id)[0]["data"] == {"site": "site-2", "round": 2}

    # resuming clears the end time; an unknown status is a bug, not a user error
    store.set_status(run_id, "running")
    assert store.get_run(run_id)["ended_at"] is None
    with pytest.raises(ValueError):
        store.set_status(run_id, "done")


def test_list_runs(store):
    a = store.create_run("heart-disease", "fedavg", CONFIG, "v1")
    b = store.create_run("medical-abstracts", "fedprox", {"rounds": 2, "sites": 4, "dp": {"level": "none"}},
                         "v2", run_id="run-custom", status="running")
    store.write_round(a, make_record(1))
    runs = store.list_runs()
    assert [r["run_id"] for r in runs] == [b, a]          # newest first
    for r in runs:
        for key in ("run_id", "task", "strategy", "status", "started_at", "ended_at", "rounds_done",
                    "rounds_planned", "sites", "dp", "code_version"):
            assert key in r
    by_id = {r["run_id"]: r for r in runs}
    assert (by_id[a]["rounds_done"], by_id[a]["rounds_planned"], by_id[a]["sites"]) == (1, 3, 3)
    assert by_id[a]["dp"] == "sample eps=3" and by_id[b]["dp"] == "none"
    assert by_id[b]["rounds_done"] == 0 and by_id[b]["started_at"] is not None
    assert by_id[a]["started_at"] is None and by_id[a]["status"] == "pending"
    json.dumps(list_runs(store), allow_nan=False)
    with pytest.raises(StoreError, match="already exists"):
        store.create_run("heart-disease", "fedavg", CONFIG, "v1", run_id="run-custom")


def test_duplicate_round_changes_nothing(store):
    run_id = store.create_run("heart-disease", "fedavg", CONFIG, "v1")
    store.write_round(run_id, make_record(1))
    before = snapshot(store, run_id)
    again = make_record(1, refused="site-0")
    again.global_state = make_state(99)
    with pytest.raises(StoreError, match="round 1 .* already stored"):
        store.write_round(run_id, again)
    assert snapshot(store, run_id) == before

    # a failure after the round row is written (two rows for one site) rolls back everything
    bad = make_record(2)
    bad.sites.append(bad.sites[0])
    with pytest.raises(StoreError):
        store.write_round(run_id, bad)
    assert snapshot(store, run_id) == before
    store.write_round(run_id, make_record(2))   # the store is still usable
    assert store.last_round(run_id) == 2


def test_unknown_run(store):
    with pytest.raises(StoreError, match="no run 'nope'"):
        store.get_run("nope")
    with pytest.raises(StoreError, match="no run 'nope'"):
        store.write_round("nope", make_record(1))
    with pytest.raises(StoreError, match="no run 'nope'"):
        build_report(store, "nope")


def test_corrupted_state_detected(store):
    run_id = store.create_run("heart-disease", "fedavg", CONFIG, "v1")
    store.write_round(run_id, make_record(1))
    with store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE global_states SET sha256 = :h"), {"h": "0" * 64})
    with pytest.raises(StoreError, match="corrupted"):
        store.load_global_state(run_id)


@pytest.mark.parametrize("url", [
    "sqlite:////nonexistent-dir/x.db",
    "postgresql+psycopg://postgres:s3cret@127.0.0.1:1/x",
    "not a url",
    "nosuchdb://host/x",
])
def test_bad_url(url):
    with pytest.raises(StoreError) as info:
        Store(url)
    msg = str(info.value)
    assert msg.startswith("cannot connect to database") and "\n" not in msg
    assert "s3cret" not in msg


@pytest.mark.postgres
def test_plain_postgresql_url_uses_psycopg(postgres_url):
    plain = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    with Store(plain) as store:
        assert store.engine.dialect.driver == "psycopg"
        assert store.list_runs() == []


def test_older_schema_is_migrated(db_url):
    engine = sa.create_engine(db_url)
    migrations.upgrade(engine, "0001")
    assert migrations.current_revision(engine) == "0001"
    with engine.begin() as conn:   # a run written by the older fedcare
        conn.execute(sa.text(
            "INSERT INTO runs (run_id, task, strategy, status, config, code_version, dp, created_at, message) "
            "VALUES ('run-old', 'heart-disease', 'fedavg', 'completed', '{\"rounds\": 3}', 'v0', 'none', 1.0, '')"))
    engine.dispose()
    with Store(db_url) as store:
        assert migrations.current_revision(store.engine) == migrations.head_revision() != "0001"
        indices = {ix["name"] for ix in sa.inspect(store.engine).get_indexes("site_rounds")}
        assert "ix_site_rounds_run_site_round" in indices
        assert store.get_run("run-old")["config"] == {"rounds": 3}
        store.write_round("run-old", make_record(1))
        assert store.last_round("run-old") == 1


def _open_and_list(url: str, results) -> None:
    try:
        with Store(url) as store:
            results.put(("ok", store.list_runs()))
    except Exception as e:  # noqa: BLE001 - reported to the parent
        results.put(("error", repr(e)))


def test_concurrent_open_of_a_fresh_database(db_url):
    """The launcher, the ServerApp and the dashboard may open a new database at once:
    one migrates, the others wait and find it migrated."""
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_open_and_list, args=(db_url, results)) for _ in range(3)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert outcomes == [("ok", [])] * 3


def test_unknown_schema_refused(db_url):
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)"))
        conn.execute(sa.text("INSERT INTO alembic_version VALUES ('9999_from_the_future')"))
    engine.dispose()
    with pytest.raises(StoreError, match="revision '9999_from_the_future'.*does not know"):
        Store(db_url)


def test_models_match_migrations(store):
    """The ORM models and the Alembic revisions describe the same schema."""
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []


def test_report(store):
    run_id = store.create_run("heart-disease", "fedavg", CONFIG, "v1")
    store.set_status(run_id, "running")
    store.add_event(run_id, "started", "3 rounds")
    fairness = {"sex": {"by_group": {"0": {"accuracy": 0.8}, "1": {"accuracy": 0.7}},
                        "demographic_parity_difference": 0.1}, "by_site": {}}
    store.write_round(run_id, make_record(1, fairness={"sex": {"old": True}}))
    store.write_round(run_id, make_record(2, refused="site-1", fairness=fairness, local=True))
    store.write_round(run_id, make_record(3, refused="site-2"))   # no fairness this round
    store.set_status(run_id, "completed")
    report = build_report(store, run_id)
    json.dumps(report, allow_nan=False)   # serialisable, no NaN

    for key in ("run_id", "task", "strategy", "status", "config", "started_at", "ended_at",
                "code_version", "rounds", "final", "privacy", "fairness", "events"):
        assert key in report
    assert report["status"] == "completed" and report["config"] == CONFIG
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]
    r2 = report["rounds"][1]
    assert r2["metrics"]["train_loss"] == pytest.approx(0.6)
    assert r2["metrics"]["eval"]["accuracy"] == pytest.approx(0.7) and r2["metrics"]["eval"]["loss"] is None
    assert r2["metrics"]["eval_local"] == {"accuracy": 0.9}
    site_keys = {"site", "num_examples", "train_loss", "update_bytes", "duration_s", "accepted",
                 "status", "reason", "metrics", "privacy"}
    assert all(site_keys <= set(s) for r in report["rounds"] for s in r["sites"])
    refused = [s for s in r2["sites"] if s["site"] == "site-1"][0]
    assert refused["accepted"] is False and refused["reason"].startswith("budget")

    final = report["final"]
    assert final["round"] == 3 and final["metrics"]["accuracy"] == pytest.approx(0.8)
    assert set(final["per_site"]) == set(SITES) and final["per_site"]["site-1"]["accuracy"] == pytest.approx(0.5)
    assert final["local_per_site"]["site-0"] == {"accuracy": 0.95}

    privacy = report["privacy"]
    assert set(privacy) == set(SITES)
    for site, entry in privacy.items():
        assert set(entry) == set(PRIVACY_KEYS)
    # site-2 refused round 3: its privacy comes from round 2
    assert privacy["site-2"]["run_epsilon"] == pytest.approx(1.0) and privacy["site-2"]["steps"] == 200
    assert privacy["site-0"]["epsilon"] == pytest.approx(1.5) and privacy["site-0"]["steps"] == 300
    assert privacy["site-1"]["epsilon"] == pytest.approx(2.5) and privacy["site-1"]["accountant"] == "prv"

    assert report["fairness"] == fairness       # latest round that has fairness
    assert [e["kind"] for e in report["events"]] == ["started"]


def test_report_without_dp_or_evaluations(store):
    run_id = store.create_run("heart-disease", "fedavg", {"rounds": 1}, "v1")
    record = make_record(1)
    record.evaluations = []
    for s in record.sites:
        s.privacy = None
    store.write_round(run_id, record)
    report = build_report(store, run_id)
    assert report["privacy"] == {} and report["fairness"] == {} and report["client_privacy"] == {}
    assert report["final"] == {"round": None, "metrics": {}, "per_site": {}, "local_metrics": {},
                               "local_per_site": {}, "worst_sites": []}
    assert report["rounds"][0]["metrics"]["eval"] == {}


def test_report_privacy_steps(store):
    """steps = the site's own run total (covers a round whose reply was lost); without
    it, the sum of the per-round steps."""
    run_id = store.create_run("heart-disease", "fedavg", CONFIG, "v1")
    for rnd in (1, 3):   # round 2's replies never arrived, the sites' ledgers counted them
        store.write_round(run_id, make_record(rnd))
    assert build_report(store, run_id)["privacy"]["site-0"]["steps"] == 300

    other = store.create_run("heart-disease", "fedavg", CONFIG, "v1")
    for rnd in (1, 2):
        record = make_record(rnd)
        for s in record.sites:
            s.privacy.pop("steps")
        store.write_round(other, record)
    assert build_report(store, other)["privacy"]["site-0"]["steps"] == 200


def test_report_client_level_privacy(store):
    config = {"rounds": 2, "sites": 3, "dp": {"level": "client", "delta": 1e-3, "accountant": "rdp"}}
    run_id = store.create_run("heart-disease", "fedavg", config, "v1")
    for rnd, eps in ((1, 4.0), (2, 6.5)):
        record = make_record(rnd)
        record.metrics.update(client_epsilon=eps, client_noise_multiplier=1.2, client_clipping_norm=0.5)
        store.write_round(run_id, record)
    assert build_report(store, run_id)["client_privacy"] == {
        "epsilon": 6.5, "delta": 1e-3, "accountant": "rdp", "noise_multiplier": 1.2,
        "clipping_norm": 0.5, "releases": 2, "round": 2}


def test_rejected_update_reason_kept(store):
    run_id = store.create_run("heart-disease", "fedavg", CONFIG, "v1")
    record = make_record(1)
    record.sites[1] = SiteRound("site-1", REJECTED, reason="non-finite values in linear.weight",
                                num_examples=51, update_bytes=112, node_id=2**64 - 1)  # Flower ids are uint64
    store.write_round(run_id, record)
    assert store.site_rounds(run_id)[1]["node_id"] == str(2**64 - 1)
    sites = build_report(store, run_id)["rounds"][0]["sites"]
    assert [(s["site"], s["accepted"], s["reason"]) for s in sites if not s["accepted"]] == \
        [("site-1", False, "non-finite values in linear.weight")]


def test_default_db_url(monkeypatch):
    monkeypatch.delenv("FEDCARE_DB", raising=False)
    assert default_db_url() == "sqlite:///fedcare.db"
    monkeypatch.setenv("FEDCARE_DB", "postgresql+psycopg://u@h/db")
    assert default_db_url() == "postgresql+psycopg://u@h/db"
