"""One function builds a database engine from a URL; store, queries (dashboard and
report) and migrations all use it, so they all get the same SQLite settings."""
import re
from pathlib import Path

import pytest

from fedcare.errors import StoreError
from fedcare.server.engine import make_engine
from fedcare.server.queries import connect
from fedcare.server.store import Store

ROOT = Path(__file__).resolve().parent.parent


def test_no_module_builds_its_own_engine():
    offenders = []
    for folder in ("fedcare", "server", "client", "strategies", "models", "dashboard"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name != "engine.py" and re.search(r"\bcreate_engine\(", path.read_text()):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_the_dashboards_engine_has_the_stores_sqlite_settings(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    Store(url).close()
    for engine in (connect(url), make_engine(url)):
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        engine.dispose()


def test_a_bad_url_is_one_store_error_everywhere():
    for build in (make_engine, connect, Store):
        with pytest.raises(StoreError, match="not a database URL"):
            build("no such url")
