"""Login checks, privacy settings and blur, and the Overview's alert rules (no services started)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from common.configfile import ConfigError
from dashboard.alerts import compute_alerts
from dashboard.auth import Authenticator, hash_password, pages_for, verify_hash
from dashboard.config import AlertConfig, AuthConfig, PrivacyConfig, UserConfig, load_dashboard_config
from dashboard.privacy import PrivacySettings, blur_heads, load_settings, save_settings


def test_hash_round_trip_and_config_accepts_it() -> None:
    h = hash_password("s3cret", iterations=1000)
    assert verify_hash("s3cret", h) and not verify_hash("s3cre", h) and not verify_hash("s3cret", "garbage")
    assert UserConfig(password_hash=h).password_hash == h
    with pytest.raises(ValueError, match="exactly one of"):
        UserConfig(password_hash=h, password_env="X")


def test_lockout_and_missing_secret(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clock = [0.0]
    pw_file = tmp_path / "pw"
    pw_file.write_text("from-file\n")
    cfg = AuthConfig(users={"a": UserConfig(role="admin", password_hash=hash_password("x", iterations=1000)),
                            "m": UserConfig(password_env="NOT_SET_ANYWHERE_42"),
                            "f": UserConfig(password_file=str(pw_file))},
                     max_failures=2, lockout_s=30)
    auth = Authenticator(cfg, clock=lambda: clock[0])
    assert auth.login("f", "from-file").ok
    assert not auth.login("a", "bad").ok and not auth.login("a", "bad").ok
    locked = auth.login("a", "x")
    assert not locked.ok and "Too many failed attempts" in locked.message
    clock[0] = 31.0
    ok = auth.login("a", "x")
    assert ok.ok and ok.role == "admin" and pages_for("admin")[-2:] == ("fleet", "settings")
    assert "fleet" not in pages_for("manager") and pages_for(None) == ()
    missing = auth.login("m", "anything")
    assert not missing.ok and "NOT_SET_ANYWHERE_42 is not set" in missing.message
    assert auth.login("nobody", "x").message == "Wrong user name or password."


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "d.yaml"
    bad.write_text("store_url: mysql://x\ntimezone: Mars/Olympus\nprivacy: {retention_days: 0, blurr: true}\n")
    with pytest.raises(ConfigError) as err:
        load_dashboard_config(bad)
    text = str(err.value)
    assert "store_url" in text and "timezone" in text and "privacy.retention_days" in text
    assert "privacy.blurr: unknown key" in text


def test_settings_persist_and_corrupt_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "s" / "settings.json"
    defaults = PrivacyConfig()
    assert load_settings(path, defaults).blur_people is True  # private by default
    saved = save_settings(path, PrivacySettings(blur_people=False, retention_days=7), "boss")
    again = load_settings(path, defaults)
    assert (again.blur_people, again.retention_days, again.changed_by) == (False, 7, "boss")
    assert saved.changed_at and not list(path.parent.glob(".settings.*"))  # no temp file left behind
    path.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        load_settings(path, defaults)


def test_blur_heads_hides_faces_only() -> None:
    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, (400, 300, 3), dtype=np.uint8)
    original = img.copy()
    out = blur_heads(img, [[100, 50, 200, 350]])
    head = (slice(60, 120), slice(110, 190))
    body = (slice(200, 340), slice(110, 190))

    def sharp(a: np.ndarray) -> float:
        return float(cv2.Laplacian(cv2.cvtColor(a, cv2.COLOR_BGR2GRAY), cv2.CV_64F).var())

    assert sharp(out[head]) < 0.05 * sharp(img[head])
    assert np.array_equal(out[body], img[body])
    assert np.array_equal(out[300:, :90], img[300:, :90])  # outside every box
    assert not np.array_equal(blur_heads(img, None)[:40], img[:40])  # no boxes: the image is one person
    assert np.array_equal(img, original)  # the caller's image is not modified


def test_alert_rules() -> None:
    cams = pd.DataFrame({"camera_id": ["door", "till", "back"], "device_id": ["d1", "d2", "d3"],
                         "age_s": [5.0, 600.0, 900.0]})
    fleet = pd.DataFrame({"device_id": ["d1", "d2", "d3"], "state": ["online", "online", "offline"],
                          "last_seen_age_s": [3.0, 4.0, 950.0]})
    alerts = compute_alerts(cams, fleet, {"ok": True, "consumer_lag_messages": 9000, "lag_s": 2.0},
                            AlertConfig(offline_after_s=120, lag_warn_s=30, lag_warn_messages=5000))
    kinds = sorted((a.kind, a.subject) for a in alerts)
    assert kinds == [("appliance_offline", "d3"), ("camera_silent", "back"), ("consumer_lag", "server"),
                     ("consumer_lag", "till")]
    till = next(a for a in alerts if a.subject == "till")
    assert "online but the newest stored frame" in till.text and "10 min" in till.text
    down = compute_alerts(cams.iloc[:1], None, {"ok": False, "error": "kafka unreachable"}, AlertConfig())
    assert [a.text for a in down] == ["Re-ID server unhealthy: kafka unreachable."]


def test_server_health_and_lag_from_a_real_health_server() -> None:
    from prometheus_client import CollectorRegistry, Gauge

    from common.metrics import HealthServer
    from dashboard.alerts import fetch_server_health

    registry = CollectorRegistry()
    lag = Gauge("reidfleet_server_consumer_lag_messages", "lag", ["partition"], registry=registry)
    lag.labels("0").set(4000)
    lag.labels("1").set(2500)
    state = {"ok": True}
    with HealthServer(registry, lambda: dict(state)) as server:
        url = f"http://127.0.0.1:{server.port}/healthz"
        health = fetch_server_health(url)
        assert health["ok"] is True and health["consumer_lag_messages"] == 6500
        alerts = compute_alerts(pd.DataFrame(columns=["camera_id", "device_id", "age_s"]), None, health,
                                AlertConfig(lag_warn_messages=5000))
        assert [a.kind for a in alerts] == ["consumer_lag"] and "6500 messages" in alerts[0].text
        state["ok"] = False
        state["error"] = "consumer stalled"
        sick = fetch_server_health(url)  # 503 with a JSON body
        assert sick == {"ok": False, "error": "consumer stalled"}
    gone = fetch_server_health(url)
    assert gone["ok"] is False and "unreachable" in gone["error"]
