"""The SQL store: every run, round, site update, evaluation and global state.

SQLAlchemy 2 ORM models plus the ``Store`` class the server loop, CLI, report and
dashboard use. The schema is versioned with Alembic (``fedcare/server/migrations``):
opening a ``Store`` upgrades an older database to the current revision and refuses a
newer or unknown one. Works the same on SQLite and PostgreSQL.

Units: times are unix seconds (float, UTC), sizes bytes, epsilons plain floats.
JSON columns never hold NaN/inf (they become null) or numpy types.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import secrets
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from fedcare.errors import StoreError
from fedcare.server.engine import make_engine, parse_url
from fedcare.schemas import ACCEPTED, FAILED, REFUSED, REJECTED, RUN_STATUSES, RoundRecord

DEFAULT_DB_URL = "sqlite:///fedcare.db"
ENDED_STATUSES = ("completed", "failed", "interrupted")
SITE_STATUSES = (ACCEPTED, REJECTED, REFUSED, FAILED)
MIGRATIONS_DIR = Path(__file__).with_name("migrations")

JsonType = sa.JSON().with_variant(JSONB(), "postgresql")


def default_db_url() -> str:
    """$FEDCARE_DB if set, else ``sqlite:///fedcare.db`` (in the working directory)."""
    return os.environ.get("FEDCARE_DB") or DEFAULT_DB_URL


# ----------------------------------------------------------------------- ORM models
class Base(DeclarativeBase):
    pass


class Run(Base):
    __tablename__ = "runs"
    __table_args__ = (sa.Index("ix_runs_created_at", "created_at"),)

    run_id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    task: Mapped[str] = mapped_column(sa.String(128))
    strategy: Mapped[str] = mapped_column(sa.String(64))
    status: Mapped[str] = mapped_column(sa.String(16))
    config: Mapped[dict] = mapped_column(JsonType)          # RunConfig.to_dict()
    code_version: Mapped[str] = mapped_column(sa.String(128), default="")
    # copied out of config so that listings need no JSON parsing
    rounds_planned: Mapped[int | None] = mapped_column(sa.Integer)
    num_sites: Mapped[int | None] = mapped_column(sa.Integer)
    seed: Mapped[int | None] = mapped_column(sa.Integer)
    dp: Mapped[str] = mapped_column(sa.String(64), default="none")
    created_at: Mapped[float] = mapped_column(sa.Double)
    started_at: Mapped[float | None] = mapped_column(sa.Double)
    ended_at: Mapped[float | None] = mapped_column(sa.Double)
    message: Mapped[str] = mapped_column(sa.Text, default="")


class Round(Base):
    __tablename__ = "rounds"
    __table_args__ = (sa.UniqueConstraint("run_id", "round", name="uq_rounds_run_round"),)

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(sa.ForeignKey("runs.run_id", ondelete="CASCADE"))
    round: Mapped[int] = mapped_column(sa.Integer)
    started_at: Mapped[float] = mapped_column(sa.Double)
    ended_at: Mapped[float] = mapped_column(sa.Double)
    num_sites: Mapped[int] = mapped_column(sa.Integer, default=0)
    num_accepted: Mapped[int] = mapped_column(sa.Integer, default=0)
    metrics: Mapped[dict] = mapped_column(JsonType)
    fairness: Mapped[dict | None] = mapped_column(JsonType, nullable=True)


class SiteRoundRow(Base):
    __tablename__ = "site_rounds"
    __table_args__ = (
        sa.UniqueConstraint("run_id", "round", "site", name="uq_site_rounds_run_round_site"),
        sa.ForeignKeyConstraint(["run_id", "round"], ["rounds.run_id", "rounds.round"],
                                ondelete="CASCADE", name="fk_site_rounds_round"),
        sa.Index("ix_site_rounds_run_site_round", "run_id", "site", "round"),
    )

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(sa.String(64))
    round: Mapped[int] = mapped_column(sa.Integer)
    site: Mapped[str] = mapped_column(sa.String(128))
    node_id: Mapped[str | None] = mapped_column(sa.String(24))  # Flower node ids are uint64
    status: Mapped[str] = mapped_column(sa.String(16))
    reason: Mapped[str] = mapped_column(sa.Text, default="")
    num_examples: Mapped[int] = mapped_column(sa.Integer, default=0)
    train_loss: Mapped[float | None] = mapped_column(sa.Double)
    update_bytes: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    duration_s: Mapped[float | None] = mapped_column(sa.Double)
    metrics: Mapped[dict] = mapped_column(JsonType)
    privacy: Mapped[dict | None] = mapped_column(JsonType, nullable=True)
    # privacy numbers as columns so that the dashboard aggregates them in SQL
    epsilon: Mapped[float | None] = mapped_column(sa.Double)       # lifetime, after this round
    run_epsilon: Mapped[float | None] = mapped_column(sa.Double)   # this run, after this round
    delta: Mapped[float | None] = mapped_column(sa.Double)
    budget: Mapped[float | None] = mapped_column(sa.Double)


