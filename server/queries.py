"""Read-only queries for the dashboard, aggregated in SQL over the store's tables.

Every function takes an ``Engine`` from ``connect()`` and returns a pandas DataFrame
(or a small dict). Nothing here writes. Long series are thinned in SQL: rounds are
grouped into at most ``max_points`` buckets (GROUP BY round bucket) so that a run
with 1,000 rounds x 50 sites returns a bounded number of rows. Metric values inside
JSON columns are extracted by the database (``json_extract`` on SQLite, ``->>`` /
``#>>`` on PostgreSQL) and never parsed row by row in Python.
"""
from __future__ import annotations

import math
from typing import Iterable

import pandas as pd
import sqlalchemy as sa
from sqlalchemy import exc

from fedcare.errors import StoreError
from fedcare.schemas import ACCEPTED, AUDIT, BENEFIT, FAILED, REFUSED, REJECTED

from .store import EvaluationRow, EventRow, GlobalState, Round, Run, SiteRoundRow

GLOBAL = "global"
FEDERATED, LOCAL = "federated", "local"
GROUP_METRICS = ("accuracy", "tpr", "fpr", "selection_rate", "auroc", "ece", "n")
ATTRIBUTE_SUMMARY = ("demographic_parity_difference", "equalized_odds_difference", "worst_group_accuracy")


# ---------------------------------------------------------------- connection
def connect(url: str) -> sa.Engine:
    """An engine for reading ``url``; StoreError if it cannot connect. Unlike
    ``Store`` it neither creates nor migrates anything."""
    from .engine import make_engine, parse_url

    parsed = parse_url(url)
    shown = parsed.render_as_string(hide_password=True)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        from pathlib import Path

        if not Path(parsed.database).expanduser().exists():
            raise StoreError(f"no database file at {parsed.database} ({shown}); run `fedcare simulate` first "
                             "or pass --db with the store's URL")
    try:
        engine = make_engine(parsed)
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except (exc.DBAPIError, exc.NoSuchModuleError, exc.ArgumentError, ImportError) as e:
        orig = getattr(e, "orig", None) or e
        raise StoreError(f"cannot connect to database {shown}: {' '.join(str(orig).split())}") from None
    return engine


def schema_problem(engine: sa.Engine) -> str | None:
    """Why this database cannot be shown (empty, older or unknown schema), or None."""
    from fedcare.server.migrations import current_revision, head_revision

    tables = set(sa.inspect(engine).get_table_names())
    current = current_revision(engine)
    if current is None:
        if "runs" in tables:
            return "this database has fedcare-like tables but no schema revision; it was not created by fedcare"
        return "the store is empty: no run has been recorded yet (start one with `fedcare simulate`)"
    head = head_revision()
    if current != head:
        return (f"the store has schema revision '{current}' but this fedcare reads '{head}'. "
                f"Upgrade it with `python -m fedcare.server.migrations upgrade --url <DB URL>` "
                f"(or open it once with `fedcare runs --db <DB URL>`), then reload this page.")
    return None


def _frame(engine: sa.Engine, stmt: sa.Select) -> pd.DataFrame:
    with engine.connect() as conn:
        result = conn.execute(stmt)
        return pd.DataFrame(result.fetchall(), columns=list(result.keys()))


def _bucket_size(engine: sa.Engine, column, where, max_points: int) -> int:
    with engine.connect() as conn:
        last = conn.execute(sa.select(sa.func.max(column)).where(where)).scalar() or 0
    return max(1, math.ceil(last / max(1, max_points)))


