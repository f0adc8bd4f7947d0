"""The fleet agent: the appliance's side of MQTT (status, telemetry, desired/reported config, OTA).

It runs inside the appliance process (threads beside the real-time loop) and talks to the loop
only through :class:`appliance.control.ApplianceControl`. Why in-process: live settings and model
switches need no IPC, and the process's own RSS/latency are at hand; the loop never waits on the
agent (paho's network thread and the agent's workers do all MQTT and OTA work).

Behaviour (Frigate-style availability, AWS-IoT-style shadow, Mender-style A/B):
- A retained ``offline`` last will is set before connecting; ``online`` (with model and agent
  version) is published retained on every (re)connect, ``offline``/``shutdown`` on a clean stop.
- ``on_connect`` re-subscribes, so after a broker restart the retained desired config and OTA job
  are delivered again; both are idempotent (same config version is re-reported, not re-applied;
  a finished job id is re-reported from the OTA journal, not re-run).
- Desired config is validated whole by ``apply_settings``; the reply says what is in force, or
  the error with each bad key while the last good config stays. The last good config is kept on
  disk and re-applied at start.
- Handlers log their exceptions and go on: one bad message never stops the agent.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import ValidationError

from appliance.control import ApplianceControl
from appliance.ota import OtaInstaller, write_json_atomic
from common.configfile import ConfigError, format_validation_error
from common.service import StopSignal
from schemas.bundle import DeviceBundle
from schemas.mqtt import DesiredConfig, DeviceStatus, OtaJob, OtaProgress, ReportedConfig, SystemStats, Telemetry
from schemas.topics import (
    MQTT_CONFIG_DESIRED,
    MQTT_CONFIG_REPORTED,
    MQTT_OTA_JOB,
    MQTT_OTA_PROGRESS,
    MQTT_STATUS,
    MQTT_TELEMETRY,
    device_topic,
)

log = logging.getLogger(__name__)

AGENT_VERSION = "0.1.0"
STATE_FILE = "agent-state.json"


class SystemSampler:
    """CPU, memory, temperature and disk from /proc and /sys (no psutil on the appliance)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._last_cpu: tuple[int, int] | None = self._cpu_times()

    @staticmethod
    def _cpu_times() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    @staticmethod
    def _meminfo() -> dict[str, int]:
        out: dict[str, int] = {}
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    out[key] = int(rest.split()[0]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        return out

    @staticmethod
    def _rss() -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError):
            pass
        return None

    @staticmethod
    def _temperature() -> float | None:
        temps = []
        for zone in Path("/sys/class/thermal").glob("thermal_zone*/temp"):
            try:
                temps.append(int(zone.read_text().strip()) / 1000.0)
            except (OSError, ValueError):
                continue
        return max(temps) if temps else None

    def sample(self) -> SystemStats:
        cpu = None
        now = self._cpu_times()
        if now and self._last_cpu and now[0] > self._last_cpu[0]:
            total, idle = now[0] - self._last_cpu[0], now[1] - self._last_cpu[1]
            cpu = round(100.0 * (1 - idle / total), 1)
        self._last_cpu = now
        mem = self._meminfo()
        total_mem = mem.get("MemTotal")
        used = total_mem - mem.get("MemAvailable", 0) if total_mem else None
        try:
            disk_free = shutil.disk_usage(self.data_dir).free
        except OSError:
            disk_free = None
        return SystemStats(cpu_percent=cpu, load1=os.getloadavg()[0], memory_used_bytes=used,
                           memory_total_bytes=total_mem, process_rss_bytes=self._rss(),
                           temperature_c=self._temperature(), disk_free_bytes=disk_free)


