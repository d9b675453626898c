"""The fedcare dashboard (``fedcare dashboard`` runs ``streamlit run`` on this file).

Login first (when configured), then the store, the run selection and the pages.
"""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from fedcare.dashboard import auth, common

VIEWS = Path(__file__).with_name("views")

st.set_page_config(page_title="fedcare", page_icon=":material/monitor_heart:", layout="wide")

_address = st.get_option("server.address") or "127.0.0.1"
if not auth.configured_password_hash() and not auth.oidc_configured() and not auth.is_loopback(_address):
    st.error(f"This dashboard is served on {_address} without a login. Restart it with "
             "`fedcare dashboard` on 127.0.0.1, or configure a login (see `fedcare dashboard --help`).")
    st.stop()
if not auth.gate():
    st.stop()

navigation = st.navigation([
    st.Page(VIEWS / "runs.py", title="Runs", icon=":material/list:", default=True),
    st.Page(VIEWS / "convergence.py", title="Convergence", icon=":material/show_chart:"),
    st.Page(VIEWS / "sites.py", title="Sites", icon=":material/local_hospital:"),
    st.Page(VIEWS / "fairness.py", title="Fairness", icon=":material/balance:"),
    st.Page(VIEWS / "benefit.py", title="Benefit", icon=":material/volunteer_activism:"),
    st.Page(VIEWS / "privacy.py", title="Privacy", icon=":material/shield:"),
    st.Page(VIEWS / "events.py", title="Events", icon=":material/event_note:"),
    st.Page(VIEWS / "model.py", title="Model", icon=":material/package_2:"),
])
engine = common.engine_or_stop()
common.sidebar_selection(engine)
navigation.run()
