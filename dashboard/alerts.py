"""What the Overview page warns about, as a pure function over what the stores say (unit tested).

Three independent signals, so one broken part cannot hide another:
- a camera whose newest frame in the analytics store is older than ``offline_after_s``;
- an appliance the fleet inventory marks offline (or has not heard from in that time);
- consumer lag: an appliance the fleet sees online whose frames stopped reaching the store (the
  server is down or behind), or the server's own health endpoint reporting lag or trouble.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from dashboard.config import AlertConfig


@dataclass(frozen=True)
class Alert:
    kind: str  # camera_silent | appliance_offline | consumer_lag | server_unhealthy
    subject: str
    text: str


def _age(seconds: float | None) -> str:
    if seconds is None or seconds != seconds:  # None or NaN: no time was ever recorded
        return "never"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def compute_alerts(cameras: pd.DataFrame, fleet: pd.DataFrame | None, health: dict[str, Any] | None,
                   cfg: AlertConfig) -> list[Alert]:
    """``cameras``: camera_id, device_id, age_s (newest stored frame); ``fleet``: device_id, state
    ('online'/'offline'), last_seen_age_s; ``health``: the server's /healthz JSON or None."""
    out: list[Alert] = []
    online = set()
    if fleet is not None and not fleet.empty:
        for row in fleet.itertuples():
            if row.state == "offline":
                out.append(Alert("appliance_offline", row.device_id,
                                 f"Appliance {row.device_id} is offline ("
                                 + ("never heard from" if _age(row.last_seen_age_s) == "never"
                                    else f"last heard {_age(row.last_seen_age_s)} ago") + ")."))
            else:
                online.add(row.device_id)
    for row in cameras.itertuples():
        if row.age_s <= cfg.offline_after_s:
            continue
        if row.device_id in online:
            out.append(Alert("consumer_lag", row.camera_id,
                             f"Appliance {row.device_id} is online but the newest stored frame of camera "
                             f"{row.camera_id} is {_age(row.age_s)} old: the Re-ID server is down or lagging."))
        else:
            out.append(Alert("camera_silent", row.camera_id,
                             f"Camera {row.camera_id} (appliance {row.device_id}) sent nothing for {_age(row.age_s)}."))
    if health is not None:
        if not health.get("ok", False):
            reason = health.get("error") or health.get("reason") or "health check failed"
            out.append(Alert("server_unhealthy", "server", f"Re-ID server unhealthy: {reason}."))
        for key, value in sorted(health.items()):
            if "lag" not in key or not isinstance(value, int | float) or isinstance(value, bool):
                continue
            if key.endswith("_s") and value > cfg.lag_warn_s:
                out.append(Alert("consumer_lag", "server", f"Re-ID consumer {key} = {value:.0f} s "
                                 f"(warning above {cfg.lag_warn_s:.0f} s)."))
            elif not key.endswith("_s") and value > cfg.lag_warn_messages:
                out.append(Alert("consumer_lag", "server", f"Re-ID consumer {key} = {value:.0f} messages "
                                 f"(warning above {cfg.lag_warn_messages})."))
    return out


LAG_METRIC = "reidfleet_server_consumer_lag_messages"


def lag_from_metrics(text: str) -> float | None:
    """Total consumer lag (messages, over partitions) from the server's Prometheus text, None if absent."""
    from prometheus_client.parser import text_string_to_metric_families

    total, found = 0.0, False
    try:
        for family in text_string_to_metric_families(text):
            if family.name == LAG_METRIC:
                for sample in family.samples:
                    total += sample.value
                    found = True
    except ValueError:
        return None
    return total if found else None


def fetch_server_health(health_url: str, timeout_s: float = 2.0) -> dict[str, Any]:
    """The server's /healthz JSON plus ``consumer_lag_messages`` from its /metrics (same port)."""
    import json
    import urllib.request
    from urllib.parse import urlsplit, urlunsplit

    try:
        with urllib.request.urlopen(health_url, timeout=timeout_s) as resp:  # configured loopback/admin URL
            health = json.loads(resp.read() or b"{}")
    except OSError as exc:
        # /healthz answers 503 with a JSON body when unhealthy; urllib raises, so read the body there.
        body = getattr(exc, "read", None)
        try:
            health = json.loads(body()) if body else {"ok": False, "error": f"{health_url} unreachable ({exc})"}
        except ValueError:
            health = {"ok": False, "error": f"{health_url} unreachable ({exc})"}
        return health if isinstance(health, dict) else {"ok": False, "error": str(health)}
    except ValueError:
        return {"ok": False, "error": f"{health_url} answered with something that is not JSON"}
    if not isinstance(health, dict):
        return {"ok": False, "error": f"{health_url} answered {health!r}"}
    parts = urlsplit(health_url)
    try:
        with urllib.request.urlopen(urlunsplit((parts.scheme, parts.netloc, "/metrics", "", "")),
                                    timeout=timeout_s) as resp:
            lag = lag_from_metrics(resp.read().decode("utf-8", "replace"))
        if lag is not None:
            health["consumer_lag_messages"] = lag
    except OSError:
        pass  # health alone is still useful
    return health
