"""The fleet manager daemon (``python -m fleet serve``): inventory, shadows and rollouts over MQTT.

It subscribes to every device's status, telemetry, reported config and OTA progress (all but
telemetry retained, so a restarted manager catches up from the broker), publishes desired config
and OTA jobs (retained), advances rollout campaigns every ``tick_s`` and serves ``/healthz`` +
``/metrics``. It never reads the signing key: artifacts arrive signed from ``model publish``.
The CLI writes admin intent to SQLite; the daemon is the only process that talks MQTT for it.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import ValidationError

from fleet.db import FleetDB
from fleet.inventory import Inventory
from fleet.rollout import RolloutEngine
from fleet.shadow import Shadows
from schemas.mqtt import MANAGER_USERNAME, DesiredConfig, DeviceStatus, OtaJob, OtaProgress, ReportedConfig, Telemetry
from schemas.topics import (
    MQTT_CONFIG_DESIRED,
    MQTT_CONFIG_REPORTED,
    MQTT_OTA_JOB,
    MQTT_OTA_PROGRESS,
    MQTT_ROOT,
    MQTT_STATUS,
    MQTT_TELEMETRY,
    device_topic,
)

log = logging.getLogger(__name__)

_PAYLOADS: dict[str, type] = {
    MQTT_STATUS: DeviceStatus,
    MQTT_TELEMETRY: Telemetry,
    MQTT_CONFIG_REPORTED: ReportedConfig,
    MQTT_OTA_PROGRESS: OtaProgress,
}


class FleetManager:
    def __init__(self, db_path: Path, *, mqtt_host: str, mqtt_port: int, ca_cert: Path, password: str,
                 tick_s: float = 0.5, client_id: str = "reidfleet-manager") -> None:
        self.db = FleetDB(db_path)
        self.inventory = Inventory(self.db)
        self.shadows = Shadows(self.db)
        self.rollouts = RolloutEngine(self.db, self.inventory, self.publish_job)
        self.tick_s = tick_s
        self.mqtt_host, self.mqtt_port = mqtt_host, mqtt_port
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._resync = False
        self._thread: threading.Thread | None = None
        self.registry = CollectorRegistry()
        self.m_messages = Counter("reidfleet_fleet_messages_total", "MQTT messages received", ["kind"],
                                  registry=self.registry)
        self.m_invalid = Counter("reidfleet_fleet_invalid_payloads_total", "Payloads that failed validation",
                                 ["kind"], registry=self.registry)
        self.m_devices = Gauge("reidfleet_fleet_devices", "Registered devices by state", ["state"],
                               registry=self.registry)
        self.m_campaigns = Gauge("reidfleet_fleet_campaigns", "Campaigns by state", ["state"], registry=self.registry)
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        c.username_pw_set(MANAGER_USERNAME, password)
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_cert))
        c.tls_set_context(ctx)
        c.reconnect_delay_set(min_delay=1, max_delay=15)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        self.client = c

    # --- MQTT --------------------------------------------------------------------------------------
    def publish_job(self, device_id: str, job: OtaJob) -> None:
        self.client.publish(device_topic(device_id, MQTT_OTA_JOB), job.model_dump_json(), qos=1, retain=True)

    def publish_desired(self, device_id: str, desired: DesiredConfig) -> None:
        info = self.client.publish(device_topic(device_id, MQTT_CONFIG_DESIRED), desired.model_dump_json(), qos=1,
                                   retain=True)
        if info.rc == mqtt.MQTT_ERR_SUCCESS or info.rc == mqtt.MQTT_ERR_NO_CONN:
            # paho queues QoS 1 while disconnected and sends on reconnect
            self.shadows.mark_published(device_id, desired.version)

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason_code: Any, _p: Any) -> None:
        if reason_code.is_failure:
            log.error("broker refused the manager: %s", reason_code)
            return
        client.subscribe([(f"{MQTT_ROOT}/devices/+/{leaf}", 1) for leaf in _PAYLOADS])
        self._resync = True  # the loop re-publishes retained state: the broker may have lost it
        self.connected.set()
        log.info("manager connected to %s:%d", self.mqtt_host, self.mqtt_port)

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, reason_code: Any, _p: Any) -> None:
        self.connected.clear()
        if not self._stop.is_set():
            log.warning("manager lost the broker (%s); reconnecting", reason_code)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        prefix = f"{MQTT_ROOT}/devices/"
        if not msg.topic.startswith(prefix):
            return
        device_id, _, leaf = msg.topic[len(prefix):].partition("/")
        model = _PAYLOADS.get(leaf)
        if model is None or not msg.payload:
            return
        self.m_messages.labels(leaf).inc()
        try:
            payload = model.model_validate_json(msg.payload)
        except ValidationError as exc:
            self.m_invalid.labels(leaf).inc()
            log.warning("invalid %s payload from %s: %s", leaf, device_id, exc.errors()[0].get("msg"))
            return
        try:
            if leaf == MQTT_STATUS:
                self.inventory.on_status(device_id, payload)
            elif leaf == MQTT_TELEMETRY:
                self.inventory.on_telemetry(device_id, payload)
            elif leaf == MQTT_CONFIG_REPORTED:
                self.shadows.on_reported(device_id, payload)
            elif leaf == MQTT_OTA_PROGRESS:
                if payload.terminal and payload.model_id:
                    self.inventory.on_model(device_id, payload.model_id, payload.model_version)
                self.rollouts.on_progress(device_id, payload)
        except Exception:
            log.exception("handling %s from %s failed", leaf, device_id)

    # --- loop --------------------------------------------------------------------------------------
    def tick(self) -> None:
        if self.connected.is_set():
            for device_id, desired in self.shadows.unpublished():
                self.publish_desired(device_id, desired)
            self.rollouts.tick()
        self._update_gauges()

    def _update_gauges(self) -> None:
        counts: dict[str, int] = {"online": 0, "offline": 0, "never": 0}
        for d in self.inventory.list():
            counts[d["state"]] = counts.get(d["state"], 0) + 1
        for state, n in counts.items():
            self.m_devices.labels(state).set(n)
        for r in self.db.query("SELECT state, COUNT(*) AS n FROM campaigns GROUP BY state"):
            self.m_campaigns.labels(r["state"]).set(r["n"])

    def _loop(self) -> None:
        while not self._stop.wait(self.tick_s):
            try:
                if self.connected.is_set() and self._resync:
                    self._resync = False
                    self._republish()
                self.tick()
            except Exception:
                log.exception("manager tick failed")

    def _republish(self) -> None:
        """After every (re)connect, publish each device's desired config and in-flight OTA jobs again
        (retained). A broker killed before its autosave loses retained messages (found by
        tests/system/test_mqtt_restart.py), and a device booting then would get no config at all. Agents
        answer a version they already applied by re-reporting it, so this never re-applies anything."""
        desired = self.shadows.all_desired()
        for device_id, d in desired:
            self.publish_desired(device_id, d)
        n = self.rollouts.republish_in_flight()
        if desired or n:
            log.info("re-published %d desired configs and %d in-flight OTA jobs after connecting", len(desired), n)

    def health(self) -> dict[str, Any]:
        return {"ok": self.connected.is_set(), "broker": f"{self.mqtt_host}:{self.mqtt_port}",
                "connected": self.connected.is_set()}

    def start(self, wait_connected_s: float = 0.0) -> FleetManager:
        self.client.connect_async(self.mqtt_host, self.mqtt_port, keepalive=30)
        self.client.loop_start()
        self._thread = threading.Thread(target=self._loop, name="fleet-manager", daemon=True)
        self._thread.start()
        if wait_connected_s and not self.connected.wait(wait_connected_s):
            raise TimeoutError(f"manager could not connect to the broker at {self.mqtt_host}:{self.mqtt_port}")
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(10)
        self.client.disconnect()
        self.client.loop_stop()
        self.db.close()

    def wait_until(self, predicate: Any, timeout_s: float, poll_s: float = 0.1) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(poll_s)
        return bool(predicate())
