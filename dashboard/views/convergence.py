"""Convergence: global metrics per round, per-site curves, local vs global."""
import streamlit as st

from fedcare.dashboard import common, figures
from fedcare.server import queries as q

engine = common.engine_or_stop()
run = common.selected_run(engine)
common.header("Convergence", run)


def body() -> None:
    data = common.data(engine)
    names = data.metric_names(run["run_id"])
    if not names:
        st.info(f"Run {run['run_id']} has no evaluation yet: curves appear after its first evaluated round.")
        return
    metric = st.selectbox("Metric", names, index=names.index("accuracy") if "accuracy" in names else 0, key="conv_metric")
    compared = common.compared_runs()
    series = data.global_metric(compared, metric)
    series["curve"] = series["run_id"] + " · " + series["kind"]
    fig = figures.line(series, x="round", y="value", color="run_id", line_dash="kind", markers=len(series) < 200,
                  title=f"Global {metric} (test splits, weighted by examples)", labels={"value": metric})
    for r in data.exported_rounds(run["run_id"]):   # the rounds `fedcare export` wrote
        fig.add_vline(x=r, line_dash="dot", line_color="gray", annotation_text=f"exported (round {r})")
    common.plot(fig, key="conv_global")

    kinds = data.evaluation_kinds(run["run_id"])
    each_site, training = common.lazy_tabs(["Each site's test split", "Training loss"], key="conv_tab")
    if each_site.open:
        with each_site:
            per_site = data.site_metric(run["run_id"], metric, q.FEDERATED)
            fig = figures.site_lines(per_site, x="round", y="value", labels={"value": metric},
                                     worst="max" if figures.lower_is_better(metric) else "min",
                                     markers=len(per_site) < 200,
                                     title=f"{metric} of the global model on each site's test split")
            common.plot(fig, key="conv_sites")
    if training.open:
        with training:
            loss = data.train_loss(run["run_id"])
            if not loss.empty and loss["train_loss"].notna().any():
                fig = figures.site_lines(loss, x="round", y="train_loss", worst="max",
                                         title="Training loss of accepted updates")
                common.plot(fig, key="conv_loss")
            else:
                st.caption("No accepted update of this run reported a training loss.")

    if q.LOCAL in kinds:
        final = data.final_site_metrics(run["run_id"], metric)
        final = final[final["scope"] != q.GLOBAL]
        fig = figures.bar(final, x="scope", y="value", color="kind", barmode="group",
                     title=f"Local (personalised) vs global model: {metric} at the latest round",
                     labels={"scope": "site", "value": metric})
        common.plot(fig, key="conv_local")
    else:
        st.caption("This run has no personalised (local) models, so there is no local-vs-global view.")


common.live(body, run, engine)
