"""The site privacy ledger: every DP-SGD round a site ever ran on a dataset, in a small
SQLite file that lives at the site, as long as the site's data.

One row per training attempt: (noise multiplier, sample rate, steps) is all an
accountant needs, so epsilon is never stored, always recomputed from the whole history
with a fresh Opacus accountant. That makes the lifetime epsilon cumulative across rounds
and runs, and lets the question be asked at any delta and with either accountant.

Retries: each call to :meth:`SiteLedger.record` is one training attempt and is counted.
A round that crashed after training (spend written, update maybe never sent) and is then
trained again drew fresh noise from the same records a second time, so it counts again:
the ledger cannot know whether the first result escaped, and under-counting is the one
mistake a privacy ledger must not make.
"""
from __future__ import annotations

import sqlite3
import time
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from fedcare.accounting import compose_history, epsilon_of  # noqa: F401  (re-exported)
from fedcare.errors import PrivacyError

LEDGER_FORMAT = "fedcare-privacy-ledger"
LEDGER_VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS spend (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    dataset_id TEXT NOT NULL,
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    noise_multiplier REAL NOT NULL CHECK (noise_multiplier > 0),
    sample_rate REAL NOT NULL CHECK (sample_rate > 0 AND sample_rate <= 1),
    steps INTEGER NOT NULL CHECK (steps > 0),
    delta REAL NOT NULL,
    accountant TEXT NOT NULL,
    budget REAL NOT NULL DEFAULT 0,
    recorded_at REAL NOT NULL,
    UNIQUE (dataset_id, run_id, round, attempt)
);
CREATE INDEX IF NOT EXISTS spend_dataset ON spend (dataset_id, run_id);
"""


def ledger_path_for(ledger_dir: str | Path, site_id: str) -> Path:
    """The ledger file of one (virtual) site inside a folder of ledgers."""
    return Path(ledger_dir) / f"{site_id}.ledger.sqlite"


@dataclass(frozen=True)
class Spend:
    """One training attempt's privacy spend."""

    dataset_id: str
    run_id: str
    round: int
    attempt: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    accountant: str
    budget: float
    recorded_at: float

    @property
    def event(self) -> tuple[float, float, int]:
        return (self.noise_multiplier, self.sample_rate, self.steps)


