"""The one place a database engine is built from a URL: the store, the dashboard's and
report's queries, and the migrations all call ``parse_url`` and ``make_engine``."""
from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.engine import make_url

from fedcare.errors import StoreError


def parse_url(url: str | sa.URL) -> sa.URL:
    """``url`` parsed (StoreError if it is not one); bare ``postgresql://`` gets psycopg 3,
    the driver fedcare installs."""
    try:
        parsed = make_url(url)
    except exc.ArgumentError:
        raise StoreError(f"cannot connect to database {url!r}: not a database URL "
                         "(expected e.g. sqlite:///fedcare.db or "
                         "postgresql+psycopg://user@host:5432/db)") from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def make_engine(url: str | sa.URL, **kwargs: Any) -> sa.Engine:
    """An engine with fedcare's settings: connect timeouts; on SQLite foreign keys, WAL
    (the dashboard reads while the server writes) and transactions that fedcare begins
    itself (so that a migration is one transaction)."""
    url = parse_url(url)
    backend = url.get_backend_name()
    kwargs.setdefault("pool_pre_ping", True)
    if backend == "postgresql" and "connect_timeout" not in url.query:
        kwargs.setdefault("connect_args", {"connect_timeout": 10})
    if backend == "sqlite":
        kwargs.setdefault("connect_args", {"timeout": 30})
    engine = sa.create_engine(url, **kwargs)
    if backend == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
    return engine


def _sqlite_begin(conn) -> None:
    # pysqlite left alone commits DDL on the spot; BEGIN ourselves so that a migration
    # is one transaction, and BEGIN IMMEDIATE (write lock up front) when asked to
    immediate = conn.get_execution_options().get("sqlite_immediate", False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    dbapi_conn.isolation_level = None   # transactions come from _sqlite_begin
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.close()
