"""Overview: who is here now, how today compares, and what needs attention."""

from __future__ import annotations

import streamlit as st

from dashboard import charts, queries, ui
from dashboard.alerts import compute_alerts, fetch_server_health

cfg = ui.config()
st.title("Overview")
engine = ui.store_or_stop()
now = ui.now_us()
st.caption(f"As of {ui.fmt_local(now, cfg)} ({cfg.timezone})")

cams = queries.cameras(engine)
if cams.empty:
    ui.empty_state("No cameras yet.",
                   "The server has not received a frame from any appliance. Start an appliance "
                   "(`python -m appliance run --set source.url=<video or rtsp url> --set kafka.bootstrap=<broker>`); "
                   "its camera appears here within seconds.")
    st.stop()

presence = queries.presence_now(engine, now)
day_start, _ = queries.local_day_bounds(ui.today(cfg), cfg.timezone)
visitors_today = queries.unique_people(engine, day_start, now + 1)
compare = queries.footfall_vs_yesterday(engine, now, cfg.timezone)

c1, c2, c3 = st.columns(3)
c1.metric("People in view now", int(presence["people"].sum()),
          help=f"Distinct people on all cameras in the last {queries.PRESENT_WINDOW_S:.0f} s.")
c2.metric("Unique visitors today", visitors_today,
          help="Distinct people (cross-camera identities) seen since local midnight.")
delta = None if compare.change_pct is None else f"{compare.change_pct:+.0f}% vs yesterday"
c3.metric(f"Visitors this hour ({ui.fmt_local(compare.hour_start_us, cfg, '%H:00')}–now)", compare.this_hour,
          delta=delta, help=f"Same stretch of the same hour yesterday: {compare.same_hour_yesterday} visitors.")
st.caption(f"Same hour yesterday, same minutes: **{compare.same_hour_yesterday}** visitors.")

# --- alerts ---------------------------------------------------------------------------------------
fresh = queries.freshness(engine, now)
try:
    fleet = queries.fleet_devices(cfg.fleet_inventory, now, cfg.alerts.offline_after_s)
except queries.FleetUnavailable as exc:
    fleet = None
    st.caption(f"Appliance status not shown: {exc}")
health = fetch_server_health(cfg.server_health_url) if cfg.server_health_url else None
alerts = [a.text for a in compute_alerts(fresh["per_camera"], fleet, health, cfg.alerts)]
if alerts:
    st.subheader(f"Alerts ({len(alerts)})")
    for a in alerts:
        st.warning(a, icon=":material/warning:")
else:
    st.success("No alerts: every camera is sending and the store is up to date.", icon=":material/check_circle:")

left, right = st.columns([2, 3])
with left:
    ui.altair(charts.presence_bars(presence))
    st.dataframe(presence.rename(columns={"camera_id": "camera", "people": "people now"}), hide_index=True,
                 width="stretch")
with right:
    by_hour = queries.today_and_yesterday_by_hour(engine, now, cfg.timezone)
    if by_hour.empty:
        ui.empty_state("No visitors today or yesterday yet.", "Footfall per hour appears once people are seen.")
    else:
        ui.altair(charts.today_vs_yesterday(by_hour))