# ---------------------------------------------------------------------- runs
def list_runs(engine: sa.Engine) -> pd.DataFrame:
    """All runs, newest first: run_id, task, strategy, status, dp, rounds_planned,
    rounds_done, sites_planned, sites_seen, created_at, started_at, ended_at, last_round_at."""
    done = (sa.select(Round.run_id, sa.func.count().label("rounds_done"),
                      sa.func.max(Round.ended_at).label("last_round_at"))
            .group_by(Round.run_id).subquery())
    seen = (sa.select(SiteRoundRow.run_id, sa.func.count(sa.distinct(SiteRoundRow.site)).label("sites_seen"))
            .group_by(SiteRoundRow.run_id).subquery())
    stmt = (sa.select(Run.run_id, Run.task, Run.strategy, Run.status, Run.dp, Run.rounds_planned,
                      sa.func.coalesce(done.c.rounds_done, 0).label("rounds_done"),
                      Run.num_sites.label("sites_planned"),
                      sa.func.coalesce(seen.c.sites_seen, 0).label("sites_seen"),
                      Run.created_at, Run.started_at, Run.ended_at, done.c.last_round_at, Run.message)
            .outerjoin(done, done.c.run_id == Run.run_id).outerjoin(seen, seen.c.run_id == Run.run_id)
            .order_by(Run.created_at.desc(), Run.run_id.desc()))
    return _frame(engine, stmt)


def store_version(engine: sa.Engine) -> tuple:
    """The largest row id of each table a page reads beside ``runs``: every round,
    site row, evaluation, event and global state the store adds changes it (a primary
    key lookup per table, not a scan). With ``list_runs`` it tells a reader whether
    anything it cached is stale. One blind spot: SQLite reuses the largest ids when a
    round's evaluations are replaced by as many new ones (a re-evaluation after a
    resume); the next row written anywhere changes the version again."""
    tables = (Round.id, SiteRoundRow.id, EvaluationRow.id, EventRow.id, GlobalState.id)
    stmt = sa.select(*[sa.select(sa.func.max(col)).scalar_subquery() for col in tables])
    with engine.connect() as conn:
        return tuple(conn.execute(stmt).one())


def run_info(engine: sa.Engine, run_id: str) -> dict | None:
    """One run's row (with its config) or None."""
    with engine.connect() as conn:
        row = conn.execute(sa.select(Run).where(Run.run_id == run_id)).mappings().first()
    return dict(row) if row else None


def metric_names(engine: sa.Engine, run_id: str, kind: str = FEDERATED) -> list[str]:
    """Names of the metrics in the run's latest global evaluation (of ``kind``)."""
    stmt = (sa.select(EvaluationRow.metrics)
            .where(EvaluationRow.run_id == run_id, EvaluationRow.scope == GLOBAL, EvaluationRow.kind == kind)
            .order_by(EvaluationRow.round.desc()).limit(1))
    with engine.connect() as conn:
        metrics = conn.execute(stmt).scalar()
    return sorted(k for k, v in (metrics or {}).items() if isinstance(v, (int, float)))


def evaluation_kinds(engine: sa.Engine, run_id: str) -> list[str]:
    stmt = sa.select(EvaluationRow.kind).where(EvaluationRow.run_id == run_id, EvaluationRow.kind != AUDIT,
                                               _not_benefit()).distinct()
    with engine.connect() as conn:
        return sorted(conn.execute(stmt).scalars())


# --------------------------------------------------------------- convergence
def global_metric(engine: sa.Engine, run_ids: Iterable[str], metric: str, max_points: int = 400) -> pd.DataFrame:
    """Global evaluation ``metric`` per round for several runs and both kinds:
    run_id, kind, round, value (bucket mean; round = last round of the bucket)."""
    run_ids = list(run_ids)
    where = sa.and_(EvaluationRow.run_id.in_(run_ids), EvaluationRow.scope == GLOBAL)
    step = _bucket_size(engine, EvaluationRow.round, where, max_points)
    bucket = (EvaluationRow.round - 1) // step
    value = EvaluationRow.metrics[metric].as_float()
    stmt = (sa.select(EvaluationRow.run_id, EvaluationRow.kind, sa.func.max(EvaluationRow.round).label("round"),
                      sa.func.avg(value).label("value"))
            .where(where).group_by(EvaluationRow.run_id, EvaluationRow.kind, bucket)
            .order_by(EvaluationRow.run_id, EvaluationRow.kind, sa.text("round")))
    return _frame(engine, stmt)