def _tls_context(bundle: DeviceBundle) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=bundle.mqtt.ca_cert_pem)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class FleetAgent:
    """One device's MQTT agent. ``start()`` returns at once; ``stop()`` publishes offline and joins."""

    def __init__(self, bundle: DeviceBundle, control: ApplianceControl, installer: OtaInstaller, data_dir: Path,
                 *, telemetry_interval_s: float = 10.0, stop: StopSignal | None = None) -> None:
        self.bundle = bundle
        self.device_id = bundle.device_id
        self.control = control
        self.installer = installer
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.telemetry_interval_s = telemetry_interval_s
        self.stop_signal = stop or StopSignal(install_handlers=False)
        self.started_at = time.monotonic()
        self.sampler = SystemSampler(self.data_dir)
        self.connected = threading.Event()
        self.connects = 0
        self._state = self._load_state()
        self._config_q: queue.Queue[bytes | None] = queue.Queue()
        self._ota_q: queue.Queue[bytes | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self.topics = {leaf: device_topic(self.device_id, leaf) for leaf in (
            MQTT_STATUS, MQTT_TELEMETRY, MQTT_CONFIG_DESIRED, MQTT_CONFIG_REPORTED, MQTT_OTA_JOB, MQTT_OTA_PROGRESS)}
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"reidfleet-{self.device_id}",
                        protocol=mqtt.MQTTv5)
        c.username_pw_set(bundle.mqtt.username, bundle.mqtt.password)
        if bundle.mqtt.tls:
            c.tls_set_context(_tls_context(bundle))
        c.will_set(self.topics[MQTT_STATUS], DeviceStatus(state="offline", reason="connection lost").model_dump_json(),
                   qos=1, retain=True)
        c.reconnect_delay_set(min_delay=1, max_delay=30)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        self.client = c

    # --- durable agent state (last good config, last report) -------------------------------------
    def _load_state(self) -> dict[str, Any]:
        try:
            return json.loads((self.data_dir / STATE_FILE).read_text())
        except (OSError, ValueError):
            return {"applied_version": 0, "settings": None, "last_report": None}

    def _save_state(self) -> None:
        write_json_atomic(self.data_dir / STATE_FILE, self._state)

    @property
    def applied_version(self) -> int:
        return int(self._state.get("applied_version", 0))

    # --- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> FleetAgent:
        recovered = self.installer.recover()
        if self._state.get("settings") is not None:
            try:
                self.control.apply_settings(self._state["settings"])
                log.info("re-applied last good config version %d", self.applied_version)
            except Exception as exc:
                log.error("could not re-apply the saved config version %d: %s", self.applied_version, exc)
        for name, target in (("agent-config", self._config_worker), ("agent-ota", self._ota_worker),
                             ("agent-telemetry", self._telemetry_loop)):
            t = threading.Thread(target=target, name=f"{name}-{self.device_id}", daemon=True)
            t.start()
            self._threads.append(t)
        if recovered is not None:
            self._publish_progress(recovered)  # queued by paho until connected
        self.client.connect_async(self.bundle.mqtt.host, self.bundle.mqtt.port, keepalive=self.bundle.mqtt.keepalive_s)
        self.client.loop_start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self.stop_signal.set("agent stop")
        self._config_q.put(None)
        self._ota_q.put(None)
        if self.connected.is_set():
            info = self.client.publish(self.topics[MQTT_STATUS], self._status("offline", "shutdown"), qos=1,
                                       retain=True)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout_s)
        self.client.disconnect()
        self.client.loop_stop()
        for t in self._threads:
            t.join(timeout_s)

    def kill(self) -> None:
        """Drop the connection without a clean goodbye (tests: the broker then sends the last will)."""
        self.stop_signal.set("agent killed")
        self._config_q.put(None)
        self._ota_q.put(None)
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:
            sock.close()

    # --- MQTT callbacks ----------------------------------------------------------------------------
    def _status(self, state: str, reason: str = "") -> str:
        info = self.installer.current()
        return DeviceStatus(state=state, ts=time.time(), reason=reason, agent_version=AGENT_VERSION,  # type: ignore[arg-type]
                            model_id=info.model_id if info else "",
                            model_version=info.version if info else "").model_dump_json()

    def _on_connect(self, client: mqtt.Client, _userdata: Any, _flags: Any, reason_code: Any, _props: Any) -> None:
        if reason_code.is_failure:
            log.error("broker refused the connection: %s", reason_code, extra={"device_id": self.device_id})
            return
        self.connects += 1
        client.subscribe([(self.topics[MQTT_CONFIG_DESIRED], 1), (self.topics[MQTT_OTA_JOB], 1)])
        client.publish(self.topics[MQTT_STATUS], self._status("online"), qos=1, retain=True)
        self.connected.set()
        log.info("connected to the fleet broker", extra={"device_id": self.device_id, "connects": self.connects})

    def _on_disconnect(self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason_code: Any,
                       _props: Any) -> None:
        self.connected.clear()
        if not self.stop_signal.is_set():
            log.warning("disconnected from the fleet broker (%s); reconnecting", reason_code,
                        extra={"device_id": self.device_id})

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            if msg.topic == self.topics[MQTT_CONFIG_DESIRED]:
                self._config_q.put(bytes(msg.payload))
            elif msg.topic == self.topics[MQTT_OTA_JOB]:
                self._ota_q.put(bytes(msg.payload))
            else:
                log.warning("message on unexpected topic %s ignored", msg.topic)
        except Exception:
            log.exception("handling a message on %s failed", msg.topic)

    # --- desired/reported config -------------------------------------------------------------------
    def _report(self, report: ReportedConfig) -> None:
        self._state["last_report"] = report.model_dump(mode="json")
        self._save_state()
        self.client.publish(self.topics[MQTT_CONFIG_REPORTED], report.model_dump_json(), qos=1, retain=True)

    def handle_desired(self, payload: bytes) -> ReportedConfig:
        """Validate and apply one desired-config payload; returns (and publishes) the report."""
        in_force = self._state.get("settings")
        if in_force is None:
            in_force = self.control.current_settings()
        if not payload:  # retained desired cleared by the manager: nothing to do
            return ReportedConfig(version=0, status="applied", applied_version=self.applied_version, settings=in_force)
        try:
            desired = DesiredConfig.model_validate_json(payload)
        except ValidationError as exc:
            try:
                version = int(json.loads(payload).get("version", 0))
            except (ValueError, AttributeError, TypeError):
                version = 0
            report = ReportedConfig(version=max(version, 0), status="rejected", applied_version=self.applied_version,
                                    settings=in_force, error="desired config payload is not valid",
                                    problems=format_validation_error(exc))
            self._report(report)
            return report
        last = self._state.get("last_report")
        if last and last.get("version") == desired.version:  # redelivered (reconnect): answer again, no re-apply
            report = ReportedConfig.model_validate(last)
            self.client.publish(self.topics[MQTT_CONFIG_REPORTED], report.model_dump_json(), qos=1, retain=True)
            return report
        try:
            applied = self.control.apply_settings(dict(desired.settings))
        except ConfigError as exc:
            report = ReportedConfig(version=desired.version, status="rejected", applied_version=self.applied_version,
                                    settings=in_force, error=f"config version {desired.version} rejected; "
                                    f"version {self.applied_version} stays in force", problems=exc.problems)
        except Exception as exc:  # the control must not be able to kill the agent
            log.exception("apply_settings failed")
            report = ReportedConfig(version=desired.version, status="rejected", applied_version=self.applied_version,
                                    settings=in_force, error=f"{type(exc).__name__}: {exc}")
        else:
            self._state.update(applied_version=desired.version, settings=applied)
            report = ReportedConfig(version=desired.version, status="applied", applied_version=desired.version,
                                    settings=applied)
        log.info("config version %d %s", desired.version, report.status,
                 extra={"device_id": self.device_id, "problems": len(report.problems)})
        self._report(report)
        return report

    def _config_worker(self) -> None:
        while (payload := self._config_q.get()) is not None:
            try:
                self.handle_desired(payload)
            except Exception:
                log.exception("desired config handling failed")

    # --- OTA ---------------------------------------------------------------------------------------
    def _publish_progress(self, p: OtaProgress) -> None:
        self.client.publish(self.topics[MQTT_OTA_PROGRESS], p.model_dump_json(), qos=1, retain=True)

    def handle_job(self, payload: bytes) -> OtaProgress | None:
        if not payload:
            return None
        try:
            job = OtaJob.model_validate_json(payload)
        except ValidationError as exc:
            try:
                job_id = str(json.loads(payload).get("job_id", "")) or "unknown"
            except (ValueError, AttributeError):
                job_id = "unknown"
            p = OtaProgress(job_id=job_id, state="failed",
                            error="OTA job payload is not valid: " + "; ".join(format_validation_error(exc)))
            self._publish_progress(p)
            return p
        result = self.installer.run(job, on_progress=self._publish_progress)
        if result.state == "succeeded":  # tell the fleet the new model in the retained status too
            self.client.publish(self.topics[MQTT_STATUS], self._status("online"), qos=1, retain=True)
        return result

    def _ota_worker(self) -> None:
        while (payload := self._ota_q.get()) is not None:
            try:
                self.handle_job(payload)
            except Exception:
                log.exception("OTA job handling failed")

    # --- telemetry ---------------------------------------------------------------------------------
    def telemetry(self) -> Telemetry:
        health, detail, pipeline = "ok", "", {}
        try:
            pipeline = self.control.telemetry()
            reported = pipeline.get("health")
            if reported in ("ok", "degraded", "error"):
                health, detail = reported, str(pipeline.get("health_detail", ""))
        except Exception as exc:
            health, detail = "error", f"telemetry failed: {type(exc).__name__}: {exc}"
        info = self.installer.current()
        return Telemetry(ts=time.time(), uptime_s=time.monotonic() - self.started_at, health=health,
                         health_detail=detail, model_id=info.model_id if info else "",
                         model_version=info.version if info else "", model_slot=info.slot if info else "",
                         config_version=self.applied_version, pipeline=pipeline, system=self.sampler.sample())

    def _telemetry_loop(self) -> None:
        while not self.stop_signal.wait(self.telemetry_interval_s):
            if not self.connected.is_set():
                continue
            try:
                payload = self.telemetry().model_dump_json()
                self.client.publish(self.topics[MQTT_TELEMETRY], payload, qos=0)
            except Exception:
                log.exception("telemetry failed")


def load_bundle(path: Path) -> DeviceBundle:
    """Read ``bundle.json`` (a file or the bundle directory holding it) with a clear error."""
    path = Path(path)
    if path.is_dir():
        path = path / "bundle.json"
    try:
        return DeviceBundle.model_validate_json(path.read_text())
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read the device bundle: {exc}"]) from None
    except ValidationError as exc:
        raise ConfigError(str(path), format_validation_error(exc)) from None