class SiteLedger:
    """A site's privacy ledger file. Every call opens, uses and closes its own
    connection, so one file can be shared by processes and threads; every write is a
    committed transaction before the call returns."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PrivacyError(f"cannot create the folder of privacy ledger {self.path}: {exc}") from None
        with self._connect() as con:
            self._check_format(con)

    # ------------------------------------------------------------------ plumbing
    def _connect(self) -> "closing[sqlite3.Connection]":
        try:
            con = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            con.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as exc:
            raise PrivacyError(f"cannot open privacy ledger {self.path}: {exc}; "
                               "check the path and its permissions") from None
        return closing(con)

    def _check_format(self, con: sqlite3.Connection) -> None:
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if tables and "meta" not in tables:
                raise PrivacyError(f"{self.path} is an SQLite file but not a fedcare privacy ledger "
                                   f"(tables: {', '.join(sorted(tables))}); give the path of the site's ledger")
            con.execute("BEGIN IMMEDIATE")
            for statement in filter(str.strip, _SCHEMA.split(";")):
                con.execute(statement)
            con.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?)", (LEDGER_FORMAT,))
            con.execute("INSERT OR IGNORE INTO meta VALUES ('version', ?)", (LEDGER_VERSION,))
            con.execute("COMMIT")
            meta = dict(con.execute("SELECT key, value FROM meta"))
        except sqlite3.Error as exc:
            raise PrivacyError(f"privacy ledger {self.path} is unreadable or corrupt ({exc}); "
                               "restore it from the site's backup, never delete it to reset the budget") from None
        if meta.get("format") != LEDGER_FORMAT or meta.get("version") != LEDGER_VERSION:
            raise PrivacyError(f"{self.path} is not a fedcare privacy ledger of version {LEDGER_VERSION} "
                               f"(format {meta.get('format')!r}, version {meta.get('version')!r})")

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._connect() as con:
            try:
                return con.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise PrivacyError(f"privacy ledger {self.path} is unreadable or corrupt ({exc})") from None

    # ------------------------------------------------------------------- writing
    def record(self, dataset_id: str, run_id: str, round: int, noise_multiplier: float,
               sample_rate: float, steps: int, delta: float, accountant: str,
               budget: float = 0.0) -> Spend:
        """Append one training attempt's spend (committed and synced before returning).
        A second attempt at the same (dataset, run, round) gets the next attempt number
        and counts too."""
        if steps <= 0 or noise_multiplier <= 0 or not 0 < sample_rate <= 1:
            raise ValueError(f"not a DP-SGD spend: noise {noise_multiplier}, rate {sample_rate}, steps {steps}")
        now = time.time()
        with self._connect() as con:
            try:
                con.execute("BEGIN IMMEDIATE")
                (last,) = con.execute(
                    "SELECT COALESCE(MAX(attempt), 0) FROM spend WHERE dataset_id=? AND run_id=? AND round=?",
                    (dataset_id, run_id, round)).fetchone()
                con.execute(
                    "INSERT INTO spend (dataset_id, run_id, round, attempt, noise_multiplier, sample_rate,"
                    " steps, delta, accountant, budget, recorded_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (dataset_id, run_id, int(round), last + 1, float(noise_multiplier), float(sample_rate),
                     int(steps), float(delta), accountant, float(budget), now))
                con.execute("COMMIT")
            except sqlite3.Error as exc:
                raise PrivacyError(f"cannot write privacy ledger {self.path} ({exc}); "
                                   "the round's update is not sent") from None
        return Spend(dataset_id, run_id, int(round), last + 1, float(noise_multiplier), float(sample_rate),
                     int(steps), float(delta), accountant, float(budget), now)

    # ------------------------------------------------------------------- reading
    def entries(self, dataset_id: str | None = None, run_id: str | None = None) -> list[Spend]:
        sql = ("SELECT dataset_id, run_id, round, attempt, noise_multiplier, sample_rate, steps, delta,"
               " accountant, budget, recorded_at FROM spend WHERE 1=1")
        args: tuple = ()
        if dataset_id is not None:
            sql, args = sql + " AND dataset_id=?", args + (dataset_id,)
        if run_id is not None:
            sql, args = sql + " AND run_id=?", args + (run_id,)
        return [Spend(*row) for row in self._query(sql + " ORDER BY id", args)]

    def history(self, dataset_id: str, run_id: str | None = None) -> list[tuple[float, float, int]]:
        """(noise_multiplier, sample_rate, steps) of every attempt, in order."""
        return [e.event for e in self.entries(dataset_id, run_id)]

    def datasets(self) -> list[str]:
        return [r[0] for r in self._query("SELECT DISTINCT dataset_id FROM spend ORDER BY dataset_id")]

    def epsilon(self, dataset_id: str, delta: float, accountant: str, run_id: str | None = None,
                extra: Iterable[tuple[float, float, int]] = ()) -> float:
        """Epsilon spent on ``dataset_id`` over its whole life (or one run), plus the
        hypothetical ``extra`` events (a round about to be trained)."""
        return epsilon_of([*self.history(dataset_id, run_id), *extra], delta, accountant)

    def remaining(self, dataset_id: str, budget: float, delta: float, accountant: str) -> float:
        """Epsilon left under ``budget`` (infinite when the site set no cap)."""
        if budget <= 0:
            return float("inf")
        return max(0.0, budget - self.epsilon(dataset_id, delta, accountant))

    def summary(self, delta: float | None = None, accountant: str | None = None,
                budget: float | None = None) -> list[dict]:
        """Per dataset: its lifetime spend and what is left, and per run what that run
        spent. Delta defaults to the smallest the dataset's records were measured at (a
        site records the delta it measures at, its own, never a run's), accountant and
        budget to the dataset's latest record."""
        out = []
        for dataset_id in self.datasets():
            entries = self.entries(dataset_id)
            last = entries[-1]
            d = delta if delta is not None else min(e.delta for e in entries)
            acc = accountant or last.accountant
            cap = budget if budget is not None else last.budget
            lifetime = epsilon_of([e.event for e in entries], d, acc)
            runs = []
            for run_id in dict.fromkeys(e.run_id for e in entries):
                mine = [e for e in entries if e.run_id == run_id]
                runs.append({
                    "run_id": run_id,
                    "rounds": len({e.round for e in mine}),
                    "attempts": len(mine),
                    "steps": sum(e.steps for e in mine),
                    "epsilon": epsilon_of([e.event for e in mine], d, acc),
                    "first_at": mine[0].recorded_at,
                    "last_at": mine[-1].recorded_at,
                })
            out.append({
                "dataset_id": dataset_id, "delta": d, "accountant": acc, "budget": cap,
                "epsilon": lifetime,
                "remaining": (max(0.0, cap - lifetime) if cap > 0 else None),
                "steps": sum(e.steps for e in entries), "runs": runs,
            })
        return out

    def as_dicts(self) -> list[dict]:
        return [asdict(e) for e in self.entries()]