def site_metric(engine: sa.Engine, run_id: str, metric: str, kind: str = FEDERATED,
                max_points: int = 100) -> pd.DataFrame:
    """Per-site evaluation ``metric`` per round: site, round, value."""
    where = sa.and_(EvaluationRow.run_id == run_id, EvaluationRow.scope != GLOBAL, EvaluationRow.kind == kind)
    step = _bucket_size(engine, EvaluationRow.round, where, max_points)
    bucket = (EvaluationRow.round - 1) // step
    stmt = (sa.select(EvaluationRow.scope.label("site"), sa.func.max(EvaluationRow.round).label("round"),
                      sa.func.avg(EvaluationRow.metrics[metric].as_float()).label("value"))
            .where(where).group_by(EvaluationRow.scope, bucket).order_by(EvaluationRow.scope, sa.text("round")))
    return _frame(engine, stmt)


def train_loss(engine: sa.Engine, run_id: str, max_points: int = 100) -> pd.DataFrame:
    """Accepted updates' train loss per round: site, round, train_loss."""
    return site_series(engine, run_id, "train_loss", max_points, accepted_only=True)


def final_site_metrics(engine: sa.Engine, run_id: str, metric: str) -> pd.DataFrame:
    """``metric`` of every scope and kind at the latest evaluated round: scope, kind, round,
    value (the benefit records, which repeat these numbers with intervals, left out)."""
    last = (sa.select(EvaluationRow.kind, sa.func.max(EvaluationRow.round).label("last"))
            .where(EvaluationRow.run_id == run_id, _not_benefit()).group_by(EvaluationRow.kind).subquery())
    stmt = (sa.select(EvaluationRow.scope, EvaluationRow.kind, EvaluationRow.round,
                      EvaluationRow.metrics[metric].as_float().label("value"), EvaluationRow.num_examples)
            .join(last, sa.and_(last.c.kind == EvaluationRow.kind, last.c.last == EvaluationRow.round))
            .where(EvaluationRow.run_id == run_id).order_by(EvaluationRow.kind, EvaluationRow.scope))
    return _frame(engine, stmt)


# --------------------------------------------------------------------- sites
_SITE_COLUMNS = {"num_examples": SiteRoundRow.num_examples, "update_bytes": SiteRoundRow.update_bytes,
                 "duration_s": SiteRoundRow.duration_s, "train_loss": SiteRoundRow.train_loss,
                 "epsilon": SiteRoundRow.epsilon, "run_epsilon": SiteRoundRow.run_epsilon}


def site_series(engine: sa.Engine, run_id: str, column: str, max_points: int = 100,
                accepted_only: bool = False) -> pd.DataFrame:
    """One site-round column per site per round bucket: site, round, <column> (mean)."""
    col = _SITE_COLUMNS[column]
    where = SiteRoundRow.run_id == run_id
    if accepted_only:
        where = sa.and_(where, SiteRoundRow.status == ACCEPTED)
    step = _bucket_size(engine, SiteRoundRow.round, where, max_points)
    bucket = (SiteRoundRow.round - 1) // step
    stmt = (sa.select(SiteRoundRow.site, sa.func.max(SiteRoundRow.round).label("round"),
                      sa.func.avg(col).label(column))
            .where(where).group_by(SiteRoundRow.site, bucket).order_by(SiteRoundRow.site, sa.text("round")))
    return _frame(engine, stmt)


def participation(engine: sa.Engine, run_id: str, max_points: int = 300) -> pd.DataFrame:
    """Site-rounds per status per round bucket: round, status, sites (mean per round)."""
    where = SiteRoundRow.run_id == run_id
    step = _bucket_size(engine, SiteRoundRow.round, where, max_points)
    bucket = (SiteRoundRow.round - 1) // step
    stmt = (sa.select(sa.func.max(SiteRoundRow.round).label("round"), SiteRoundRow.status,
                      (sa.func.count() / sa.cast(sa.func.count(sa.distinct(SiteRoundRow.round)), sa.Float))
                      .label("sites"))
            .where(where).group_by(bucket, SiteRoundRow.status).order_by(sa.text("round"), SiteRoundRow.status))
    return _frame(engine, stmt)


