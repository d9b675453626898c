"""Privacy: epsilon spent per site against its budget, per round and lifetime."""
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
    if by_site["epsilon"].isna().all():
        st.info(f"Run {run['run_id']} did not use differential privacy at the sites (DP: {run['dp']}), "
                "so no site reported privacy spend.")
        return
    dp = by_site.dropna(subset=["epsilon"]).copy()
    dp["budget used"] = (dp["epsilon"] / dp["budget"]).where(dp["budget"] > 0)
    cols = st.columns(3)
    cols[0].metric("Highest lifetime epsilon", f"{dp['epsilon'].max():.2f}", help=dp.loc[dp['epsilon'].idxmax(), "site"])
    cols[1].metric("This run's epsilon (max over sites)", f"{dp['run_epsilon'].max():.2f}")
    cols[2].metric("Sites that refused a round", int((dp["refused"] > 0).sum()))
    st.dataframe(dp[["site", "epsilon", "run_epsilon", "budget", "budget used", "delta", "dp_rounds", "refused",
                     "last_round"]], hide_index=True,
                 column_config={"epsilon": st.column_config.NumberColumn("lifetime epsilon", format="%.3f"),
                                "run_epsilon": st.column_config.NumberColumn("this run", format="%.3f"),
                                "budget used": st.column_config.ProgressColumn("budget used", min_value=0, max_value=1,
                                                                               format="percent")})
    fig = go.Figure()
    fig.add_bar(x=dp["site"], y=dp["epsilon"], name="lifetime epsilon")
    fig.add_bar(x=dp["site"], y=dp["run_epsilon"], name="this run")
    if dp["budget"].notna().any():
        fig.add_scatter(x=dp["site"], y=dp["budget"], mode="markers", name="budget",
                        marker=dict(symbol="line-ew-open", size=40, line=dict(width=3, color="#c62828")))
    fig.update_layout(barmode="group", title="Epsilon spent per site against its budget",
                      yaxis_title="epsilon")
    common.plot(fig, key="privacy_sites")

    series = data.privacy_series(run["run_id"])
    fig = figures.line(series, x="round", y="epsilon", color="site", markers=len(series) < 200,
                  title="Lifetime epsilon after each round")
    budgets = dp["budget"].dropna().unique()
    for b in budgets:
        fig.add_hline(y=float(b), line_dash="dash", line_color="#c62828", annotation_text=f"budget {b:g}")
    common.plot(fig, key="privacy_rounds")


common.live(body, run, engine)
