"""Streamlit entry point: login, role-based navigation, and the privacy state shown on every page.

Run with ``python -m dashboard run`` (or ``just dashboard``), which binds 127.0.0.1 and passes the
config path in ``REIDFLEET_DASHBOARD_CONFIG``. Managers get Overview, Live, Analytics and Search;
admins also get Fleet and Settings (privacy, retention).
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from dashboard import ui
from dashboard.auth import pages_for

HERE = Path(__file__).resolve().parent
PAGES = {
    "overview": ("pages/overview.py", "Overview", ":material/dashboard:"),
    "live": ("pages/live.py", "Live", ":material/videocam:"),
    "analytics": ("pages/analytics.py", "Analytics", ":material/insights:"),
    "search": ("pages/search.py", "Search", ":material/person_search:"),
    "fleet": ("pages/fleet.py", "Fleet", ":material/dns:"),
    "settings": ("pages/settings.py", "Privacy & retention", ":material/shield_person:"),
}

st.set_page_config(page_title="reidfleet", page_icon=":material/groups:", layout="wide")
cfg = ui.config()
ui.retention_worker(cfg, cfg.model_dump_json())  # enforced from the first page load on, hourly


def login_page() -> None:
    st.title("reidfleet dashboard")
    st.caption("Sign in to see footfall, dwell times and paths between cameras.")
    with st.form("login"):
        name = st.text_input("User name")
        password = st.text_input("Password", type="password")
        submitted = st.form_submit_button("Sign in")
    if submitted:
        result = ui.authenticator(cfg.auth.model_dump_json(), cfg).login(name, password)
        if result.ok:
            st.session_state["user"] = name.strip()
            st.session_state["role"] = result.role
            st.rerun()
        else:
            st.error(result.message)


if not st.session_state.get("user"):
    nav = st.navigation([st.Page(login_page, title="Sign in", icon=":material/login:")])
else:
    role = st.session_state.get("role")
    pages = [st.Page(str(HERE / PAGES[key][0]), title=PAGES[key][1], icon=PAGES[key][2],
                     default=(key == "overview"), url_path=key) for key in pages_for(role)]
    nav = st.navigation(pages)
    with st.sidebar:
        st.markdown(f"Signed in as **{st.session_state['user']}** ({role})")
        settings = ui.privacy()
        st.caption(("Privacy: heads blurred" if settings.blur_people else "Privacy: blurring OFF (admin)")
                   + f" · data kept {settings.retention_days} days")
        if st.button("Sign out", key="logout"):
            for key in ("user", "role"):
                st.session_state.pop(key, None)
            st.rerun()
nav.run()