def site_status_grid(engine: sa.Engine, run_id: str, max_points: int = 120) -> pd.DataFrame:
    """Share of rounds with an accepted update per site per round bucket:
    site, round, accepted_share, problems (rejected/refused/failed count)."""
    where = SiteRoundRow.run_id == run_id
    step = _bucket_size(engine, SiteRoundRow.round, where, max_points)
    bucket = (SiteRoundRow.round - 1) // step
    accepted = sa.func.sum(sa.case((SiteRoundRow.status == ACCEPTED, 1), else_=0))
    stmt = (sa.select(SiteRoundRow.site, sa.func.max(SiteRoundRow.round).label("round"),
                      (accepted / sa.cast(sa.func.count(), sa.Float)).label("accepted_share"),
                      (sa.func.count() - accepted).label("problems"))
            .where(where).group_by(SiteRoundRow.site, bucket).order_by(SiteRoundRow.site, sa.text("round")))
    return _frame(engine, stmt)


def site_totals(engine: sa.Engine, run_id: str) -> pd.DataFrame:
    """Per site over the run: rounds, accepted, rejected, refused, failed, examples
    (sum over accepted), mean bytes of the updates it sent (accepted or rejected),
    total update bytes, mean/max duration, last_round."""
    def n(status: str):
        return sa.func.sum(sa.case((SiteRoundRow.status == status, 1), else_=0)).label(status)

    stmt = (sa.select(SiteRoundRow.site, sa.func.count().label("rounds"), n(ACCEPTED), n(REJECTED), n(REFUSED),
                      n(FAILED),
                      sa.func.sum(sa.case((SiteRoundRow.status == ACCEPTED, SiteRoundRow.num_examples), else_=0))
                      .label("examples"),
                      sa.func.avg(sa.case((SiteRoundRow.status.in_((ACCEPTED, REJECTED)), SiteRoundRow.update_bytes)))
                      .label("mean_update_bytes"),
                      sa.func.sum(SiteRoundRow.update_bytes).label("total_update_bytes"),
                      sa.func.avg(SiteRoundRow.duration_s).label("mean_duration_s"),
                      sa.func.max(SiteRoundRow.duration_s).label("max_duration_s"),
                      sa.func.max(SiteRoundRow.round).label("last_round"))
            .where(SiteRoundRow.run_id == run_id).group_by(SiteRoundRow.site).order_by(SiteRoundRow.site))
    return _frame(engine, stmt)


def site_problems(engine: sa.Engine, run_id: str) -> pd.DataFrame:
    """Rejected, refused and failed site-rounds grouped by site, status and reason:
    site, status, reason, times, first_round, last_round."""
    stmt = (sa.select(SiteRoundRow.site, SiteRoundRow.status, SiteRoundRow.reason,
                      sa.func.count().label("times"), sa.func.min(SiteRoundRow.round).label("first_round"),
                      sa.func.max(SiteRoundRow.round).label("last_round"))
            .where(SiteRoundRow.run_id == run_id, SiteRoundRow.status != ACCEPTED)
            .group_by(SiteRoundRow.site, SiteRoundRow.status, SiteRoundRow.reason)
            .order_by(sa.text("times DESC"), SiteRoundRow.site))
    return _frame(engine, stmt)


# ------------------------------------------------------------------- privacy
def privacy_by_site(engine: sa.Engine, run_id: str) -> pd.DataFrame:
    """Per site: lifetime epsilon, this run's epsilon, budget, delta (latest values
    = maxima, epsilons only grow), rounds with DP, last round."""
    stmt = (sa.select(SiteRoundRow.site, sa.func.max(SiteRoundRow.epsilon).label("epsilon"),
                      sa.func.max(SiteRoundRow.run_epsilon).label("run_epsilon"),
                      sa.func.max(SiteRoundRow.budget).label("budget"),
                      sa.func.max(SiteRoundRow.delta).label("delta"),
                      sa.func.count(SiteRoundRow.epsilon).label("dp_rounds"),
                      sa.func.sum(sa.case((SiteRoundRow.status == REFUSED, 1), else_=0)).label("refused"),
                      sa.func.max(SiteRoundRow.round).label("last_round"))
            .where(SiteRoundRow.run_id == run_id).group_by(SiteRoundRow.site).order_by(SiteRoundRow.site))
    return _frame(engine, stmt)


