"""Charts a manager reads in seconds, built from the plain DataFrames :mod:`dashboard.queries` returns.

No Streamlit import: each function returns an Altair chart or a Plotly figure, so the page only
places it and tests can inspect the chart's data. Altair for the grid-like charts (heatmap,
histogram, bars); Plotly only for the Sankey, which Altair cannot draw.
"""

from __future__ import annotations

import altair as alt
import pandas as pd
import plotly.graph_objects as go

WEEKDAYS = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]


def footfall_heatmap(hourly: pd.DataFrame) -> alt.Chart:
    """Day × hour heatmap of visitors; ``hourly`` has columns day (date), hour (0-23), visitors."""
    df = hourly.copy()
    days = sorted(pd.to_datetime(df["day"]).unique())
    order = [pd.Timestamp(d).strftime("%a %d %b") for d in days]  # chronological, not alphabetical
    df["day"] = pd.to_datetime(df["day"]).dt.strftime("%a %d %b")
    return (
        alt.Chart(df, title="Visitors by day and hour")
        .mark_rect()
        .encode(
            x=alt.X("hour:O", title="hour of day", scale=alt.Scale(domain=list(range(24))),
                    axis=alt.Axis(labelAngle=0)),  # the whole day, so opening hours and gaps show
            y=alt.Y("day:O", title=None, sort=order),
            color=alt.Color("visitors:Q", title="visitors", scale=alt.Scale(scheme="blues"),
                            legend=alt.Legend(format="d", tickMinStep=1)),
            tooltip=[alt.Tooltip("day:O"), alt.Tooltip("hour:O"), alt.Tooltip("visitors:Q")],
        )
        .properties(height=max(120, 22 * len(order)))
    )


def today_vs_yesterday(by_hour: pd.DataFrame) -> alt.Chart:
    """Grouped bars per hour; ``by_hour`` has hour, day_label ('today'/'yesterday'), visitors."""
    return (
        alt.Chart(by_hour, title="Visitors per hour: today vs yesterday")
        .mark_bar()
        .encode(
            x=alt.X("hour:O", title="hour of day", axis=alt.Axis(labelAngle=0)),
            xOffset=alt.XOffset("day_label:N", sort=["yesterday", "today"]),
            y=alt.Y("visitors:Q", title="visitors", axis=alt.Axis(tickMinStep=1, format="d")),
            color=alt.Color("day_label:N", title=None,
                            scale=alt.Scale(domain=["yesterday", "today"], range=["#b0b7c3", "#1f77b4"])),
            tooltip=["day_label", "hour", "visitors"],
        )
        .properties(height=220)
    )


def dwell_histogram(dwell: pd.DataFrame) -> alt.Chart:
    """Distribution of visit lengths in minutes; ``dwell`` has dwell_s per visit."""
    df = pd.DataFrame({"dwell_min": dwell["dwell_s"].astype(float) / 60.0})
    return (
        alt.Chart(df, title="How long visits last")
        .mark_bar()
        .encode(
            x=alt.X("dwell_min:Q", bin=alt.Bin(maxbins=30), title="minutes in the shop"),
            y=alt.Y("count():Q", title="visits", axis=alt.Axis(tickMinStep=1, format="d")),
            tooltip=[alt.Tooltip("count():Q", title="visits")],
        )
        .properties(height=220)
    )


def transitions_sankey(transitions: pd.DataFrame) -> go.Figure:
    """Flows between cameras; ``transitions`` has source, target, people.

    Sources and targets get separate nodes ("A →" and "→ B") so a cycle A→B→A still draws.
    """
    src_labels = [f"{s} →" for s in sorted(transitions["source"].unique())]
    dst_labels = [f"→ {t}" for t in sorted(transitions["target"].unique())]
    labels = src_labels + dst_labels
    index = {lab: i for i, lab in enumerate(labels)}
    palette = ["31,119,180", "255,127,14", "44,160,44", "214,39,40", "148,103,189", "140,86,75", "227,119,194"]
    cameras = sorted(set(transitions["source"]) | set(transitions["target"]))
    colour = {c: palette[i % len(palette)] for i, c in enumerate(cameras)}
    node_colours = [f"rgb({colour[lab.removesuffix(' →').removeprefix('→ ')]})" for lab in labels]
    fig = go.Figure(go.Sankey(
        node={"label": labels, "pad": 18, "thickness": 16, "color": node_colours},
        link={
            "source": [index[f"{s} →"] for s in transitions["source"]],
            "target": [index[f"→ {t}"] for t in transitions["target"]],
            "value": transitions["people"].astype(int).tolist(),
            "color": [f"rgba({colour[s]},0.35)" for s in transitions["source"]],
        },
    ))
    fig.update_layout(title_text="Where people go next (camera to camera)", height=360,
                      margin={"l": 10, "r": 10, "t": 40, "b": 10})
    return fig


def gender_bars(gender: pd.DataFrame) -> alt.Chart:
    """Horizontal bars; ``gender`` has gender ('female'/'male'/'unknown') and people."""
    return (
        alt.Chart(gender, title="Visitors by gender (estimated)")
        .mark_bar()
        .encode(
            y=alt.Y("gender:N", title=None, sort=["female", "male", "unknown"]),
            x=alt.X("people:Q", title="visitors", axis=alt.Axis(tickMinStep=1, format="d")),
            color=alt.Color("gender:N", legend=None,
                            scale=alt.Scale(domain=["female", "male", "unknown"],
                                            range=["#d62728", "#1f77b4", "#999999"])),
            tooltip=["gender", "people"],
        )
        .properties(height=110)
    )


def presence_bars(presence: pd.DataFrame) -> alt.Chart:
    """People present now per camera; ``presence`` has camera_id, people."""
    top = max(1, int(presence["people"].max()) if len(presence) else 1)
    return (
        alt.Chart(presence, title="People in view now")
        .mark_bar()
        .encode(
            x=alt.X("people:Q", title="people", scale=alt.Scale(domain=[0, top]),
                    axis=alt.Axis(tickMinStep=1, format="d")),
            y=alt.Y("camera_id:N", title=None),
            tooltip=["camera_id", "people"],
        )
        .properties(height=max(90, 34 * len(presence)))
    )
