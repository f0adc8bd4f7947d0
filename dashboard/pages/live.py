"""Live: the newest frame (or crops) of each camera with boxes and global ids, refreshing on its own.

The fragment only lays out pictures; reading Kafka (``LiveFeed``) and drawing (``render_camera``)
live in :mod:`dashboard.live_feed`, where they are tested without a browser.
"""

from __future__ import annotations

import streamlit as st

from dashboard import ui
from dashboard.live_feed import render_camera, short_id

cfg = ui.config()
st.title("Live")
settings = ui.privacy()
if cfg.live.kafka_bootstrap is None:
    ui.empty_state("The Live view is turned off.", "Set live.kafka_bootstrap in the dashboard config to the "
                   "Kafka broker the appliances send to.")
    st.stop()
feed = ui.live_feed(cfg.live.kafka_bootstrap, cfg.live.input_topic, cfg.live.output_topic, cfg.live.lookback_s)
st.caption(("Heads are blurred (privacy setting). " if settings.blur_people else "Blurring is OFF. ")
           + f"Refreshes every {cfg.live.refresh_s:g} s from {cfg.live.kafka_bootstrap}.")


def show(blur: bool) -> None:
    snap = feed.snapshot()
    if feed.error:
        st.error(f"Live feed problem: {feed.error}. Retrying every few seconds.")
    if not snap:
        ui.empty_state("No camera has sent anything since the Live view started.",
                       "Cameras appear here as soon as an appliance sends frames. Full frames need the "
                       "appliance's full-frame option; without it, each person's latest crop is shown in its box.")
        return
    cols = st.columns(min(2, len(snap)))
    for i, (cam, view) in enumerate(snap.items()):
        img, caption = render_camera(view, blur=blur)
        with cols[i % len(cols)]:
            st.subheader(cam)
            st.image(img, caption=f"{caption} · device {view.device_id}", width="stretch")
            ids = sorted({short_id(t.global_id) for t in view.tracks.values()})
            st.caption("Global ids in view: " + (", ".join(ids) if ids else "none"))


@st.fragment(run_every=cfg.live.refresh_s)
def live_panel() -> None:
    show(settings.blur_people)


live_panel()