class EvaluationRow(Base):
    __tablename__ = "evaluations"
    __table_args__ = (
        sa.UniqueConstraint("run_id", "round", "scope", "kind", name="uq_evaluations_run_round_scope_kind"),
        sa.ForeignKeyConstraint(["run_id", "round"], ["rounds.run_id", "rounds.round"],
                                ondelete="CASCADE", name="fk_evaluations_round"),
        sa.Index("ix_evaluations_run_scope_kind_round", "run_id", "scope", "kind", "round"),
    )

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(sa.String(64))
    round: Mapped[int] = mapped_column(sa.Integer)
    scope: Mapped[str] = mapped_column(sa.String(128))   # "global" or a site id
    kind: Mapped[str] = mapped_column(sa.String(16))     # "federated" | "local"
    num_examples: Mapped[int] = mapped_column(sa.Integer, default=0)
    metrics: Mapped[dict] = mapped_column(JsonType)


class GlobalState(Base):
    __tablename__ = "global_states"
    __table_args__ = (
        sa.UniqueConstraint("run_id", "round", name="uq_global_states_run_round"),
        sa.ForeignKeyConstraint(["run_id", "round"], ["rounds.run_id", "rounds.round"],
                                ondelete="CASCADE", name="fk_global_states_round"),
    )

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(sa.String(64))
    round: Mapped[int] = mapped_column(sa.Integer)
    sha256: Mapped[str] = mapped_column(sa.String(64))   # state_sha256() of the arrays
    nbytes: Mapped[int] = mapped_column(sa.BigInteger)   # size of the tensors (not of the npz)
    data: Mapped[bytes] = mapped_column(sa.LargeBinary)  # np.savez of the state


class EventRow(Base):
    __tablename__ = "events"
    __table_args__ = (sa.Index("ix_events_run_time", "run_id", "time"),)

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(sa.ForeignKey("runs.run_id", ondelete="CASCADE"))
    time: Mapped[float] = mapped_column(sa.Double)
    kind: Mapped[str] = mapped_column(sa.String(32))
    message: Mapped[str] = mapped_column(sa.Text, default="")
    data: Mapped[dict | None] = mapped_column(JsonType, nullable=True)


# ------------------------------------------------------------------- value helpers
def clean_json(value: Any) -> Any:
    """A JSON-safe copy: numpy scalars/arrays to Python, NaN/inf to None, tuples to lists."""
    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return clean_json(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def _float(value: Any) -> float | None:
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def encode_state(state: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in state.items()})
    return buf.getvalue()