def privacy_audit(engine: sa.Engine, run_id: str) -> pd.DataFrame:
    """Per audited site, its latest audit beside its accountant: site, round,
    epsilon_lower_bound, canaries, guesses, correct, run_epsilon (null without DP),
    exceeds (the bound is above the accountant's epsilon: a privacy bug)."""
    last = (sa.select(EvaluationRow.scope, sa.func.max(EvaluationRow.round).label("last"))
            .where(EvaluationRow.run_id == run_id, EvaluationRow.kind == AUDIT)
            .group_by(EvaluationRow.scope).subquery())
    claimed = (sa.select(SiteRoundRow.site, sa.func.max(SiteRoundRow.run_epsilon).label("run_epsilon"))
               .where(SiteRoundRow.run_id == run_id).group_by(SiteRoundRow.site).subquery())
    m = EvaluationRow.metrics
    stmt = (sa.select(EvaluationRow.scope.label("site"), EvaluationRow.round,
                      m["epsilon_lower_bound"].as_float().label("epsilon_lower_bound"),
                      m["canaries"].as_integer().label("canaries"), m["guesses"].as_integer().label("guesses"),
                      m["correct"].as_integer().label("correct"), claimed.c.run_epsilon)
            .join(last, sa.and_(last.c.scope == EvaluationRow.scope, last.c.last == EvaluationRow.round))
            .outerjoin(claimed, claimed.c.site == EvaluationRow.scope)
            .where(EvaluationRow.run_id == run_id, EvaluationRow.kind == AUDIT).order_by(EvaluationRow.scope))
    frame = _frame(engine, stmt)
    for col in ("epsilon_lower_bound", "run_epsilon"):
        frame[col] = pd.to_numeric(frame[col], errors="coerce")
    frame["exceeds"] = frame["epsilon_lower_bound"] > frame["run_epsilon"]   # NaN (no DP) compares False
    return frame


def privacy_series(engine: sa.Engine, run_id: str, max_points: int = 100) -> pd.DataFrame:
    """site, round, epsilon, run_epsilon, budget (max within each round bucket)."""
    where = sa.and_(SiteRoundRow.run_id == run_id, SiteRoundRow.epsilon.is_not(None))
    step = _bucket_size(engine, SiteRoundRow.round, where, max_points)
    bucket = (SiteRoundRow.round - 1) // step
    stmt = (sa.select(SiteRoundRow.site, sa.func.max(SiteRoundRow.round).label("round"),
                      sa.func.max(SiteRoundRow.epsilon).label("epsilon"),
                      sa.func.max(SiteRoundRow.run_epsilon).label("run_epsilon"),
                      sa.func.max(SiteRoundRow.budget).label("budget"))
            .where(where).group_by(SiteRoundRow.site, bucket).order_by(SiteRoundRow.site, sa.text("round")))
    return _frame(engine, stmt)


# ------------------------------------------------------------------ fairness
def _has_fairness():
    """Rounds whose fairness object is present (SQL NULL and JSON null both excluded)."""
    return Round.fairness[("by_site", "metric")].as_string().is_not(None)


def fairness_latest(engine: sa.Engine, run_id: str) -> tuple[int, dict] | None:
    """(round, fairness JSON) of the latest round that stored fairness, or None."""
    stmt = (sa.select(Round.round, Round.fairness)
            .where(Round.run_id == run_id, _has_fairness())
            .order_by(Round.round.desc()).limit(1))
    with engine.connect() as conn:
        row = conn.execute(stmt).first()
    if row is None or not row.fairness:
        return None
    return int(row.round), row.fairness


