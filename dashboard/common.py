"""What every dashboard page shares: the store connection, the run selection in the
sidebar, live refresh, plain messages instead of exceptions, and formatting.

Pages read only through ``fedcare.server.queries``; nothing here writes.
"""
from __future__ import annotations

import datetime as dt
import numbers
import os
from typing import Callable

import pandas as pd
import streamlit as st

from fedcare.errors import FedcareError
from fedcare.server import queries as q

DB_ENV = "FEDCARE_DB"
REFRESH_S = 5.0
LIVE_STATUSES = ("running", "pending")
FOCUS_KEY, COMPARE_KEY = "fedcare_run", "fedcare_compare"


@st.cache_resource(show_spinner=False)
def _engine(url: str):
    return q.connect(url)


def db_url() -> str:
    from fedcare.server.store import default_db_url

    return os.environ.get(DB_ENV) or default_db_url()


def engine_or_stop():
    """The store's engine; a plain message and stop when it cannot be shown."""
    url = db_url()
    try:
        engine = _engine(url)
        problem = q.schema_problem(engine)
    except FedcareError as err:
        st.error(f"Cannot open the store: {err}")
        st.stop()
    if problem:
        st.info(problem.capitalize() if problem[0].islower() else problem)
        st.stop()
    return engine


def runs_table(engine) -> pd.DataFrame:
    """The run list; one query serves every use within a page load (sidebar, cache stamp, page)."""
    return _runs_table(db_url())


@st.cache_data(show_spinner=False, ttl=1.0, max_entries=8)
def _runs_table(url: str) -> pd.DataFrame:
    return q.list_runs(_engine(url))


@st.cache_data(show_spinner=False, ttl=1.0, max_entries=8)
def _store_version(url: str) -> tuple:
    return q.store_version(_engine(url))


@st.cache_data(show_spinner=False, max_entries=512)
def _cached(url: str, name: str, stamp: tuple, args: tuple, kwargs: tuple):
    return getattr(q, name)(_engine(url), *args, **dict(kwargs))


class CachedQueries:
    """``fedcare.server.queries`` with results cached until the store changes: the
    stamp is every run's (status, rounds stored, end time) and the store's version
    (``q.store_version``: the newest row of each table), so a live run's next round,
    evaluation or event is read at the next refresh, and an unchanged store is never
    queried again, whoever loads the page. ``data.site_totals(run_id)`` =
    ``q.site_totals(engine, run_id)``."""

    def __init__(self, url: str, stamp: tuple):
        self._url, self.stamp = url, stamp

    def __getattr__(self, name: str):
        if not callable(getattr(q, name, None)):
            raise AttributeError(name)
        return lambda *args, **kwargs: _cached(self._url, name, self.stamp, args, tuple(sorted(kwargs.items())))


def forget_cached() -> None:
    """After the dashboard itself changed the store (an export): read it afresh."""
    _cached.clear()


def data(engine) -> CachedQueries:
    runs = runs_table(engine)
    stamp = tuple(runs[["run_id", "status", "rounds_done", "ended_at", "last_round_at"]]
                  .astype(str).itertuples(index=False, name=None))
    return CachedQueries(db_url(), stamp + _store_version(db_url()))


def sidebar_selection(engine) -> None:
    """The run every page shows and the runs to compare with it (sidebar widgets)."""
    runs = runs_table(engine)
    if runs.empty:
        return
    ids = runs["run_id"].tolist()
    label = {r.run_id: f"{r.run_id} · {r.task} · {r.status}" for r in runs.itertuples()}
    if st.session_state.get(FOCUS_KEY) not in ids:
        st.session_state.pop(FOCUS_KEY, None)
    wanted = st.query_params.get("run")
    if wanted in ids and FOCUS_KEY not in st.session_state:
        st.session_state[FOCUS_KEY] = wanted
    st.sidebar.selectbox("Run", ids, key=FOCUS_KEY, format_func=label.get)
    st.session_state[COMPARE_KEY] = [r for r in st.session_state.get(COMPARE_KEY, []) if r in ids]
    st.sidebar.multiselect("Compare with", [i for i in ids if i != st.session_state[FOCUS_KEY]],
                           key=COMPARE_KEY, format_func=label.get)
    st.sidebar.caption(f"store: {db_url().split('@')[-1]}")


def selected_run(engine) -> dict:
    """The focused run's row; a plain message and stop when there is none."""
    run_id = st.session_state.get(FOCUS_KEY)
    run = q.run_info(engine, run_id) if run_id else None
    if run is None:
        st.info("The store has no runs yet. Start one with `fedcare simulate`, then reload this page.")
        st.stop()
    return run


def compared_runs() -> list[str]:
    return [st.session_state[FOCUS_KEY], *st.session_state.get(COMPARE_KEY, [])]


def header(title: str, run: dict) -> None:
    st.title(title)
    live = run["status"] in LIVE_STATUSES
    st.caption(f"run **{run['run_id']}** · {run['task']} · {run['strategy']} · DP {run['dp']} · "
               f"status {run['status']}" + (f" · refreshing every {REFRESH_S:g} s" if live else ""))


def live(body: Callable[[], None], run: dict, engine) -> None:
    """Render ``body``; for a live run, as a fragment that re-runs every REFRESH_S
    (and the whole page once the run has ended)."""
    if run["status"] not in LIVE_STATUSES:
        body()
        return

    def refreshing() -> None:
        now = q.run_info(engine, run["run_id"])
        if now is not None and now["status"] not in LIVE_STATUSES:
            st.rerun()
        body()

    st.fragment(refreshing, run_every=REFRESH_S)()


def lazy_tabs(labels: list[str], key: str) -> list:
    """Tabs of which only the open one is filled: ``if tab.open: with tab: ...``. A
    chart costs the browser 0.1-0.5 s to draw on a page load, so a page's detail
    charts wait behind a tab until asked for (a click reruns the page from the cache)."""
    return st.tabs(labels, key=key, on_change="rerun")


def lazy_expander(label: str, key: str):
    """An expander filled only while open (``if box.open: with box: ...``): the browser
    draws an expander's content even while it is closed (st.json's viewer: about 0.3 s)."""
    return st.expander(label, key=key, on_change="rerun")


def plot(fig, key: str | None = None) -> None:
    if fig.layout.margin.l is None:   # not from dashboard.figures: give it their margins and legend
        fig.update_layout(margin=dict(l=10, r=10, t=40, b=10), legend=dict(orientation="h", y=-0.2))
        if fig.layout.xaxis.title.text == "round":
            # rounds are whole numbers: no 1.2, 1.4 ... ticks on short runs
            fig.update_xaxes(tickformat="d", dtick=1 if _round_span(fig) <= 20 else None)
    st.plotly_chart(fig, key=key, config={"displaylogo": False})


def _round_span(fig) -> float:
    xs = [x for trace in fig.data if getattr(trace, "x", None) is not None for x in trace.x]
    numeric = [float(x) for x in xs if isinstance(x, numbers.Real) and not pd.isna(x)]
    return max(numeric) - min(numeric) if numeric else 0.0


def when(ts: float | None) -> str:
    if ts is None or pd.isna(ts):
        return ""
    return dt.datetime.fromtimestamp(float(ts), dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def nbytes(n: float | None) -> str:
    if n is None or pd.isna(n):
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def seconds(s: float | None) -> str:
    if s is None or pd.isna(s):
        return ""
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"