def decode_state(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def dp_summary(config: dict) -> str:
    """A short DP label for listings: "none", "sample eps=3", "client sigma=1.1"; with
    secure aggregation "...; secagg" and its distributed-DP target ("secagg ddp eps=8")."""
    sa = config.get("secagg") or {}
    if sa.get("enabled"):
        ddp = f" ddp eps={sa['epsilon']:g}" if sa.get("epsilon") else \
            (f" ddp sigma={sa['noise_multiplier']:g}" if sa.get("noise_multiplier") else "")
        return f"{dp_summary({**config, 'secagg': {}})}; secagg{ddp}"
    dp = config.get("dp") or {}
    level = dp.get("level", "none") or "none"
    if level == "none" and not (dp.get("epsilon") or dp.get("noise_multiplier")):
        return "none"
    if level == "none":
        level = "sample"
    if dp.get("epsilon"):
        return f"{level} eps={dp['epsilon']:g}"
    return f"{level} sigma={dp.get('noise_multiplier', 0):g}"


def new_run_id(now: float | None = None) -> str:
    """``run-YYYYMMDD-HHMM-xxxxxx`` (UTC): sorts by creation time, unique by the suffix."""
    stamp = time.strftime("%Y%m%d-%H%M", time.gmtime(now if now is not None else time.time()))
    return f"run-{stamp}-{secrets.token_hex(3)}"


def _one_line(err: BaseException) -> str:
    orig = getattr(err, "orig", None) or err
    text = " ".join(str(orig).split())
    return text or type(orig).__name__


# ---------------------------------------------------------------------------- Store
class Store:
    """One database. Methods open short transactions; the object is safe to share
    within a process (SQLAlchemy's pool), and several processes may use one database."""

    def __init__(self, url: str):
        self.url = url
        parsed = parse_url(url)
        self.display_url = parsed.render_as_string(hide_password=True)
        try:
            self.engine = make_engine(parsed)
            with self.engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        except (exc.DBAPIError, exc.NoSuchModuleError, exc.ArgumentError, ImportError) as e:
            hint = ""
            if parsed.get_backend_name() == "sqlite" and parsed.database:
                folder = Path(parsed.database).expanduser().resolve().parent
                if not folder.is_dir():
                    hint = f" (folder {folder} does not exist)"
            raise StoreError(f"cannot connect to database {self.display_url}: {_one_line(e)}{hint}") from None
        from .migrations import upgrade_to_head

        upgrade_to_head(self.engine, self.display_url)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.display_url!r})"

    # ------------------------------------------------------------------ runs
    def create_run(self, task: str, strategy: str, config: dict, code_version: str,
                   run_id: str | None = None, status: str = "pending") -> str:
        _check_status(status)
        now = time.time()
        run_id = run_id or new_run_id(now)
        config = clean_json(dict(config))
        row = Run(
            run_id=run_id, task=task, strategy=strategy, status=status, config=config,
            code_version=code_version or "", rounds_planned=_int_or_none(config.get("rounds")),
            num_sites=_int_or_none(config.get("sites")), seed=_int_or_none(config.get("seed")),
            dp=dp_summary(config), created_at=now, started_at=now if status == "running" else None,
            ended_at=now if status in ENDED_STATUSES else None, message="",
        )
        with self._session() as s:
            if s.get(Run, run_id) is not None:
                raise StoreError(f"run '{run_id}' already exists in {self.display_url}")
            s.add(row)
            self._commit(s, f"create run '{run_id}'")
        return run_id

    def set_status(self, run_id: str, status: str, message: str = "") -> None:
        _check_status(status)
        now = time.time()
        with self._session() as s:
            run = self._run(s, run_id)
            run.status = status
            run.message = message
            if status == "running":
                run.started_at = run.started_at or now
                run.ended_at = None
            elif status in ENDED_STATUSES:
                run.ended_at = now
            self._commit(s, f"set status of run '{run_id}'")

    def add_event(self, run_id: str, kind: str, message: str, data: dict | None = None) -> None:
        with self._session() as s:
            self._run(s, run_id)
            s.add(EventRow(run_id=run_id, time=time.time(), kind=kind, message=message,
                           data=clean_json(data) if data is not None else None))
            self._commit(s, f"add event to run '{run_id}'")

    def get_run(self, run_id: str) -> dict:
        with self._session() as s:
            run = self._run(s, run_id)
            done = s.scalar(sa.select(sa.func.count()).where(Round.run_id == run_id)) or 0
            return _run_dict(run, done)

    def list_runs(self) -> list[dict]:
        """All runs, newest first, with the number of rounds stored for each."""
        done = (sa.select(Round.run_id, sa.func.count().label("n"))
                .group_by(Round.run_id).subquery())
        stmt = (sa.select(Run, sa.func.coalesce(done.c.n, 0))
                .outerjoin(done, done.c.run_id == Run.run_id)
                .order_by(Run.created_at.desc(), Run.run_id.desc()))
        with self._session() as s:
            return [_run_dict(run, n) for run, n in s.execute(stmt)]

    # ---------------------------------------------------------------- rounds
    def write_round(self, run_id: str, record: RoundRecord) -> None:
        """Round, site rounds, evaluations and global state in one transaction;
        a round already stored raises StoreError and changes nothing."""
        for site in record.sites:
            if site.status not in SITE_STATUSES:
                raise ValueError(f"site round status {site.status!r} not in {SITE_STATUSES}")
        with self._session() as s, self._writing(s, f"write round {record.round} of run '{run_id}'"):
            self._run(s, run_id)
            exists = s.scalar(sa.select(Round.id).where(Round.run_id == run_id, Round.round == record.round))
            if exists is not None:
                raise StoreError(f"round {record.round} of run '{run_id}' is already stored")
            s.add(Round(
                run_id=run_id, round=record.round, started_at=float(record.started_at),
                ended_at=float(record.ended_at), num_sites=len(record.sites),
                num_accepted=sum(1 for x in record.sites if x.accepted),
                metrics=clean_json(record.metrics or {}),
                fairness=clean_json(record.fairness) if record.fairness else None,
            ))
            s.flush()  # the round row first: the other rows reference it
            # one executemany per table, whatever the number of sites (1,000 sites: 2 statements, not 2,000)
            if record.sites:
                s.execute(sa.insert(SiteRoundRow), [_site_round_row(run_id, record.round, x) for x in record.sites])
            _insert_evaluations(s, run_id, record.round, record.evaluations)
            if record.global_state is not None:
                state = {k: np.asarray(v) for k, v in record.global_state.items()}
                s.add(GlobalState(run_id=run_id, round=record.round, sha256=_sha256(state),
                                  nbytes=int(sum(v.nbytes for v in state.values())),
                                  data=encode_state(state)))

    def add_evaluations(self, run_id: str, round: int, evaluations: list, fairness: dict | None) -> None:
        """Evaluations (and fairness counts) of a stored round's global model that arrive
        after the round (``strategy.evaluate_with_train``), in one transaction; they
        replace any stored for that round (the same model evaluated again after a resume)."""
        with self._session() as s, self._writing(s, f"add evaluations of round {round} of run '{run_id}'"):
            self._run(s, run_id)
            row = s.scalar(sa.select(Round).where(Round.run_id == run_id, Round.round == round))
            if row is None:
                raise StoreError(f"round {round} of run '{run_id}' is not stored")
            s.execute(sa.delete(EvaluationRow).where(EvaluationRow.run_id == run_id, EvaluationRow.round == round))
            if fairness:
                row.fairness = clean_json(fairness)
            _insert_evaluations(s, run_id, round, evaluations)

    def last_round(self, run_id: str) -> int:
        with self._session() as s:
            return int(s.scalar(sa.select(sa.func.max(Round.round)).where(Round.run_id == run_id)) or 0)

    def load_global_state(self, run_id: str, round: int | None = None) -> dict[str, np.ndarray] | None:
        """The global state after ``round`` (the latest stored if None); None if absent.
        The content hash is checked: a corrupted state raises StoreError."""
        stmt = sa.select(GlobalState).where(GlobalState.run_id == run_id)
        stmt = stmt.where(GlobalState.round == round) if round is not None else stmt.order_by(GlobalState.round.desc())
        with self._session() as s:
            row = s.scalars(stmt.limit(1)).first()
            if row is None:
                return None
            state = decode_state(row.data)
            if _sha256(state) != row.sha256:
                raise StoreError(f"global state of run '{run_id}' round {row.round} is corrupted "
                                 f"(content hash mismatch) in {self.display_url}")
            return state

    # ------------------------------------------------------------ read views
    # Core selects of plain columns: ORM entities cost ~10x more at 1,000 rounds x 50 sites.
    def rounds(self, run_id: str) -> list[dict]:
        """Round rows in order: round, started_at, ended_at, num_sites, num_accepted,
        metrics, fairness ({} if none), state_sha256 (None if no state stored)."""
        r = Round.__table__.c
        stmt = (sa.select(r.round, r.started_at, r.ended_at, r.num_sites, r.num_accepted, r.metrics,
                          r.fairness, GlobalState.__table__.c.sha256.label("state_sha256"))
                .outerjoin(GlobalState, sa.and_(GlobalState.run_id == r.run_id, GlobalState.round == r.round))
                .where(r.run_id == run_id).order_by(r.round))
        rows = self._rows(stmt)
        for row in rows:
            row["metrics"] = row["metrics"] or {}
            row["fairness"] = row["fairness"] or {}
        return rows

    def site_rounds(self, run_id: str, round: int | None = None) -> list[dict]:
        """One dict per site per round (of one round if given), ordered by round then
        site: round, site, node_id, status, reason, accepted, num_examples, train_loss,
        update_bytes, duration_s, metrics, privacy (None without DP)."""
        c = SiteRoundRow.__table__.c
        stmt = (sa.select(c.round, c.site, c.node_id, c.status, c.reason, c.num_examples, c.train_loss,
                          c.update_bytes, c.duration_s, c.metrics, c.privacy)
                .where(c.run_id == run_id).order_by(c.round, c.site))
        if round is not None:
            stmt = stmt.where(c.round == round)
        rows = self._rows(stmt)
        for row in rows:
            row["accepted"] = row["status"] == ACCEPTED
            row["metrics"] = row["metrics"] or {}
        return rows

    def evaluations(self, run_id: str, round: int | None = None) -> list[dict]:
        """Evaluation rows (of one round if given) ordered by round, kind, scope ("global"
        first): round, scope, kind, num_examples, metrics."""
        c = EvaluationRow.__table__.c
        stmt = (sa.select(c.round, c.scope, c.kind, c.num_examples, c.metrics).where(c.run_id == run_id)
                .order_by(c.round, c.kind, sa.case((c.scope == "global", 0), else_=1), c.scope))
        if round is not None:
            stmt = stmt.where(c.round == round)
        rows = self._rows(stmt)
        for row in rows:
            row["metrics"] = row["metrics"] or {}
        return rows

    def events(self, run_id: str) -> list[dict]:
        """Events in time order: time, kind, message, data."""
        c = EventRow.__table__.c
        return self._rows(sa.select(c.time, c.kind, c.message, c.data)
                          .where(c.run_id == run_id).order_by(c.time, c.id))

    # --------------------------------------------------------------- helpers
    def _session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    def _rows(self, stmt) -> list[dict]:
        with self.engine.connect() as conn:
            result = conn.execute(stmt)
            keys = list(result.keys())
            return [dict(zip(keys, row)) for row in result]

    def _run(self, s: Session, run_id: str) -> Run:
        run = s.get(Run, run_id)
        if run is None:
            raise StoreError(f"no run '{run_id}' in {self.display_url} (`fedcare runs` lists them)")
        return run

    def _commit(self, s: Session, what: str) -> None:
        with self._writing(s, what):
            pass

    @contextlib.contextmanager
    def _writing(self, s: Session, what: str) -> Iterator[None]:
        """Commit what the block wrote; a constraint or database failure (raised at the
        block's own executes or at the commit) rolls all of it back as a StoreError."""
        try:
            yield
            s.commit()
        except (exc.IntegrityError, exc.OperationalError) as e:
            s.rollback()
            raise StoreError(f"cannot {what} in {self.display_url}: {_one_line(e)}") from None


