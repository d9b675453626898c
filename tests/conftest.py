"""Shared fixtures.

``db_url`` runs a test on both store back-ends: a fresh SQLite file, and a fresh
PostgreSQL schema (on the server at $FEDCARE_TEST_PG, default
``postgresql+psycopg://postgres@127.0.0.1:5432/postgres``): one scratch database per
session, one fresh schema per test, all dropped afterwards.
If that server is unreachable the PostgreSQL cases skip with the reason, except
under CI (env CI set and not false/0), where they fail: CI must test PostgreSQL.
"""
from __future__ import annotations

import os
import secrets

import pytest
from sqlalchemy.engine import make_url

PG_SERVER_URL = os.environ.get("FEDCARE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _pg_connect(dbname: str | None = None):
    import psycopg

    url = make_url(PG_SERVER_URL)
    return psycopg.connect(
        host=url.host or "127.0.0.1", port=url.port or 5432, user=url.username or "postgres",
        password=url.password, dbname=dbname or url.database or "postgres",
        autocommit=True, connect_timeout=5,
    )


@pytest.fixture(scope="session")
def pg_server() -> str:
    """The server's URL (without database) if reachable; skip/fail otherwise."""
    try:
        with _pg_connect() as conn:
            conn.execute("SELECT 1")
    except Exception as e:  # noqa: BLE001 - any failure means "no server"
        reason = f"PostgreSQL at {make_url(PG_SERVER_URL).render_as_string(hide_password=True)} unreachable: " \
                 f"{' '.join(str(e).split())}"
        if in_ci():
            pytest.fail(f"{reason} (CI is set: the PostgreSQL store tests must run)", pytrace=False)
        pytest.skip(reason)
    return PG_SERVER_URL


@pytest.fixture(scope="session")
def pg_database(pg_server):
    """One scratch PostgreSQL database for the session (dropped at the end)."""
    name = f"fedcare_test_{secrets.token_hex(6)}"
    with _pg_connect() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with _pg_connect() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def postgres_url(pg_server, pg_database):
    """A fresh, empty PostgreSQL schema for one test, selected through the URL's
    search_path (creating a database per test costs about a second each)."""
    schema = f"t_{secrets.token_hex(6)}"
    with _pg_connect(pg_database) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    url = make_url(pg_server).set(database=pg_database, query={"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with _pg_connect(pg_database) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'fedcare.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request) -> str:
    """A fresh empty database URL, once per back-end."""
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url")


@pytest.fixture(scope="session")
def simulated_store_url(tmp_path_factory) -> str:
    """The store of one real ``fedcare simulate`` (real SuperLink, ``flwr run``, Ray):
    Fed-Heart-Disease, 2 rounds, DP-SGD at epsilon 3 with a site budget, and a site
    whose updates are poisoned (rejected by the server). Shared by the dashboard's
    AppTest and browser tests, so the pages are checked on what a simulation writes."""
    from e2e import simulate

    folder = tmp_path_factory.mktemp("simulated")
    url = f"sqlite:///{folder / 'simulated.db'}"
    simulate(url, "--task", "heart-disease", "--rounds", "2", "--set", "dp.epsilon=3", "--set", "site.budget=10",
             "--set", "faults.site=switzerland", "--set", "faults.kind=nan",
             "--ledger-dir", str(folder / "ledgers"), workdir=folder)
    return url


@pytest.fixture
def identity():
    """A Flower task identity for calling ClientApp handlers outside a SuperNode."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 11, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
