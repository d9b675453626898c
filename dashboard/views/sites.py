"""Sites: participation per round, examples, update sizes, durations, problems."""
import streamlit as st

from fedcare.dashboard import common, figures

engine = common.engine_or_stop()
run = common.selected_run(engine)
common.header("Sites", run)

STATUS_COLORS = {"accepted": "#2e7d32", "rejected": "#c62828", "refused": "#ef6c00", "failed": "#6a1b9a"}


def body() -> None:
    data = common.data(engine)
    totals = data.site_totals(run["run_id"])
    if totals.empty:
        st.info(f"Run {run['run_id']} has no completed round yet: sites appear after the first round.")
        return
    table = st.container()   # filled after the first chart, which the browser then starts loading sooner
    outcomes, grid_tab, per_round = common.lazy_tabs(
        ["Outcomes per round", "Accepted per site and round", "Per site and round"], key="sites_tab")
    if outcomes.open:
        with outcomes:
            part = data.participation(run["run_id"], max_points=120)   # 120 bars of 3 outcomes: 360 SVG paths
            fig = figures.bar(part, x="round", y="sites", color="status", color_map=STATUS_COLORS,
                              title="Sites per round by outcome")
            common.plot(fig, key="sites_participation")
    if grid_tab.open:
        with grid_tab:
            grid = data.site_status_grid(run["run_id"])
            heat = grid.pivot(index="site", columns="round", values="accepted_share")
            fig = figures.heatmap(heat, colors=("#c62828", "#fdd835", "#2e7d32"), zmin=0, zmax=1, zlabel="accepted",
                                  title="Accepted updates per site and round (share within each round bucket)")
            common.plot(fig, key="sites_grid")
    if per_round.open:
        with per_round:
            column = st.radio("Per round", ["num_examples", "update_bytes", "duration_s"], horizontal=True,
                              format_func={"num_examples": "examples", "update_bytes": "update bytes",
                                           "duration_s": "duration (s)"}.get, key="sites_series")
            series = data.site_series(run["run_id"], column)
            fig = figures.site_lines(series, x="round", y=column, worst="min" if column == "num_examples" else "max",
                                     title=f"{column} per site and round")
            common.plot(fig, key="sites_series_chart")

    shown = totals.assign(mean_update=totals["mean_update_bytes"].map(common.nbytes),
                          total_sent=totals["total_update_bytes"].map(common.nbytes),
                          mean_duration=totals["mean_duration_s"].map(common.seconds),
                          max_duration=totals["max_duration_s"].map(common.seconds))
    table.dataframe(shown[["site", "rounds", "accepted", "rejected", "refused", "failed", "examples",
                           "mean_update", "total_sent", "mean_duration", "max_duration", "last_round"]],
                    hide_index=True)

    problems = data.site_problems(run["run_id"])
    st.subheader("Rejected, refused and failed updates")
    if problems.empty:
        st.success("Every site-round of this run was accepted.")
    else:
        st.dataframe(problems, hide_index=True)


common.live(body, run, engine)