def fairness_groups(fairness: dict) -> dict[str, list[str]]:
    """attribute -> groups in one stored fairness object (its layout, from
    models.fairness.aggregate: every key but "by_site"/"excluded_sites" is an attribute)."""
    return {a: sorted(v.get("by_group", {})) for a, v in fairness.items()
            if a not in ("by_site", "excluded_sites") and isinstance(v, dict)}


def fairness_series(engine: sa.Engine, run_id: str, attribute: str, groups: list[str],
                    metric: str, max_points: int = 300) -> pd.DataFrame:
    """Per round bucket: round, the attribute's differences and worst-group accuracy,
    the site gap and spread, and ``metric`` of every group (column = group name)."""
    def path(*keys: str):
        return Round.fairness[keys].as_float()

    where = sa.and_(Round.run_id == run_id, _has_fairness())
    step = _bucket_size(engine, Round.round, where, max_points)
    bucket = (Round.round - 1) // step
    safe = [g for g in groups if '"' not in g and "\\" not in g]
    columns = [sa.func.avg(path(attribute, key)).label(key) for key in ATTRIBUTE_SUMMARY]
    columns += [sa.func.avg(path("by_site", "gap")).label("site_gap"),
                sa.func.avg(path("by_site", "spread")).label("site_spread")]
    columns += [sa.func.avg(path(attribute, "by_group", g, metric)).label(f"group_{i}") for i, g in enumerate(safe)]
    stmt = (sa.select(sa.func.max(Round.round).label("round"), *columns)
            .where(where).group_by(bucket).order_by(sa.text("round")))
    df = _frame(engine, stmt)
    return df.rename(columns={f"group_{i}": g for i, g in enumerate(safe)})


def epsilon_siblings(engine: sa.Engine, run_id: str) -> pd.DataFrame:
    """Runs with the same experiment as ``run_id`` except for the DP settings
    (dp.*), with the headline fairness numbers of their latest round: run_id, dp,
    epsilon, status, rounds_done, plus per attribute <attr>.worst_group_accuracy,
    <attr>.equalized_odds_difference, <attr>.demographic_parity_difference, and
    accuracy (global, latest federated evaluation)."""
    base = run_info(engine, run_id)
    if base is None:
        return pd.DataFrame()
    same = (sa.select(Run.run_id, Run.config).where(
        Run.task == base["task"], Run.strategy == base["strategy"],
        Run.rounds_planned == base["rounds_planned"], Run.num_sites == base["num_sites"]))
    with engine.connect() as conn:
        candidates = conn.execute(same).all()   # the few runs of one experiment family
    key = _experiment_key(base["config"])
    ids = [r.run_id for r in candidates if _experiment_key(r.config) == key]
    if len(ids) < 2:
        return pd.DataFrame()
    latest = (sa.select(Round.run_id, sa.func.max(Round.round).label("last"))
              .where(Round.run_id.in_(ids), _has_fairness()).group_by(Round.run_id).subquery())
    attrs = list(fairness_groups((fairness_latest(engine, run_id) or (0, {}))[1]))
    cols = [Round.fairness[(a, k)].as_float().label(f"{a}.{k}") for a in attrs for k in ATTRIBUTE_SUMMARY]
    last_eval = (sa.select(EvaluationRow.run_id, sa.func.max(EvaluationRow.round).label("last"))
                 .where(EvaluationRow.run_id.in_(ids), EvaluationRow.scope == GLOBAL, EvaluationRow.kind == FEDERATED)
                 .group_by(EvaluationRow.run_id).subquery())
    acc = (sa.select(EvaluationRow.run_id, EvaluationRow.metrics["accuracy"].as_float().label("accuracy"))
           .join(last_eval, sa.and_(last_eval.c.run_id == EvaluationRow.run_id, last_eval.c.last == EvaluationRow.round))
           .where(EvaluationRow.scope == GLOBAL, EvaluationRow.kind == FEDERATED).subquery())
    stmt = (sa.select(Run.run_id, Run.dp, Run.config[("dp", "epsilon")].as_float().label("epsilon"), Run.status,
                      latest.c.last.label("round"), acc.c.accuracy, *cols)
            .join(latest, latest.c.run_id == Run.run_id)
            .outerjoin(Round, sa.and_(Round.run_id == Run.run_id, Round.round == latest.c.last))
            .outerjoin(acc, acc.c.run_id == Run.run_id)
            .order_by(Run.dp, Run.run_id))
    return _frame(engine, stmt)


