"""Alembic migrations of the fedcare store, driven from code (no alembic.ini needed).

``upgrade_to_head(engine)`` is what ``Store`` calls on open. To write a new revision:
``python -m fedcare.server.migrations revision -m "what changed" [--url URL]``
(autogenerates against the ORM models in fedcare.server.store).
"""
from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import exc

from fedcare.errors import StoreError

HERE = Path(__file__).resolve().parent
VERSION_TABLE = "alembic_version"
MIGRATION_LOCK_KEY = 0x66656463  # "fedc": pg_advisory_xact_lock key held while migrating


def alembic_config(url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.set_main_option("path_separator", "os")
    if url:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: sa.Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()


def upgrade_to_head(engine: sa.Engine, display_url: str) -> None:
    """Bring the database to the current schema; refuse a schema this fedcare does not know."""
    upgrade(engine, "head", display_url)


def upgrade(engine: sa.Engine, revision: str, display_url: str = "") -> None:
    display_url = display_url or engine.url.render_as_string(hide_password=True)
    script = ScriptDirectory.from_config(alembic_config())
    target = script.get_current_head() if revision == "head" else revision
    try:
        if _current_or_none(engine) == target:   # the usual case: nothing to do, no lock taken
            return
        with engine.connect() as conn, conn.execution_options(sqlite_immediate=True).begin():
            if conn.dialect.name == "postgresql":
                # processes opening one database at once migrate one after the other
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            # (SQLite: the store's engine began this transaction with BEGIN IMMEDIATE)
            current = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()
            if current is not None and current not in {r.revision for r in script.walk_revisions()}:
                raise StoreError(
                    f"database {display_url} has schema revision '{current}', which this fedcare does not know "
                    f"(newest known: '{script.get_current_head()}'); upgrade fedcare or use another database")
            if current == target:
                return
            if current is None and {"runs", "rounds"} <= set(sa.inspect(conn).get_table_names()):
                raise StoreError(f"database {display_url} has fedcare-like tables but no schema revision; "
                                 "use an empty database or one created by fedcare")
            cfg = alembic_config()
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    except (exc.DBAPIError, exc.SQLAlchemyError) as e:
        orig = getattr(e, "orig", None) or e
        raise StoreError(f"cannot migrate database {display_url} to schema '{revision}': "
                         f"{' '.join(str(orig).split())}") from None


def _current_or_none(engine: sa.Engine) -> str | None:
    try:
        return current_revision(engine)
    except exc.SQLAlchemyError:
        return None


def _main(argv: list[str] | None = None) -> None:
    import argparse

    from fedcare.server.store import default_db_url

    p = argparse.ArgumentParser(prog="python -m fedcare.server.migrations")
    sub = p.add_subparsers(dest="cmd", required=True)
    rev = sub.add_parser("revision", help="autogenerate a new revision from the ORM models")
    rev.add_argument("-m", "--message", required=True)
    rev.add_argument("--url", default=default_db_url())
    up = sub.add_parser("upgrade", help="upgrade a database")
    up.add_argument("revision", nargs="?", default="head")
    up.add_argument("--url", default=default_db_url())
    sub.add_parser("heads", help="print the head revision")
    args = p.parse_args(argv)
    if args.cmd == "heads":
        print(head_revision())
    elif args.cmd == "upgrade":
        from fedcare.server.engine import make_engine

        engine = make_engine(args.url)
        upgrade(engine, args.revision)
        print(current_revision(engine))
    else:
        command.revision(alembic_config(args.url), message=args.message, autogenerate=True)