def _sha256(state: dict[str, np.ndarray]) -> str:
    # Imported here: fedcare.models.state imports PyTorch (seconds), and reading a run
    # (`fedcare report`, the dashboard) never hashes a state; only writing one does.
    from fedcare.models.state import state_sha256

    return state_sha256(state)


def _site_round_row(run_id: str, rnd: int, x) -> dict:
    privacy = clean_json(x.privacy) if x.privacy else None
    p = privacy or {}
    return dict(run_id=run_id, round=rnd, site=str(x.site), node_id=None if x.node_id is None else str(x.node_id),
                status=x.status, reason=x.reason or "", num_examples=int(x.num_examples or 0),
                train_loss=_float(x.train_loss), update_bytes=int(x.update_bytes or 0),
                duration_s=_float(x.duration_s), metrics=clean_json(x.metrics or {}), privacy=privacy,
                epsilon=_float(p.get("epsilon")), run_epsilon=_float(p.get("run_epsilon")),
                delta=_float(p.get("delta")), budget=_float(p.get("budget")))


def _insert_evaluations(s: Session, run_id: str, rnd: int, evaluations: list) -> None:
    """Evaluation rows of one round in one executemany."""
    if evaluations:
        s.execute(sa.insert(EvaluationRow), [
            dict(run_id=run_id, round=rnd, scope=str(ev.scope), kind=ev.kind,
                 num_examples=int(ev.num_examples or 0), metrics=clean_json(ev.metrics or {}))
            for ev in evaluations])


def _check_status(status: str) -> None:
    if status not in RUN_STATUSES:
        raise ValueError(f"run status {status!r} not in {RUN_STATUSES}")


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _run_dict(run: Run, rounds_done: int) -> dict:
    return dict(
        run_id=run.run_id, task=run.task, strategy=run.strategy, status=run.status,
        config=run.config or {}, code_version=run.code_version, created_at=run.created_at,
        started_at=run.started_at, ended_at=run.ended_at, message=run.message,
        rounds_done=int(rounds_done), rounds_planned=run.rounds_planned, sites=run.num_sites,
        seed=run.seed, dp=run.dp,
    )


