"""Events: what happened to the run (starts, resumes, refusals, failures)."""
import json

import pandas as pd
import streamlit as st

from fedcare.dashboard import common, figures

engine = common.engine_or_stop()
run = common.selected_run(engine)
common.header("Events", run)
LIMIT = 500


def body() -> None:
    data = common.data(engine)
    counts = data.event_counts(run["run_id"])
    if counts.empty:
        st.info(f"Run {run['run_id']} has no events yet.")
        return
    cols = st.columns(min(6, len(counts)))
    for col, row in zip(cols, counts.itertuples()):
        col.metric(row.kind, int(row.count))
    if run.get("message"):
        (st.error if run["status"] == "failed" else st.info)(f"{run['status']}: {run['message']}")
    events = data.events(run["run_id"], limit=LIMIT)
    events["time"] = pd.to_datetime(events["time"], unit="s", utc=True)
    events["data"] = events["data"].map(lambda d: json.dumps(d) if d else "")
    fig = figures.scatter(events, x="time", y="kind", color="kind", hover_data=["message"], size=12,
                          title="Events over time")
    common.plot(fig, key="events_timeline")
    st.dataframe(events[["time", "kind", "message", "data"]], hide_index=True)
    if int(counts["count"].sum()) > LIMIT:
        st.caption(f"The latest {LIMIT} of {int(counts['count'].sum())} events.")


common.live(body, run, engine)
