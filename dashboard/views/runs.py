"""Runs: every run in the store; the selected ones compared."""
import streamlit as st

from fedcare.dashboard import common, figures
from fedcare.server import queries as q

engine = common.engine_or_stop()
run = common.selected_run(engine)
common.header("Runs", run)


def body() -> None:
    data = common.data(engine)
    runs = common.runs_table(engine)
    table = runs.assign(
        rounds=runs["rounds_done"].astype(str) + " / " + runs["rounds_planned"].fillna(0).astype(int).astype(str),
        sites=runs["sites_seen"].astype(str) + " / " + runs["sites_planned"].fillna(0).astype(int).astype(str),
        started=runs["started_at"].map(common.when), ended=runs["ended_at"].map(common.when))
    st.dataframe(table[["run_id", "status", "task", "strategy", "dp", "rounds", "sites", "started", "ended", "message"]],
                 hide_index=True, key="runs_table")
    st.caption("Pick the run to show in the sidebar; add runs under *Compare with* to overlay them here and on "
               "the Convergence page.")

    names = data.metric_names(run["run_id"])
    if not names:
        st.info(f"Run {run['run_id']} has no evaluation yet: metrics appear after its first round.")
        return
    final_metric = "accuracy" if "accuracy" in names else names[0]
    final = data.final_site_metrics(run["run_id"], final_metric)
    cols = st.columns(4)
    cols[0].metric("Rounds", f"{run_rounds(runs)} / {run['rounds_planned'] or '?'}")
    glob = final[(final["scope"] == q.GLOBAL) & (final["kind"] == q.FEDERATED)]
    sites = final[(final["scope"] != q.GLOBAL) & (final["kind"] == q.FEDERATED)]
    cols[1].metric("Sites evaluated", len(sites))
    if not glob.empty:
        cols[2].metric(f"Global {final_metric}", f"{glob['value'].iloc[0]:.3f}")
    if not sites.empty:
        worst = sites.loc[sites["value"].idxmin()]
        cols[3].metric(f"Worst site: {worst['scope']}", f"{worst['value']:.3f}")
        fig = figures.bar(final[final["scope"] != q.GLOBAL], x="scope", y="value", color="kind", barmode="group",
                     title=f"Latest round, per site (test splits): {final_metric}",
                     labels={"scope": "site", "value": final_metric})
        common.plot(fig, key="runs_sites")

    metric = st.selectbox("Metric", names, index=names.index("accuracy") if "accuracy" in names else 0, key="runs_metric")
    compared = common.compared_runs()
    series = data.global_metric(compared, metric)
    series = series[series["kind"] == q.FEDERATED]
    fig = figures.line(series, x="round", y="value", color="run_id", markers=len(series) < 200,
                  title=f"Global {metric} per round" + (" (compared runs)" if len(compared) > 1 else ""),
                  labels={"value": metric})
    common.plot(fig, key="runs_compare")
    config = common.lazy_expander(f"Configuration of {run['run_id']}", key="runs_config")
    if config.open:
        with config:
            st.json(run["config"], expanded=False)


def run_rounds(runs) -> int:
    row = runs[runs["run_id"] == run["run_id"]]
    return int(row["rounds_done"].iloc[0]) if not row.empty else 0


common.live(body, run, engine)
