"""Fairness: per-group metrics over rounds, their differences, worst group and site,
and the same experiment at several epsilons side by side."""
import streamlit as st

from fedcare.dashboard import common, figures
from fedcare.models.sitedata import label_names
from fedcare.server import queries as q

engine = common.engine_or_stop()
run = common.selected_run(engine)
common.header("Fairness", run)
METRICS = ["accuracy", "tpr", "fpr", "selection_rate", "auroc", "ece"]
#: groups that are the true classes: a group's accuracy is that class's recall, and its
#: tpr/fpr/selection rate/auroc, and the parity and odds differences between classes, mean nothing
CLASS = "class"
CLASS_METRICS = ["accuracy", "ece"]


def shown_names(attribute: str, names: list[str]) -> dict[str, str]:
    """Group -> the name shown: the run's label names for its "class k" groups."""
    if attribute != CLASS:
        return {g: g for g in names}
    labels = label_names(run["task"], str(((run.get("config") or {}).get("data") or {}).get("labels", "")))
    index = {f"class {k}": name for k, name in enumerate(labels)}
    return {g: index.get(g, g) for g in names}


def body() -> None:
    data = common.data(engine)
    latest = data.fairness_latest(run["run_id"])
    if latest is None:
        st.info(f"Run {run['run_id']} has no fairness numbers yet: they come with the first evaluated round "
                "(sites report per-group counts on their test splits).")
        return
    rnd, fairness = latest
    groups = q.fairness_groups(fairness)
    if fairness.get("excluded_sites"):
        st.warning("Left out of the fairness numbers: " +
                   "; ".join(f"{s}: {why}" for s, why in fairness["excluded_sites"].items()))
    if list(groups) == ["class"]:
        st.caption("This task has no sensitive attributes: groups are the true classes, and hospitals are "
                   "compared below.")
    attribute = st.radio("Attribute", list(groups), horizontal=True, key="fair_attribute") if groups else None
    if attribute:
        attribute_view(data, attribute, groups[attribute], fairness[attribute], rnd)
    site_view(fairness.get("by_site", {}), rnd)
    epsilon_view(data)


def attribute_view(data, attribute: str, names: list[str], summary: dict, rnd: int) -> None:
    st.subheader(f"{attribute}: groups at round {rnd}")
    shown = shown_names(attribute, names)
    metrics = CLASS_METRICS if attribute == CLASS else METRICS
    head = st.container()   # filled after the first chart, which the browser then starts loading sooner
    over_rounds, differences = common.lazy_tabs(["Groups over rounds", "Differences over rounds"], key="fair_tab")
    if over_rounds.open:
        with over_rounds:
            metric = st.selectbox("Group metric over rounds", metrics, key="fair_metric")
            series = data.fairness_series(run["run_id"], attribute, names, metric).rename(columns=shown)
            present = [shown[g] for g in names if shown[g] in series and series[shown[g]].notna().any()]
            if present:
                long = series.melt(id_vars="round", value_vars=present, var_name="group", value_name=metric)
                fig = figures.line(long, x="round", y=metric, color="group", markers=len(long) < 200,
                                   title=f"{metric} per {attribute} group")
                common.plot(fig, key="fair_groups")
    if differences.open:
        with differences:
            # the differences are in every metric's series; accuracy's is the one the other tab reads first
            series = data.fairness_series(run["run_id"], attribute, names, METRICS[0])
            gaps = {"demographic_parity_difference": "demographic parity difference",
                    "equalized_odds_difference": "equalized odds difference",
                    "site_gap": "best - worst site accuracy"}
            if attribute == CLASS:
                gaps = {"site_gap": gaps["site_gap"]}
            diffs = series.rename(columns=gaps).melt(id_vars="round", value_vars=list(gaps.values()),
                                                     var_name="measure")
            fig = figures.line(diffs, x="round", y="value", color="measure",
                               title=f"{attribute}: differences over rounds")
            common.plot(fig, key="fair_diffs")
    with head:
        summary_view(names, summary, shown, metrics)


