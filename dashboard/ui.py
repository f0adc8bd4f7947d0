"""Streamlit plumbing shared by the pages: config, store connection, login state, filters, errors.

Process-wide objects (config, store engine, authenticator, live feed, embedder) are cached with
``st.cache_resource`` so every browser session shares one of each; per-user state (who is logged
in, filter choices) lives in ``st.session_state``. Pages call :func:`store_or_stop`, which shows
what is wrong (no store yet, unreachable database) and stops the page instead of a stack trace.
"""

from __future__ import annotations

import time
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import streamlit as st
from sqlalchemy.engine import Engine

from common.configfile import ConfigError
from dashboard import queries
from dashboard.auth import Authenticator
from dashboard.config import DashboardConfig, load_dashboard_config
from dashboard.privacy import PrivacySettings, load_settings


@st.cache_resource(show_spinner=False)
def _config_cached(path: str) -> DashboardConfig:  # keyed by the path (leading-underscore args are not hashed)
    return load_dashboard_config()


def config() -> DashboardConfig:
    import os

    from dashboard.config import CONFIG_ENV

    try:
        return _config_cached(os.environ.get(CONFIG_ENV, ""))
    except ConfigError as exc:
        st.error(f"The dashboard config is invalid, so nothing can be shown.\n\n```\n{exc}\n```")
        st.stop()
        raise  # unreachable: st.stop() raises


@st.cache_resource(show_spinner=False)
def authenticator(key: str, _cfg: DashboardConfig) -> Authenticator:
    return Authenticator(_cfg.auth)


@st.cache_resource(show_spinner=False, ttl=300, on_release=lambda engine: engine.dispose())
def _engine(url: str) -> Engine:
    return queries.open_store(url)


def store_or_stop() -> Engine:
    """The store engine, or an explanation on the page and a stop."""
    cfg = config()
    try:
        return _engine(cfg.store_url)
    except queries.StoreUnavailable as exc:
        st.error(f"**Analytics store unavailable.** {exc}")
        st.info("Nothing is lost: the server keeps consuming from Kafka and writes once the store is back. "
                "This page retries on every refresh.")
        st.stop()
        raise


def privacy() -> PrivacySettings:
    cfg = config()
    try:
        return load_settings(cfg.settings_path, cfg.privacy)
    except ValueError as exc:
        st.error(str(exc))
        st.stop()
        raise


def now_us() -> int:
    """Wall-clock now, unless the session pinned an 'as of' time (replaying a past day, tests)."""
    pinned = st.session_state.get("as_of_us")
    return int(pinned) if pinned else int(time.time() * 1_000_000)


def today(cfg: DashboardConfig) -> date:
    return datetime.fromtimestamp(now_us() / 1e6, ZoneInfo(cfg.timezone)).date()


def role() -> str | None:
    return st.session_state.get("role")


def require_role(*roles: str) -> None:
    if role() not in roles:
        st.error("This page is for " + " or ".join(roles) + " users. Log in with such an account.")
        st.stop()


def camera_and_date_filters(engine: Engine, cfg: DashboardConfig, key: str,
                            default_days: int = 7) -> tuple[date, date, list[str] | None, list[str]]:
    """Date range + camera multiselect in the sidebar; returns (first day, last day, cameras or None, all)."""
    cams = queries.cameras(engine)["camera_id"].drop_duplicates().tolist()
    end_default = today(cfg)
    start_default = end_default - timedelta(days=default_days - 1)
    with st.sidebar:
        st.subheader("Filters")
        picked = st.date_input("Dates", value=(start_default, end_default), key=f"{key}_dates",
                               max_value=end_default + timedelta(days=1))
        chosen = st.multiselect("Cameras", cams, default=cams, key=f"{key}_cams",
                                placeholder="all cameras")
    if isinstance(picked, tuple | list):
        first, last = (picked[0], picked[-1]) if picked else (start_default, end_default)
    else:
        first = last = picked
    return first, last, (None if set(chosen) == set(cams) else list(chosen)), cams


def range_us(cfg: DashboardConfig, first: date, last: date) -> tuple[int, int]:
    s, _ = queries.local_day_bounds(first, cfg.timezone)
    _, e = queries.local_day_bounds(last, cfg.timezone)
    return s, e


def fmt_local(us: int | None, cfg: DashboardConfig, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    if us is None:
        return "never"
    return datetime.fromtimestamp(us / 1e6, ZoneInfo(cfg.timezone)).strftime(fmt)


def fmt_age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    s = abs(seconds)
    if s < 90:
        return f"{s:.0f} s"
    if s < 90 * 60:
        return f"{s / 60:.0f} min"
    if s < 48 * 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def empty_state(what: str, todo: str) -> None:
    st.info(f"**{what}**\n\n{todo}")


def csv_button(label: str, df: Any, file_name: str, key: str) -> None:
    st.download_button(label, df.to_csv(index=False).encode(), file_name=file_name, mime="text/csv", key=key)


@st.cache_resource(show_spinner=False, on_release=lambda feed: feed.stop())
def live_feed(bootstrap: str, input_topic: str, output_topic: str, lookback_s: float) -> Any:
    """One Kafka reader per dashboard process, shared by every browser session."""
    from dashboard.live_feed import LiveFeed

    return LiveFeed(bootstrap, input_topic=input_topic, output_topic=output_topic, lookback_s=lookback_s).start()


@st.cache_resource(show_spinner="Loading the Re-ID model …")
def embedder(spec_json: str) -> Any:
    """The server's embedder (``server.embed.build_embedder``): the same model that filled Qdrant."""
    import json

    from server.embed import build_embedder

    return build_embedder(json.loads(spec_json))


@st.cache_resource(show_spinner=False, ttl=300)
def vector_reader(_cfg: DashboardConfig, key: str, model_id: str) -> Any:
    """Re-chosen every 5 min, so a store that gains prototypes (or a server that starts) is picked up."""
    from dashboard.vectors import open_reader

    return open_reader(_cfg.qdrant, model_id, _engine(_cfg.store_url))


@st.cache_resource(show_spinner=False)
def retention_worker(_cfg: DashboardConfig, key: str) -> Any:
    """Started once per dashboard process: enforces the retention setting at start and hourly."""
    from dashboard.retention import RetentionWorker

    return RetentionWorker(_cfg).start()


def altair(chart: Any) -> None:
    """Place an Altair chart at its own height (Streamlit's "content" height squashes fixed-height charts)."""
    plot_h = chart.to_dict().get("height")
    extra = 110  # title, axis labels and legend around the plot area
    height = int(plot_h) + extra if isinstance(plot_h, int | float) else "content"
    st.altair_chart(chart, width="stretch", height=height)
