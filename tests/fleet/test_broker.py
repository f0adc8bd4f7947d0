"""The generated mosquitto config against the real broker: TLS only, no anonymous, per-device ACL."""

from __future__ import annotations

import contextlib
import queue
import ssl
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fleet.broker import hash_password, request_reload
from schemas.bundle import DeviceBundle
from schemas.mqtt import MANAGER_USERNAME
from schemas.topics import device_topic
from tests.fleetkit import FleetKit

pytestmark = pytest.mark.integration


class Client:
    """A bare paho client that records what arrives and the broker's answers."""

    def __init__(self, kit: FleetKit, username: str | None, password: str | None, tls: bool = True) -> None:
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.connack: queue.Queue[object] = queue.Queue()
        self.suback: queue.Queue[list[object]] = queue.Queue()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        if username is not None:
            c.username_pw_set(username, password)
        if tls:
            c.tls_set_context(ssl.create_default_context(cafile=str(kit.home.broker.ca_crt)))
        c.on_connect = lambda _c, _u, _f, rc, _p: self.connack.put(rc)
        c.on_message = lambda _c, _u, m: self.messages.put((m.topic, bytes(m.payload)))
        c.on_subscribe = lambda _c, _u, _mid, rcs, _p: self.suback.put(rcs)
        self.client = c
        c.connect_async("127.0.0.1", kit.broker.port)
        c.loop_start()

    def connected(self, timeout: float = 10) -> bool:
        rc = self.connack.get(timeout=timeout)
        return not rc.is_failure  # type: ignore[attr-defined]

    def subscribe(self, topic: str) -> object:
        self.client.subscribe(topic, qos=1)
        return self.suback.get(timeout=5)[0]

    def publish(self, topic: str, payload: str, retain: bool = False) -> object:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(5)
        return info

    def drain(self, wait_s: float) -> list[tuple[str, bytes]]:
        out, deadline = [], time.monotonic() + wait_s
        while time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                out.append(self.messages.get(timeout=0.05))
        return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def assert_all_log_in(kit: FleetKit, bundles: list[DeviceBundle]) -> None:
    for b in bundles:
        dev = Client(kit, b.mqtt.username, b.mqtt.password)
        try:
            assert dev.connected(), f"{b.device_id} refused after the reload"
        finally:
            dev.close()


def test_password_hash_matches_mosquitto_format() -> None:
    h = hash_password("secret")
    assert h.startswith("$7$101$") and len(h.split("$")) == 5


def test_device_confined_to_its_own_subtree(fleet: FleetKit) -> None:
    a = fleet.add_device("cam-a")
    b = fleet.add_device("cam-b")
    mgr = Client(fleet, MANAGER_USERNAME, fleet.home.broker.manager_password.read_text().strip())
    dev_a = Client(fleet, a.mqtt.username, a.mqtt.password)
    dev_b = Client(fleet, b.mqtt.username, b.mqtt.password)
    try:
        assert mgr.connected() and dev_a.connected() and dev_b.connected()
        assert not mgr.subscribe("reidfleet/#").is_failure  # type: ignore[attr-defined]
        # A may read its own desired config (positive control) ...
        assert not dev_a.subscribe(device_topic("cam-a", "config/desired")).is_failure  # type: ignore[attr-defined]
        # ... but neither B's topics nor wildcards over the fleet. mosquitto 2.0 grants such a
        # subscription and applies the ACL per message, so what counts is what gets delivered.
        for topic in (device_topic("cam-b", "config/desired"), device_topic("cam-b", "status"), "reidfleet/#",
                      "reidfleet/devices/+/telemetry", "#"):
            dev_a.subscribe(topic)
        mgr.publish(device_topic("cam-a", "config/desired"), "for-a")
        mgr.publish(device_topic("cam-b", "config/desired"), "for-b", retain=True)
        mgr.publish(device_topic("cam-b", "ota/job"), "job-b")
        dev_b.publish(device_topic("cam-b", "status"), "b-status")
        dev_b.publish(device_topic("cam-b", "telemetry"), "b-telemetry")
        got_a = dev_a.drain(1.0)
        assert sorted({p for _t, p in got_a}) == [b"for-a"], got_a
        # a device cannot even read its own reports back (write-only leaves)
        dev_a.subscribe(device_topic("cam-a", "status"))
        dev_a.publish(device_topic("cam-a", "status"), "a-echo")
        assert all(p != b"a-echo" for _t, p in dev_a.drain(0.5))
        # A writes its own status (seen by the manager), but not B's topics nor its own desired config/job
        mgr.drain(0.2)
        dev_a.publish(device_topic("cam-a", "status"), "a-ok")
        for topic in (device_topic("cam-b", "status"), device_topic("cam-b", "ota/progress"),
                      device_topic("cam-a", "config/desired"), device_topic("cam-a", "ota/job"),
                      "reidfleet/other"):
            dev_a.publish(topic, "forged")
        seen = mgr.drain(1.0)
        assert (device_topic("cam-a", "status"), b"a-ok") in seen
        assert all(p != b"forged" for _t, p in seen), seen
    finally:
        for c in (mgr, dev_a, dev_b):
            c.close()


