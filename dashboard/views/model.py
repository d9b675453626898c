"""Model: the run's model card (what `fedcare export` writes) and an export button."""
import tempfile
from pathlib import Path

import streamlit as st

from fedcare.dashboard import common
from fedcare.errors import FedcareError

engine = common.engine_or_stop()
run = common.selected_run(engine)
common.header("Model", run)


@st.cache_data(show_spinner="Building the model card from the store...", max_entries=16)
def card(url: str, run_id: str, rnd: int, stamp: tuple) -> str:
    from fedcare.server.export import preview
    from fedcare.server.store import Store

    with Store(url) as store:
        return preview(store, run_id, rnd)[1]


def export_zip(url: str, run_id: str, rnd: int) -> bytes:
    from fedcare.server.export import export_run, zip_folder
    from fedcare.server.store import Store

    with tempfile.TemporaryDirectory() as folder, Store(url) as store:
        export_run(store, run_id, Path(folder) / "model", rnd)
        return zip_folder(Path(folder) / "model")


def body() -> None:
    data = common.data(engine)
    rounds = data.state_rounds(run["run_id"])
    if not rounds:
        st.info(f"Run {run['run_id']} has no stored global model yet: it appears after its first round.")
        return
    if run["status"] != "completed":
        st.caption(f"The run is {run['status']}: only a committed round can be exported.")
    rnd = st.selectbox("Round", rounds, index=len(rounds) - 1, key="model_round")
    exported = data.exported_rounds(run["run_id"])
    st.caption("Exported before: " + (", ".join(f"round {r}" for r in exported) if exported else "never"))
    left, right = st.columns(2)
    if left.button(f"Export round {rnd}", key="model_export", type="primary"):
        try:
            st.session_state["model_zip"] = (run["run_id"], rnd, export_zip(common.db_url(), run["run_id"], rnd))
            common.forget_cached()
            st.rerun()
        except FedcareError as err:
            st.error(str(err))
    ready = st.session_state.get("model_zip")
    if ready and ready[:2] == (run["run_id"], rnd):
        right.download_button(f"Download {run['run_id']}-round{rnd}.zip", ready[2],
                              file_name=f"{run['run_id']}-round{rnd}.zip", mime="application/zip", key="model_zip_dl")
    if st.toggle("Show the model card", key="model_show_card", value=bool(ready)):
        try:
            text = card(common.db_url(), run["run_id"], rnd, data.stamp)
        except FedcareError as err:
            st.error(str(err))
            return
        _, header, markdown = text.split("---\n", 2)
        st.markdown(markdown)
        with st.expander("Metadata header (YAML)"):
            st.code(header, language="yaml")


common.live(body, run, engine)
