"""Benefit of joining: per hospital, on its own test split, the model it could train alone,
the global model and its personalised model, with the intervals the site computed, and
the site's class prevalence beside them (accuracy alone misleads when it differs)."""
import plotly.graph_objects as go
import streamlit as st

from fedcare.dashboard import common, figures
from fedcare.models.benefit import CI_METRICS

engine = common.engine_or_stop()
run = common.selected_run(engine)
common.header("Benefit of joining", run)
COLOURS = {"alone": "#9e9e9e", "global": "#0068c9", "personal": "#29b09d"}


def body() -> None:
    table = common.data(engine).benefit(run["run_id"])
    if table.empty:
        st.info(f"Run {run['run_id']} has no benefit numbers: run it with a personalisation method "
                "(--set personalize.method=finetune|personal_head|ditto) and/or --baselines alone.")
        return
    metrics = [m for m in CI_METRICS if m in table and table[m].notna().any()]
    metric = st.radio("Metric", metrics, horizontal=True, key="benefit_metric",
                      index=metrics.index("balanced_accuracy") if "balanced_accuracy" in metrics else 0)
    st.subheader(f"{metric} per hospital at round {int(table['round'].max())}")
    traces = []
    for model in ("alone", "global", "personal"):
        rows = table[table["model"] == model]
        if rows.empty:
            continue
        value = rows[metric].to_numpy(dtype=float)
        error = {}
        if f"{metric}_lo" in rows:
            error = {"error_y": {"type": "data", "symmetric": False,
                                 "array": rows[f"{metric}_hi"].to_numpy(dtype=float) - value,
                                 "arrayminus": value - rows[f"{metric}_lo"].to_numpy(dtype=float)}}
        traces.append({"type": "bar", "x": rows["site"].to_numpy(), "y": value, "name": model,
                       "marker": {"color": COLOURS[model]}, **error})
    fig = go.Figure({"data": traces, "layout": {
        **figures.LAYOUT, "barmode": "group", "title": {"text": f"{metric}: alone, global and personalised"},
        "xaxis": {"title": {"text": "site"}}, "yaxis": {"title": {"text": metric}}}})
    common.plot(fig, key="benefit_bars")
    st.caption("Bars: each model on the hospital's own held-out patients; whiskers: 95% bootstrap "
               "intervals computed at the site. A model that predicts the site's majority class scores its "
               "prevalence in accuracy but 0.5 in balanced accuracy and AUROC.")
    st.dataframe(site_table(table, metric), hide_index=True)


def site_table(table, metric: str):
    import pandas as pd

    fmt = lambda r, m: "-" if pd.isna(r.get(m)) else (  # noqa: E731
        f"{r[m]:.3f}" + ("" if pd.isna(r.get(f"{m}_lo")) else f" [{r[f'{m}_lo']:.3f}, {r[f'{m}_hi']:.3f}]"))
    rows = []
    for site, group in table.groupby("site", sort=True):
        by_model = {r["model"]: r for _, r in group.iterrows()}
        glob = by_model.get("global", {})
        prevalence = {c.removeprefix("prevalence_"): glob[c] for c in group.columns
                      if c.startswith("prevalence_") and not pd.isna(glob.get(c))}
        row = {"site": site, "test patients": int(group["num_examples"].max()),
               "class prevalence": " ".join(f"{k}: {v:.2f}" for k, v in prevalence.items()) or "suppressed"}
        for model in ("alone", "global", "personal"):
            if model in by_model:
                row[f"{model} {metric}"] = fmt(by_model[model], metric)
                if metric != "accuracy":
                    row[f"{model} accuracy"] = fmt(by_model[model], "accuracy")
        rows.append(row)
    return pd.DataFrame(rows)


common.live(body, run, engine)