def _experiment_key(config: dict | None) -> str:
    import json

    config = dict(config or {})
    config.pop("dp", None)
    config.get("site", {}) and config.update(site={k: v for k, v in config["site"].items() if k != "budget"})
    return json.dumps(config, sort_keys=True, default=str)


# -------------------------------------------------------------------- events
def events(engine: sa.Engine, run_id: str, limit: int = 500) -> pd.DataFrame:
    """The latest ``limit`` events: time, kind, message, data (newest first)."""
    stmt = (sa.select(EventRow.time, EventRow.kind, EventRow.message, EventRow.data)
            .where(EventRow.run_id == run_id).order_by(EventRow.time.desc(), EventRow.id.desc()).limit(limit))
    return _frame(engine, stmt)


def event_counts(engine: sa.Engine, run_id: str) -> pd.DataFrame:
    stmt = (sa.select(EventRow.kind, sa.func.count().label("count"), sa.func.max(EventRow.time).label("last"))
            .where(EventRow.run_id == run_id).group_by(EventRow.kind).order_by(sa.text("count DESC")))
    return _frame(engine, stmt)


# ------------------------------------------------------------------- exports
def exported_rounds(engine: sa.Engine, run_id: str) -> list[int]:
    """Rounds of this run that ``fedcare export`` wrote (its "exported" events), sorted."""
    stmt = (sa.select(EventRow.data["round"].as_integer()).where(EventRow.run_id == run_id, EventRow.kind == "exported")
            .distinct())
    with engine.connect() as conn:
        return sorted(int(r) for r in conn.execute(stmt).scalars() if r is not None)


def state_rounds(engine: sa.Engine, run_id: str) -> list[int]:
    """Rounds with a stored global state (what can be exported), sorted."""
    stmt = sa.select(GlobalState.round).where(GlobalState.run_id == run_id).order_by(GlobalState.round)
    with engine.connect() as conn:
        return [int(r) for r in conn.execute(stmt).scalars()]


# ------------------------------------------------------------------- benefit
def _not_benefit():
    return sa.not_(EvaluationRow.kind.like(f"{BENEFIT}:%"))


def budget_label(budget: float | None) -> str:
    """A site's epsilon budget as shown: 0 (or none) means no cap, not a cap of 0."""
    return "no cap" if not budget else f"{budget:g}"


def benefit(engine: sa.Engine, run_id: str) -> pd.DataFrame:
    """The benefit of joining at the latest round that has it, one row per site and model
    (global | personal | alone): site, model, round, num_examples and the metrics with
    their ``_lo``/``_hi`` bounds and (global rows) ``prevalence_<k>``, as the sites sent them."""
    kinds = EvaluationRow.kind.like(f"{BENEFIT}:%")
    last = sa.select(sa.func.max(EvaluationRow.round)).where(EvaluationRow.run_id == run_id, kinds).scalar_subquery()
    stmt = (sa.select(EvaluationRow.scope.label("site"), EvaluationRow.kind, EvaluationRow.round,
                      EvaluationRow.num_examples, EvaluationRow.metrics)
            .where(EvaluationRow.run_id == run_id, kinds, EvaluationRow.round == last)
            .order_by(EvaluationRow.scope, EvaluationRow.kind))
    rows = _frame(engine, stmt)
    if rows.empty:
        return rows
    metrics = pd.DataFrame(list(rows.pop("metrics")), index=rows.index)
    rows["model"] = rows.pop("kind").str.removeprefix(f"{BENEFIT}:")
    return pd.concat([rows, metrics], axis=1)
