"""Privacy & retention (admins): blurring, gender display, and the retention period that is enforced."""

from __future__ import annotations

import streamlit as st

from dashboard import ui
from dashboard.privacy import PrivacySettings, save_settings
from dashboard.retention import enforce

cfg = ui.config()
ui.require_role("admin")
st.title("Privacy & retention")
flash = st.session_state.pop("settings_flash", None)
if flash:
    (st.error if flash[0] == "error" else st.success)(flash[1])
current = ui.privacy()
st.caption(f"Last changed by {current.changed_by or 'nobody (config defaults)'}"
           + (f" at {current.changed_at}" if current.changed_at else ""))

with st.form("privacy"):
    blur = st.toggle("Blur people's heads on every image", value=current.blur_people,
                     help="On by default. Turn off only where the law and your signage allow it.")
    gender = st.toggle("Show gender estimates", value=current.show_gender)
    days = st.number_input("Keep analytics data for (days)", min_value=1, max_value=3650,
                           value=current.retention_days, step=1,
                           help="Sightings, tracks, paths and identities older than this are deleted from the "
                                "store, hourly and right after you save.")
    saved = st.form_submit_button("Save")
if saved:
    new = PrivacySettings(blur_people=blur, show_gender=gender, retention_days=int(days))
    save_settings(cfg.settings_path, new, st.session_state.get("user", "?"))
    run = enforce(cfg)
    if run.error or run.report is None:
        st.session_state["settings_flash"] = ("error", f"Saved, but retention could not run: {run.error}")
    else:
        st.session_state["settings_flash"] = (
            "success", f"Saved. Retention ({run.retention_days} days) deleted {run.report.sightings} sightings, "
            f"{run.report.tracks} tracks, {run.report.transitions} moves and {run.report.identities} identities; "
            f"{run.vectors}.")
    st.rerun()  # redraw with the new settings (sidebar, toggles, "last changed by")

worker = ui.retention_worker(cfg, cfg.model_dump_json())
last = worker.last
st.subheader("Retention runs")
if last is None:
    st.caption("The first run is in progress.")
elif last.error:
    st.error(f"Last run failed: {last.error}")
else:
    st.caption(f"Last automatic run {ui.fmt_local(last.at_us, cfg)}: kept {last.retention_days} days, deleted "
               f"{last.report.sightings} sightings, {last.report.tracks} tracks, {last.report.identities} identities; "
               f"{last.vectors}.")
