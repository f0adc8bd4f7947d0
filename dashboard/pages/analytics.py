"""Analytics: footfall by day and hour, visit lengths, paths between cameras, gender split; CSV export."""

from __future__ import annotations

import streamlit as st

from dashboard import charts, queries, ui

cfg = ui.config()
st.title("Analytics")
engine = ui.store_or_stop()
first, last, cams, all_cams = ui.camera_and_date_filters(engine, cfg, "analytics")
if not all_cams:
    ui.empty_state("No cameras yet.", "Charts appear once an appliance has sent frames to the server.")
    st.stop()
if first > last:
    st.error("The first date is after the last one: pick a range that runs forward.")
    st.stop()
start_us, end_us = ui.range_us(cfg, first, last)
settings = ui.privacy()
scope = "all cameras" if cams is None else (", ".join(cams) if cams else "no camera")
st.caption(f"{first:%a %d %b %Y} – {last:%a %d %b %Y}, {scope} ({cfg.timezone})")
if cams == []:
    ui.empty_state("No camera selected.", "Pick at least one camera in the sidebar.")
    st.stop()

tracks = queries.tracks_between(engine, start_us, end_us, cams)
if tracks.empty:
    ui.empty_state("Nobody was seen in this period.",
                   "Widen the date range or the camera selection in the sidebar. If cameras are running, "
                   "check the Overview page for alerts.")
    st.stop()

visits = queries.visits(tracks)
hourly = queries.hourly_people(engine, start_us, end_us, cfg.timezone, cams)
moves = queries.transition_counts(engine, start_us, end_us, cams)

c1, c2, c3, c4 = st.columns(4)
c1.metric("Unique visitors", queries.unique_people(engine, start_us, end_us, cams))
c2.metric("Visits", len(visits))
c3.metric("Median visit", f"{visits['dwell_s'].median() / 60:.1f} min")
c4.metric("Camera-to-camera moves", int(moves["moves"].sum()) if not moves.empty else 0)

ui.altair(charts.footfall_heatmap(hourly))
left, right = st.columns(2)
with left:
    ui.altair(charts.dwell_histogram(visits))
with right:
    if moves.empty:
        ui.empty_state("No moves between cameras in this period.",
                       "Paths appear when the same person is recognised on two cameras.")
    else:
        st.plotly_chart(charts.transitions_sankey(moves), width="stretch")
if settings.show_gender:
    gender = queries.gender_split(tracks)
    if gender["people"].sum() == 0:
        ui.empty_state("No gender estimates in this period.", "The server estimates gender once it has a crop "
                       "of a person; turn it on in the server config (gender.mode).")
    else:
        ui.altair(charts.gender_bars(gender))
        st.caption("Estimates from person crops (about 90 % right per person in our measurement); people the model "
                   "is unsure about are counted as unknown.")

st.subheader("Export")
e1, e2, e3 = st.columns(3)
with e1:
    ui.csv_button("Visitors per hour (CSV)", hourly.assign(hour_start=hourly["hour_start"].astype(str)),
                  f"visitors_per_hour_{first}_{last}.csv", "csv_hourly")
with e2:
    out = visits.assign(start=queries.local_time(visits["start_us"], cfg.timezone).astype(str),
                        end=queries.local_time(visits["end_us"], cfg.timezone).astype(str))
    ui.csv_button("Visits with dwell time (CSV)", out[["person", "start", "end", "dwell_s", "cameras", "n_tracks"]],
                  f"visits_{first}_{last}.csv", "csv_visits")
with e3:
    ui.csv_button("Camera-to-camera moves (CSV)", moves, f"moves_{first}_{last}.csv", "csv_moves")
with st.expander("Table: visitors per hour"):
    st.dataframe(hourly.pivot_table(index="day", columns="hour", values="visitors", fill_value=0),
                 width="stretch")
