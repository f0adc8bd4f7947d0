"""Search: people by gender, camera and time window, or by an example image (nearest identities)."""

from __future__ import annotations

import json
from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo

import cv2
import numpy as np
import pandas as pd
import streamlit as st

from dashboard import queries, ui
from dashboard.privacy import blur_crop
from dashboard.vectors import VectorsUnavailable

cfg = ui.config()
st.title("Search")
engine = ui.store_or_stop()
settings = ui.privacy()
by_attr, by_image = st.tabs(["By time, camera and gender", "By example image"])

with by_attr:
    cams = queries.cameras(engine)["camera_id"].drop_duplicates().tolist()
    if not cams:
        ui.empty_state("No cameras yet.", "Search works once an appliance has sent frames to the server.")
    else:
        day = ui.today(cfg)
        c1, c2, c3 = st.columns(3)
        with c1:
            d = st.date_input("Day", value=day, key="search_day")
        with c2:
            t_from = st.time_input("From", value=time(0, 0), key="search_from")
        with c3:
            t_to = st.time_input("To", value=time(23, 59), key="search_to")
        c4, c5 = st.columns([2, 1])
        with c4:
            chosen = st.multiselect("Cameras", cams, default=cams, key="search_cams")
        with c5:
            options = ["any", "female", "male", "unknown"] if settings.show_gender else ["any"]
            gender = st.selectbox("Gender (estimated)", options, key="search_gender")
        zone = ZoneInfo(cfg.timezone)
        start_us = queries.to_us(datetime.combine(d, t_from, zone))
        end_us = queries.to_us(datetime.combine(d, t_to, zone) + timedelta(minutes=1))
        if end_us <= start_us:
            st.error("'From' is after 'To': pick a window that runs forward.")
        elif not chosen:
            ui.empty_state("No camera selected.", "Pick at least one camera.")
        else:
            tracks = queries.tracks_between(engine, start_us, end_us, None if set(chosen) == set(cams) else chosen)
            tracks = queries.filter_gender(tracks, gender)
            people = queries.people_table(tracks, cfg.timezone)
            st.markdown(f"**{len(people)} people** seen on {d:%a %d %b} between {t_from:%H:%M} and {t_to:%H:%M}.")
            if people.empty:
                ui.empty_state("Nobody matches.", "Widen the time window, add cameras or set gender to 'any'.")
            else:
                shown = people.assign(global_id=people["global_id"].fillna("(not identified yet)"))
                st.dataframe(shown.drop(columns=["person"]), hide_index=True, width="stretch",
                             column_config={"male_probability": st.column_config.ProgressColumn(
                                 "P(male)", min_value=0.0, max_value=1.0, format="%.2f")})
                ui.csv_button("Download these people (CSV)", shown, f"people_{d}.csv", "csv_people")
                gids = [g for g in people["global_id"].dropna().tolist()]
                if gids:
                    pick = st.selectbox("Show the sightings of", gids, key="search_pick")
                    st.dataframe(queries.identity_sightings(engine, [pick], cfg.timezone), hide_index=True,
                                 width="stretch")

with by_image:
    st.markdown("Upload a photo of one person (a crop from a camera works best); the dashboard finds the "
                "identities that look most alike and where they were seen.")
    upload = st.file_uploader("Person image", type=["jpg", "jpeg", "png"], key="search_upload")
    if upload is not None:
        img = cv2.imdecode(np.frombuffer(upload.getvalue(), np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            st.error(f"{upload.name} is not a readable JPEG or PNG image.")
        else:
            left, right = st.columns([1, 3])
            with left:
                shown = blur_crop(img) if settings.blur_people else img
                st.image(cv2.cvtColor(shown, cv2.COLOR_BGR2RGB), caption="query" + (" (blurred)" if
                         settings.blur_people else ""), width="stretch")
            with right:
                try:
                    model = ui.embedder(json.dumps(cfg.search.embedder, sort_keys=True))
                except Exception as exc:
                    st.error(f"The Re-ID model could not be loaded ({exc}). Check search.embedder in the dashboard "
                             f"config and that the shared model files are where REIDFLEET_ASSETS points.")
                    st.stop()
                try:
                    reader = ui.vector_reader(cfg, cfg.model_dump_json(), model.model_id)
                    matches = reader.search(model.embed([img])[0], cfg.search.top_k)
                except VectorsUnavailable as exc:
                    st.error(f"Identity vectors unavailable: {exc}")
                    st.stop()
                if not matches:
                    ui.empty_state("No identities stored yet.", "The gallery fills as the server identifies people.")
                else:
                    info = queries.identities_info(engine, [m.global_id for m in matches]).set_index("global_id")
                    rows = []
                    for m in matches:
                        i = info.loc[m.global_id] if m.global_id in info.index else None
                        rows.append({"global_id": m.global_id, "similarity": round(m.score, 3),
                                     "first_seen": ui.fmt_local(None if i is None else int(i["first_seen_us"]), cfg),
                                     "last_seen": ui.fmt_local(None if i is None else int(i["last_seen_us"]), cfg),
                                     "tracks": None if i is None else int(i["n_tracks"])})
                    table = pd.DataFrame(rows)
                    st.markdown(f"**{len(table)} nearest identities** (cosine similarity; the server joins tracks "
                                f"to an identity above its match threshold).")
                    st.dataframe(table, hide_index=True, width="stretch")
                    st.subheader("Where they were seen")
                    st.dataframe(queries.identity_sightings(engine, table["global_id"].tolist(), cfg.timezone),
                                 hide_index=True, width="stretch")
