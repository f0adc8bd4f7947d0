"""Fleet (admins): every appliance with status, model version, last seen and health; rollout progress."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import queries, ui

cfg = ui.config()
ui.require_role("admin")
st.title("Fleet")
now = ui.now_us()
try:
    devices = queries.fleet_devices(cfg.fleet_inventory, now, cfg.alerts.offline_after_s)
    campaigns = queries.fleet_campaigns(cfg.fleet_inventory)
except queries.FleetUnavailable as exc:
    st.error(f"**Fleet inventory unavailable.** {exc}")
    st.stop()

if devices.empty:
    ui.empty_state("No appliances registered.",
                   "Provision one with `python -m fleet device add <id>` and install its bundle on the box; it "
                   "shows up here when its agent first connects.")
    st.stop()

online = int((devices["state"] == "online").sum())
offline = int((devices["state"] == "offline").sum())
unhealthy = int(((devices["health"] != "") & (devices["health"] != "ok")).sum())
c1, c2, c3, c4 = st.columns(4)
c1.metric("Appliances", len(devices))
c2.metric("Online", online)
c3.metric("Offline", offline)
c4.metric("Unhealthy", unhealthy)

def _fps(telemetry: dict) -> str:
    fps = (telemetry.get("pipeline") or {}).get("fps")
    return f"{fps:.1f}" if isinstance(fps, int | float) else "–"


table = pd.DataFrame({
    "device": devices["device_id"],
    "group": devices["device_group"],
    "status": devices["state"],
    "model": devices["model_id"],
    "model version": devices["model_version"],
    "slot": devices["model_slot"],
    "config": devices["config_version"],
    "last seen": [ui.fmt_local(None if pd.isna(v) else int(float(v) * 1e6), cfg) for v in devices["last_seen"]],
    "ago": [ui.fmt_age(a) if a is not None and not pd.isna(a) else "never" for a in devices["last_seen_age_s"]],
    "health": [h or "unknown" for h in devices["health"]],
    "detail": [d or r for d, r in zip(devices["health_detail"], devices["state_reason"], strict=True)],
    "fps": [_fps(t) for t in devices["telemetry"]],
})


def _colour(row: pd.Series) -> list[str]:
    bad = row["status"] != "online" or row["health"] not in ("ok", "unknown")
    return ["background-color: #fde2e1" if bad else ""] * len(row)


st.dataframe(table.style.apply(_colour, axis=1), hide_index=True, width="stretch")
ui.csv_button("Download the device list (CSV)", table, "fleet_devices.csv", "csv_fleet")

st.subheader("Model rollouts")
if campaigns.empty:
    ui.empty_state("No rollout yet.", "Start one with `python -m fleet rollout start <artifact>`: a canary wave "
                   "first, then growing waves, each only after the previous one is healthy.")
else:
    for row in campaigns.itertuples():
        wave = (f"wave {int(row.current_wave) + 1} of {len(row.waves)}" if int(row.current_wave) >= 0
                else f"{len(row.waves)} waves planned, first not sent yet")
        label = f"**{row.model}** · {row.state} · {wave} · {int(row.done)}/{int(row.devices)} devices finished"
        st.markdown(label)
        st.progress(float(row.progress), text=f"{row.progress:.0%}")
        states = {s: int(getattr(row, s)) for s in ("pending", "sent", "succeeded", "failed", "rolled_back",
                                                     "timed_out", "skipped", "reverted") if hasattr(row, s)}
        st.caption(" · ".join(f"{k.replace('_', ' ')} {v}" for k, v in states.items() if v)
                   + (f" — {row.reason}" if row.reason else ""))