def summary_view(names: list[str], summary: dict, shown: dict[str, str], metrics: list[str]) -> None:
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    worst = shown.get(summary.get("worst_group"), summary.get("worst_group"))
    if metrics == CLASS_METRICS:   # groups are the true classes: only each class's recall means something
        st.metric("Worst class recall", fmt(summary.get("worst_group_accuracy")), help=f"worst class: {worst}")
    else:
        cols = st.columns(3)
        cols[0].metric("Demographic parity difference", fmt(summary.get("demographic_parity_difference")))
        cols[1].metric("Equalized odds difference", fmt(summary.get("equalized_odds_difference")))
        cols[2].metric("Worst group accuracy", fmt(summary.get("worst_group_accuracy")), help=f"worst group: {worst}")
    rows = []
    for group in names:
        m = summary["by_group"][group]
        rows.append({"group": shown[group],
                     **({k: m.get(k) for k in ["n", *metrics]} if not m.get("suppressed") else {}),
                     **{f"{k} 95% CI": f"[{m[k + '_lo']:.3f}, {m[k + '_hi']:.3f}]" for k in metrics
                        if m.get(f"{k}_lo") is not None},
                     **{k: m[k] for k in ("train_n", "train_accuracy", "generalisation_gap") if k in m},
                     "suppressed at": ", ".join(m.get("suppressed_at", [])) or ""})
    import pandas as pd

    table = pd.DataFrame(rows)
    styled = table.style.apply(lambda r: ["background-color: #ffcdd2" if r["group"] == worst else "" for _ in r],
                               axis=1).format(precision=3, na_rep="suppressed")
    st.dataframe(styled, hide_index=True)
    st.caption(f"Worst group (lowest accuracy) highlighted: **{worst}**. Groups smaller than a site's threshold "
               "are suppressed at that site and contribute nothing from it. Intervals: 95% Wilson score "
               "intervals from the released counts (a gap between two groups whose intervals overlap widely "
               "may be chance). train_accuracy: the same model on the sites' training patients of the group "
               "(last round); generalisation_gap = train - held-out accuracy.")


def site_view(by_site: dict, rnd: int) -> None:
    sites = by_site.get("sites", {})
    if not sites:
        return
    st.subheader(f"Hospitals at round {rnd}")
    import pandas as pd

    table = pd.DataFrame([{"site": s, **m} for s, m in sites.items()])
    worst = by_site.get("worst_site")
    table["highlight"] = table["site"].map(lambda s: "worst site" if s == worst else "other sites")
    cols = st.columns(3)
    cols[0].metric("Worst site", str(worst), help="lowest accuracy on its own test split")
    cols[1].metric("Best - worst accuracy", "n/a" if by_site.get("gap") is None else f"{by_site['gap']:.3f}")
    cols[2].metric("Spread (std) of site accuracy", "n/a" if by_site.get("spread") is None else f"{by_site['spread']:.3f}")
    fig = figures.bar(table.sort_values("accuracy"), x="site", y="accuracy", color="highlight",
                      color_map={"worst site": "#c62828", "other sites": "#1565c0"},
                      hover_data=[c for c in ("n", "tpr", "fpr", "auroc", "ece") if c in table],
                      title="Accuracy per hospital (worst in red)")
    common.plot(fig, key="fair_sites")


def epsilon_view(data) -> None:
    siblings = data.epsilon_siblings(run["run_id"])
    if siblings.empty:
        st.caption("No other run of this experiment with different DP settings in the store.")
        return
    st.subheader("The same experiment at several privacy levels")
    st.dataframe(siblings, hide_index=True)
    measures = [c for c in siblings.columns if c.endswith(("worst_group_accuracy", "equalized_odds_difference"))]
    long = siblings.assign(setting=siblings["dp"]).melt(id_vars="setting", value_vars=["accuracy", *measures],
                                                        var_name="measure")
    fig = figures.bar(long, x="measure", y="value", color="setting", barmode="group",
                 title="Accuracy, worst-group accuracy and equalized odds by DP setting")
    common.plot(fig, key="fair_epsilon")


common.live(body, run, engine)
