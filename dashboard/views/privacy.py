"""Privacy: epsilon spent per site against its budget, per round and lifetime; and, where
sites audited the run, the empirical lower bound beside the accountant's epsilon."""
import plotly.graph_objects as go
import streamlit as st

from fedcare.dashboard import common, figures
from fedcare.server import queries as q

engine = common.engine_or_stop()
run = common.selected_run(engine)
common.header("Privacy", run)


def body() -> None:
    data = common.data(engine)
    by_site = data.privacy_by_site(run["run_id"])
    if by_site.empty:
        st.info(f"Run {run['run_id']} has no completed round yet.")
        return
    audit_section(data)
    if by_site["epsilon"].isna().all():
        st.info(f"Run {run['run_id']} did not use differential privacy at the sites (DP: {run['dp']}), "
                "so no site reported privacy spend.")
        return
    dp = by_site.dropna(subset=["epsilon"]).copy()
    dp["budget used"] = (dp["epsilon"] / dp["budget"]).where(dp["budget"] > 0)
    head = st.container()   # filled after the first chart, which the browser then starts loading sooner
    per_site, over_rounds = common.lazy_tabs(["Per site against its budget", "Over rounds"], key="privacy_tab")
    if per_site.open:
        with per_site:
            sites = dp["site"].to_numpy()
            traces = [{"type": "bar", "x": sites, "y": dp["epsilon"].to_numpy(), "name": "lifetime epsilon",
                       "marker": {"color": "#0068c9"}},
                      {"type": "bar", "x": sites, "y": dp["run_epsilon"].to_numpy(), "name": "this run",
                       "marker": {"color": "#83c9ff"}}]
            if (dp["budget"] > 0).any():   # a budget of 0 is no cap: nothing to draw
                traces.append({"type": "scatter", "x": sites, "y": dp["budget"].where(dp["budget"] > 0).to_numpy(), "mode": "markers",
                               "name": "budget", "marker": {"symbol": "line-ew-open", "size": 40, "color": "#c62828",
                                                            "line": {"width": 3, "color": "#c62828"}}})
            fig = go.Figure({"data": traces, "layout": {
                **figures.LAYOUT, "barmode": "group", "title": {"text": "Epsilon spent per site against its budget"},
                "xaxis": {"title": {"text": "site"}}, "yaxis": {"title": {"text": "epsilon"}}}})
            common.plot(fig, key="privacy_sites")
    if over_rounds.open:
        with over_rounds:
            series = data.privacy_series(run["run_id"])
            fig = figures.site_lines(series, x="round", y="epsilon", worst="max", markers=len(series) < 200,
                                     title="Lifetime epsilon after each round")
            for b in dp["budget"][dp["budget"] > 0].unique():
                fig.add_hline(y=float(b), line_dash="dash", line_color="#c62828", annotation_text=f"budget {b:g}")
            common.plot(fig, key="privacy_rounds")

    with head:
        cols = st.columns(3)
        cols[0].metric("Highest lifetime epsilon", f"{dp['epsilon'].max():.2f}",
                       help=dp.loc[dp['epsilon'].idxmax(), "site"])
        cols[1].metric("This run's epsilon (max over sites)", f"{dp['run_epsilon'].max():.2f}")
        cols[2].metric("Sites that refused a round", int((dp["refused"] > 0).sum()))
        st.dataframe(dp.assign(budget=dp["budget"].map(q.budget_label))[["site", "epsilon", "run_epsilon", "budget", "budget used", "delta", "dp_rounds", "refused",
                         "last_round"]], hide_index=True,
                     column_config={"epsilon": st.column_config.NumberColumn("lifetime epsilon", format="%.3f"),
                                    "run_epsilon": st.column_config.NumberColumn("this run", format="%.3f"),
                                    "budget used": st.column_config.ProgressColumn("budget used", min_value=0,
                                                                                   max_value=1, format="percent")})


def audit_section(data) -> None:
    """The privacy audit: what the training demonstrably leaks (a lower bound) beside
    what the accountant claims; a bound above the claim is a privacy bug."""
    audit = data.privacy_audit(run["run_id"])
    if audit.empty:
        return
    st.subheader("Privacy audit: accountant epsilon vs empirical lower bound")
    bugs = audit[audit["exceeds"]]
    if not bugs.empty:
        st.error(f"Privacy bug: at {', '.join(bugs['site'])} the audit's lower bound exceeds the accountant's "
                 "epsilon, so the training leaks more than the accountant reports.")
    else:
        st.caption("Each audited site trained with canaries (each included with probability 1/2 by a secret "
                   "seed) and bounded epsilon from below at 95% confidence; the bound must stay below the "
                   "accountant's epsilon. A bound is evidence, not a guarantee: a low bound proves nothing.")
    st.dataframe(audit[["site", "run_epsilon", "epsilon_lower_bound", "exceeds", "canaries", "guesses", "correct",
                        "round"]], hide_index=True,
                 column_config={"run_epsilon": st.column_config.NumberColumn("accountant epsilon", format="%.3f"),
                                "epsilon_lower_bound": st.column_config.NumberColumn("audit lower bound",
                                                                                     format="%.3f"),
                                "exceeds": st.column_config.CheckboxColumn("bound > accountant")})
    fig = go.Figure()
    fig.add_bar(x=audit["site"], y=audit["run_epsilon"], name="accountant epsilon (this run)")
    fig.add_bar(x=audit["site"], y=audit["epsilon_lower_bound"], name="audit lower bound",
                marker_color=["#c62828" if e else "#2e7d32" for e in audit["exceeds"]])
    fig.update_layout(barmode="group", title="Claimed epsilon vs demonstrated leakage", yaxis_title="epsilon")
    common.plot(fig, key="privacy_audit")


common.live(body, run, engine)