def test_no_anonymous_no_wrong_password_no_plaintext(fleet: FleetKit) -> None:
    a = fleet.add_device("cam-a")
    anon = Client(fleet, None, None)
    wrong = Client(fleet, "cam-a", "x" * 24)
    other_pw = Client(fleet, "cam-b", a.mqtt.password)  # someone else's name with A's password
    try:
        for c in (anon, wrong, other_pw):
            assert not c.connected()
    finally:
        for c in (anon, wrong, other_pw):
            c.close()
    # the only listener speaks TLS: a plaintext MQTT client gets nowhere
    out = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(fleet.broker.port), "-u", "cam-a",
                          "-P", a.mqtt.password, "-t", device_topic("cam-a", "status"), "-m", "x"],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode != 0


def test_adding_devices_to_a_live_broker_keeps_everyone_logged_in(fleet: FleetKit) -> None:
    """``fleet device add`` signals the running broker itself; its reload must see readable files.

    As root, a password file written root-owned 0600 was unreadable to the ``mosquitto`` user on
    reload, which dropped the connected manager and refused every login afterwards.
    """
    mgr = Client(fleet, MANAGER_USERNAME, fleet.home.broker.manager_password.read_text().strip())
    try:
        assert mgr.connected()
        bundles = [fleet.add_device(f"cam-{i}") for i in range(3)]  # three reloads while the manager is on
        time.sleep(0.5)
        assert_all_log_in(fleet, bundles)
        assert mgr.connack.empty()  # the manager was never dropped (paho would reconnect and report again)
        assert not mgr.subscribe("reidfleet/#").is_failure  # type: ignore[attr-defined]
    finally:
        mgr.close()


def test_a_lost_sighup_is_sent_again_until_a_reload_is_logged(tmp_path: Path) -> None:
    """mosquitto 2.0 drops a SIGHUP that arrives while it reloads. This stand-in drops the first one the same
    way and logs its reload like mosquitto; ``request_reload`` must notice and signal again."""
    log_path = tmp_path / "mosquitto.log"
    log_path.write_text("1: Reloading config.\n")  # an earlier reload: must not count
    ready = tmp_path / "ready"
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import signal, time
        seen = []
        def hup(_s, _f):
            seen.append(1)
            if len(seen) >= 2:
                with open({str(log_path)!r}, "a") as f:
                    f.write("2: Reloading config.\\n")
        signal.signal(signal.SIGHUP, hup)
        open({str(ready)!r}, "w").close()
        time.sleep(60)
    """)])
    try:
        deadline = time.monotonic() + 10
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert request_reload(child.pid, log_path, timeout_s=5)
        assert log_path.read_text().count("Reloading config.") == 2
        assert not request_reload(child.pid, tmp_path / "silent.log", timeout_s=0.6)  # never logs: says so
    finally:
        child.kill()
        child.wait()


def test_devices_added_back_to_back_can_all_log_in(fleet: FleetKit) -> None:
    """Each add waits for a reload that started after its own write, so none of a quick series is left out
    (an installer provisioning a batch of boxes)."""
    assert_all_log_in(fleet, [fleet.add_device(f"box-{i:02d}") for i in range(15)])


def test_revoked_device_cannot_log_in(fleet: FleetKit) -> None:
    from fleet.provision import remove_device

    a = fleet.add_device("cam-a")
    assert remove_device(fleet.home, "cam-a")
    fleet.broker.reload()
    time.sleep(0.3)
    c = Client(fleet, a.mqtt.username, a.mqtt.password)
    try:
        assert not c.connected()
    finally:
        c.close()
