"""Dashboard pages under Streamlit's AppTest, its SQL queries on SQLite and
PostgreSQL, and the login rules.

The store comes from ``tests/dashboard_demo.py`` (real data, real Store API), or from
$FEDCARE_TEST_DB (e.g. the store of a real ``fedcare simulate``) when set.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from fedcare.errors import ConfigError, StoreError
from fedcare.models.sitedata import label_names
from fedcare.server import queries as q
from fedcare.server.store import Store

APP = Path(__file__).resolve().parents[1] / "dashboard" / "app.py"
PAGES = ["runs", "convergence", "sites", "fairness", "privacy", "events"]
TIMEOUT = 120


@pytest.fixture(scope="module")
def demo_db(tmp_path_factory) -> str:
    from dashboard_demo import demo_store_url

    return demo_store_url(tmp_path_factory.mktemp("dash"))


@pytest.fixture(scope="module")
def runs(demo_db) -> pd.DataFrame:
    return q.list_runs(q.connect(demo_db))


def run_of(runs: pd.DataFrame, **where) -> str:
    rows = runs
    for k, v in where.items():
        rows = rows[rows[k].astype(str).str.contains(v)]
    if rows.empty:
        pytest.skip(f"the store at FEDCARE_TEST_DB has no run with {where}")
    return rows["run_id"].iloc[0]


def open_page(db: str, page: str, run_id: str | None = None, monkeypatch=None,
              compare: list[str] | None = None) -> AppTest:
    """The app on ``page`` with ``run_id`` picked in the sidebar (and ``compare``)."""
    monkeypatch.setenv("FEDCARE_DB", db)
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    if run_id:
        at.session_state["fedcare_run"] = run_id
    if compare:
        at.session_state["fedcare_compare"] = compare
    at.run()
    if page != "runs":
        at.switch_page(f"views/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def text_of(at: AppTest) -> str:
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption] + [t.value for t in at.title]
    parts += [h.value for h in (*at.header, *at.subheader)]
    parts += [str(x.value) for x in (*at.info, *at.warning, *at.error, *at.success)]
    parts += [f"{m.label} {m.value}" for m in at.metric]
    return "\n".join(parts)


def charts(at: AppTest) -> list:
    return at.get("plotly_chart")


# ------------------------------------------------------------------ pages
@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_the_run_with_a_chart(demo_db, runs, page, monkeypatch):
    run_id = run_of(runs, dp="eps")  if page == "privacy" else runs.loc[runs["rounds_done"].idxmax(), "run_id"]
    at = open_page(demo_db, page, run_id, monkeypatch)
    assert run_id in text_of(at)
    if page != "events":
        assert charts(at), f"no Plotly chart on {page}"
    sites = q.site_totals(q.connect(demo_db), run_id)["site"].tolist()
    assert sites
    if page == "sites":
        table = at.dataframe[0].value
        assert set(sites) <= set(table["site"])


@pytest.mark.e2e
@pytest.mark.parametrize("page", PAGES)
def test_every_page_on_a_real_simulation(simulated_store_url, page, monkeypatch):
    """The pages on the store a real ``fedcare simulate`` wrote (DP, a rejected site)."""
    engine = q.connect(simulated_store_url)
    (run_id,) = q.list_runs(engine)["run_id"]
    at = open_page(simulated_store_url, page, run_id, monkeypatch)
    text = text_of(at)
    assert run_id in text
    if page != "events":
        assert charts(at), f"no Plotly chart on {page}"
    sites = q.site_totals(engine, run_id)["site"].tolist()
    assert set(sites) == {"cleveland", "hungary", "switzerland", "va"}
    if page == "sites":
        assert set(sites) <= set(at.dataframe[0].value["site"])
        problems = at.dataframe[-1].value
        assert set(problems["site"]) == {"switzerland"} and problems["reason"].str.contains("non-finite").all()
    if page == "privacy":
        table = at.dataframe[0].value
        assert set(table["site"]) == set(sites) and (table["epsilon"] > 0).all()
    if page == "fairness":
        assert at.radio(key="fair_attribute").options == ["age_band", "sex"]
        assert {m.label for m in at.metric} >= {"Equalized odds difference", "Worst site"}


def test_runs_page_lists_every_run(demo_db, runs, monkeypatch):
    at = open_page(demo_db, "runs", None, monkeypatch)
    table = at.dataframe[0].value
    assert set(table["run_id"]) == set(runs["run_id"])
    assert set(table["status"]) == set(runs["status"])


def test_comparing_runs_overlays_their_curves(demo_db, runs, monkeypatch):
    done = runs[runs["rounds_done"] > 0]["run_id"].tolist()[:3]
    at = open_page(demo_db, "convergence", done[0], monkeypatch, compare=done[1:])
    import json

    figure = json.loads(charts(at)[0].proto.spec)
    groups = {t["legendgroup"] for t in figure["data"]}       # "<run id>, <kind>"
    assert {g.split(",")[0] for g in groups} == set(done)


def test_live_run_refreshes_and_shows_local_vs_global(demo_db, runs, monkeypatch):
    live = run_of(runs, status="running")
    at = open_page(demo_db, "convergence", live, monkeypatch)
    assert "refreshing every" in text_of(at)
    if not os.environ.get("FEDCARE_TEST_DB"):
        assert "Local (personalised) vs global" in "".join(c.proto.spec for c in charts(at))


def test_sites_page_lists_refusals_with_reasons(demo_db, runs, monkeypatch):
    run_id = run_of(runs, dp="eps=1$")
    at = open_page(demo_db, "sites", run_id, monkeypatch)
    if q.site_problems(q.connect(demo_db), run_id).empty:      # possible in a FEDCARE_TEST_DB store
        assert "Every site-round of this run was accepted." in text_of(at)
        return
    problems = at.dataframe[-1].value
    assert {"site", "status", "reason", "times"} <= set(problems.columns)
    if not os.environ.get("FEDCARE_TEST_DB"):
        refused = problems[problems["status"] == "refused"]
        assert set(refused["site"]) == {"switzerland", "va"}
        assert refused["reason"].str.contains("privacy budget").all()
        assert problems[problems["status"] == "rejected"]["reason"].str.contains("non-finite").all()


def test_fairness_page_shows_stored_numbers_and_epsilon_siblings(demo_db, runs, monkeypatch):
    run_id = run_of(runs, task="heart-disease", status="completed")
    engine = q.connect(demo_db)
    rnd, fairness = q.fairness_latest(engine, run_id)
    at = open_page(demo_db, "fairness", run_id, monkeypatch)
    attribute = at.radio(key="fair_attribute").value
    summary = fairness[attribute]
    shown = {m.label: m.value for m in at.metric}
    assert shown["Equalized odds difference"] == f"{summary['equalized_odds_difference']:.3f}"
    assert shown["Demographic parity difference"] == f"{summary['demographic_parity_difference']:.3f}"
    assert shown["Worst site"] == fairness["by_site"]["worst_site"]
    groups = at.dataframe[0].value
    assert set(groups["group"]) == set(summary["by_group"])
    assert f"**{summary['worst_group']}**" in text_of(at)
    siblings = q.epsilon_siblings(engine, run_id)
    if not os.environ.get("FEDCARE_TEST_DB"):
        assert len(siblings) == 3 and set(siblings["dp"]) == {"none", "sample eps=1", "sample eps=8"}
        assert "several privacy levels" in text_of(at)


def test_task_without_sensitive_attributes_uses_classes(demo_db, runs, monkeypatch):
    run_id = run_of(runs, task="medical-abstracts")
    at = open_page(demo_db, "fairness", run_id, monkeypatch)
    assert at.radio(key="fair_attribute").options == ["class"]
    assert "no sensitive attributes" in text_of(at)
    # groups named by the run's labels; only what means something when groups are the classes
    assert set(at.dataframe[0].value["group"]) <= set(label_names("medical-abstracts"))
    assert {m.label for m in at.metric} >= {"Worst class recall"}
    assert not {"Demographic parity difference", "Equalized odds difference"} & {m.label for m in at.metric}
    assert "tpr" not in at.dataframe[0].value.columns


def test_privacy_page_against_budget_and_without_dp(demo_db, runs, monkeypatch):
    run_id = run_of(runs, dp="eps=1$")
    at = open_page(demo_db, "privacy", run_id, monkeypatch)
    table = at.dataframe[0].value
    expected = q.privacy_by_site(q.connect(demo_db), run_id)
    assert list(table["site"]) == list(expected["site"])
    assert np.allclose(table["epsilon"], expected["epsilon"])
    plain = run_of(runs, dp="none", status="completed")
    at = open_page(demo_db, "privacy", plain, monkeypatch)
    assert "did not use differential privacy" in text_of(at)


@pytest.mark.parametrize("page", PAGES)
def test_run_without_evaluation_gets_a_plain_message(demo_db, runs, page, monkeypatch):
    run_id = run_of(runs, status="failed")
    at = open_page(demo_db, page, run_id, monkeypatch)
    if page != "runs":
        assert at.info or at.error or at.caption, page
    if page == "events":
        assert "checksum" in text_of(at) or os.environ.get("FEDCARE_TEST_DB")


def chart_titles(at: AppTest) -> list[str]:
    import json

    return [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in charts(at)]


@pytest.mark.parametrize("page, key, tabs", [
    ("convergence", "conv_tab", {"Each site's test split": "each site's test split",
                                 "Training loss": "Training loss of accepted updates"}),
    ("sites", "sites_tab", {"Outcomes per round": "Sites per round by outcome",
                            "Accepted per site and round": "Accepted updates per site and round",
                            "Per site and round": "num_examples per site and round"}),
    ("privacy", "privacy_tab", {"Per site against its budget": "Epsilon spent per site against its budget",
                                "Over rounds": "Lifetime epsilon after each round"}),
    ("fairness", "fair_tab", {"Groups over rounds": "accuracy per age_band group",
                              "Differences over rounds": "age_band: differences over rounds"}),
])
def test_detail_charts_wait_behind_tabs(demo_db, runs, monkeypatch, page, key, tabs):
    """A page draws its first tab's chart; each other tab's chart is drawn (and only
    then) when that tab is picked."""
    run_id = run_of(runs, dp="eps=1$", task="heart-disease")
    at = open_page(demo_db, page, run_id, monkeypatch)
    for i, (label, title) in enumerate(tabs.items()):
        if i:
            at.session_state[key] = label
            at.run()
            assert not at.exception, [e.value for e in at.exception]
        shown = chart_titles(at)
        assert any(title in t for t in shown), (label, shown)
        others = [t for other in tabs.values() if other != title for t in shown if other in t]
        assert not others, (label, others)


def test_run_configuration_is_drawn_when_its_expander_opens(demo_db, runs, monkeypatch):
    import json

    run_id = runs.loc[runs["rounds_done"].idxmax(), "run_id"]
    at = open_page(demo_db, "runs", run_id, monkeypatch)
    assert not at.json and charts(at)
    at.session_state["runs_config"] = True
    at.run()
    assert not at.exception and json.loads(at.json[0].value)["task"] == runs.set_index("run_id").loc[run_id, "task"]


def test_many_sites_are_one_grey_trace_with_the_worst_in_colour():
    from fedcare.dashboard import figures

    df = pd.DataFrame([{"site": f"s{i:02d}", "round": r, "value": i / 100 + r / 1000}
                       for i in range(30) for r in range(1, 11)])
    grey, *shown = figures.site_lines(df, x="round", y="value", worst="min").data
    assert [t.name for t in shown] == ["s00", "s01", "s02", "s03", "s04"]
    # every site's whole curve is in the grey trace, one gap between two sites, hover names the site
    assert set(grey.text) - {""} == set(df["site"])
    y = np.asarray(grey.y, dtype=float)
    assert np.isnan(y).sum() == 30 and np.nansum(y) == pytest.approx(df["value"].sum())
    highest = figures.site_lines(df, x="round", y="value", worst="max").data[1:]
    assert [t.name for t in highest] == ["s29", "s28", "s27", "s26", "s25"]
    few = df[df["site"] < f"s{figures.MAX_SITE_TRACES:02d}"]   # up to MAX_SITE_TRACES: one curve per site
    assert [t.name for t in figures.site_lines(few, x="round", y="value").data] == sorted(set(few["site"]))


def test_live_run_is_read_from_the_cache_until_the_store_changes(tmp_path, monkeypatch):
    """A live run's page re-runs from the cache while nothing is written (however long
    that is) and shows a new row at the next run after it is written."""
    import time

    from dashboard_demo import heart_sites, write_run

    from fedcare.dashboard import common

    url = f"sqlite:///{tmp_path / 'live.db'}"
    with warnings.catch_warnings(), Store(url) as store:
        warnings.simplefilter("ignore")
        run_id = write_run(store, "heart-disease", heart_sites(), 2, rounds_planned=5, status="running")
    calls, real = [], q.event_counts
    monkeypatch.setattr(q, "event_counts", lambda *a, **k: calls.append(a) or real(*a, **k))
    at = open_page(url, "events", run_id, monkeypatch)
    assert "refreshing every" in text_of(at) and "note" not in {m.label for m in at.metric}
    time.sleep(common.REFRESH_S + 0.5)    # past any refresh period and the 1 s cache of the run list
    at.run()
    assert len(calls) == 1
    with Store(url) as store:
        store.add_event(run_id, "note", "written while the page is open")
    time.sleep(1.1)
    at.run()
    assert not at.exception and len(calls) == 2
    assert {m.label: m.value for m in at.metric}["note"] == "1"


def test_store_version_changes_when_a_row_is_added(db_url):
    run_id = _fill_small(db_url)
    e = q.connect(db_url)
    before = q.store_version(e)
    assert before == q.store_version(e) and all(v for v in before)
    with Store(db_url) as store:
        store.add_event(run_id, "note", "x")
    after = q.store_version(e)
    assert after != before and after[:3] == before[:3]


# ------------------------------------------------------------ bad stores
def test_empty_store_missing_file_and_older_schema(tmp_path, monkeypatch):
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    Store(empty).close()
    for page in PAGES:
        at = open_page(empty, page, None, monkeypatch)
        assert "no runs yet" in text_of(at)
    at = open_page(f"sqlite:///{tmp_path / 'missing.db'}", "runs", None, monkeypatch)
    assert "no database file" in text_of(at)
    assert not (tmp_path / "missing.db").exists()

    import sqlalchemy as sa

    from fedcare.server.migrations import upgrade

    old = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(sa.create_engine(old), "0001")
    at = open_page(old, "fairness", None, monkeypatch)
    assert "schema revision '0001'" in text_of(at)
    blank = tmp_path / "blank.db"
    sa.create_engine(f"sqlite:///{blank}").connect().close()
    at = open_page(f"sqlite:///{blank}", "runs", None, monkeypatch)
    assert "store is empty" in text_of(at)


# --------------------------------------------------------------- queries
def _fill_small(url: str) -> str:
    from dashboard_demo import heart_sites, write_run

    with warnings.catch_warnings(), Store(url) as store:
        warnings.simplefilter("ignore")
        return write_run(store, "heart-disease", heart_sites(), 7, epsilon=2.0, budget=0.9, reject_round=2)


@pytest.mark.postgres
def test_queries_agree_on_sqlite_and_postgres(sqlite_url, postgres_url):
    ids = {url: _fill_small(url) for url in (sqlite_url, postgres_url)}
    results = {}
    for url, run_id in ids.items():
        e = q.connect(url)
        results[url] = {
            "totals": q.site_totals(e, run_id).drop(columns=["mean_duration_s", "max_duration_s"]),
            "problems": q.site_problems(e, run_id),
            "privacy": q.privacy_by_site(e, run_id),
            "global": q.global_metric(e, [run_id], "accuracy", max_points=3).drop(columns="run_id"),
            "fair": q.fairness_series(e, run_id, "sex", ["female", "male"], "tpr"),
            "part": q.participation(e, run_id),
            "latest": q.fairness_latest(e, run_id)[1]["sex"]["equalized_odds_difference"],
        }
    a, b = results.values()
    for key in a:
        if isinstance(a[key], pd.DataFrame):
            pd.testing.assert_frame_equal(a[key].reset_index(drop=True), b[key].reset_index(drop=True),
                                          check_dtype=False, check_exact=False, rtol=1e-5, atol=0.05 if key == "global" else 1e-9)
        else:
            assert a[key] == pytest.approx(b[key])


@pytest.mark.postgres
def test_every_page_on_postgres(postgres_url, monkeypatch):
    run_id = _fill_small(postgres_url)
    for page in PAGES:
        at = open_page(postgres_url, page, run_id, monkeypatch)
        assert run_id in text_of(at) and charts(at), page


def test_series_are_bucketed_in_sql(sqlite_url):
    run_id = _fill_small(sqlite_url)
    e = q.connect(sqlite_url)
    every = q.site_metric(e, run_id, "accuracy", max_points=1000)
    thin = q.site_metric(e, run_id, "accuracy", max_points=3)          # buckets of 3 rounds: 1-3, 4-6, 7
    assert thin.groupby("site").size().max() == 3
    every["bucket"] = (every["round"] - 1) // 3
    expected = every.groupby(["site", "bucket"]).agg(round=("round", "max"), value=("value", "mean")).reset_index()
    assert np.allclose(thin.sort_values(["site", "round"])["value"], expected.sort_values(["site", "round"])["value"])
    assert thin["round"].tolist() == expected.sort_values(["site", "round"])["round"].tolist()
    part = q.participation(e, run_id)
    sites = q.site_totals(e, run_id)
    assert part.groupby("round")["sites"].sum().eq(len(sites)).all()


def test_connect_errors_are_one_line_store_errors(tmp_path):
    with pytest.raises(StoreError, match="no database file"):
        q.connect(f"sqlite:///{tmp_path / 'nope.db'}")
    with pytest.raises(StoreError, match="not a database URL"):
        q.connect("nonsense")


# ------------------------------------------------------------------ login
def test_password_hash_round_trip_and_format():
    from fedcare.dashboard.auth import check_hash_format, hash_password, verify_password

    stored = hash_password("correct horse battery")
    assert "correct horse" not in stored
    assert verify_password("correct horse battery", stored)
    assert not verify_password("correct horse batterY", stored)
    assert hash_password("correct horse battery") != stored          # salted
    with pytest.raises(ConfigError):
        check_hash_format("plain-text-password")
    with pytest.raises(ConfigError):
        hash_password("short")


def test_non_loopback_address_is_refused_without_login(demo_db, monkeypatch, tmp_path):
    from fedcare.dashboard import cli
    from fedcare.dashboard.auth import HASH_ENV, hash_password

    monkeypatch.delenv(HASH_ENV, raising=False)
    monkeypatch.chdir(tmp_path)                      # no .streamlit/secrets.toml here
    for host in ("0.0.0.0", "192.168.1.20", "::"):
        with pytest.raises(ConfigError, match="without a login"):
            cli.prepare(demo_db, 8599, host)
    command, env = cli.prepare(demo_db, 8599, "127.0.0.1")
    assert command[command.index("--server.address") + 1] == "127.0.0.1" and env["FEDCARE_DB"] == demo_db
    monkeypatch.setenv(HASH_ENV, "not-a-hash")
    with pytest.raises(ConfigError, match="not a fedcare password hash"):
        cli.prepare(demo_db, 8599, "0.0.0.0")
    monkeypatch.setenv(HASH_ENV, hash_password("correct horse battery"))
    command, _ = cli.prepare(demo_db, 8599, "0.0.0.0")
    assert command[command.index("--server.address") + 1] == "0.0.0.0"
    # OIDC: Streamlit's [auth] section in the secrets file counts as a login
    monkeypatch.delenv(HASH_ENV)
    (tmp_path / ".streamlit").mkdir()
    (tmp_path / ".streamlit" / "secrets.toml").write_text(
        '[auth]\nredirect_uri = "https://fed.example.org/oauth2callback"\ncookie_secret = "x"\n'
        'client_id = "id"\nclient_secret = "s"\nserver_metadata_url = "https://idp.example.org/.well-known/openid-configuration"\n')
    from streamlit import config

    monkeypatch.setattr(config, "get_option", lambda key, _get=config.get_option: (
        [str(tmp_path / ".streamlit" / "secrets.toml")] if key == "secrets.files" else _get(key)))
    command, _ = cli.prepare(demo_db, 8599, "0.0.0.0")
    assert "0.0.0.0" in command


def test_cli_refusal_is_one_line_exit_2(demo_db, tmp_path):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "FEDCARE_DASHBOARD_PASSWORD_HASH"}
    proc = subprocess.run([sys.executable, "-c", "from fedcare.cli import main; main()", "dashboard",
                           "--host", "0.0.0.0", "--db", demo_db], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "without a login" in proc.stderr


def test_password_gate_before_any_page(demo_db, runs, monkeypatch):
    from fedcare.dashboard.auth import HASH_ENV, hash_password

    monkeypatch.setenv(HASH_ENV, hash_password("correct horse battery"))
    monkeypatch.setenv("FEDCARE_DB", demo_db)
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    assert not at.dataframe and not charts(at)
    assert all(r not in text_of(at) for r in runs["run_id"])
    at.text_input[0].input("wrong password")
    at.form_submit_button[0].click().run()
    assert at.error and not at.dataframe
    at.text_input[0].input("correct horse battery")
    at.form_submit_button[0].click().run()
    assert not at.exception
    assert set(at.dataframe[0].value["run_id"]) == set(runs["run_id"])
