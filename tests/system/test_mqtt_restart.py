"""mosquitto killed and restarted under a fleet whose agent drives a real appliance pipeline.

tests/appliance/test_agent.py covers a clean broker stop with a stand-in control; here the broker dies by
SIGKILL (no chance to save), right after a desired config was published, the agent controls the real
video pipeline (PETS video looping into Kafka), and the checks are on what the fleet and the pipeline do:
- agent and manager reconnect by themselves; the device is ``online`` again with live telemetry;
- the retained desired config is still on the broker after the crash (a freshly booting device would
  get it), is delivered again on reconnect and re-reported without being re-applied;
- a change made while the broker was down reaches the real pipeline after the restart;
- the video loop never stopped.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import ssl
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from appliance.config import load
from appliance.pipeline import Pipeline
from common.kafka import ensure_topics
from fleet.broker import MosquittoBroker
from schemas.mqtt import MANAGER_USERNAME
from schemas.topics import TopicSpec, device_topic
from tests.fleetkit import FleetKit
from tests.system.kit import PETS, wait_for

pytestmark = pytest.mark.integration


def retained_desired(fleet: FleetKit, device: str) -> dict | None:
    """What a device subscribing now would get: the retained desired config, read as the manager account."""
    got: queue.Queue[bytes] = queue.Queue()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.username_pw_set(MANAGER_USERNAME, fleet.home.broker.manager_password.read_text().strip())
    c.tls_set_context(ssl.create_default_context(cafile=str(fleet.home.broker.ca_crt)))
    c.on_connect = lambda cl, _u, _f, _rc, _p: cl.subscribe(device_topic(device, "config/desired"), qos=1)
    c.on_message = lambda _c, _u, m: got.put(bytes(m.payload)) if m.retain else None
    c.connect("127.0.0.1", fleet.broker.port)
    c.loop_start()
    try:
        payload = got.get(timeout=5)
        return json.loads(payload) if payload else None
    except queue.Empty:
        return None
    finally:
        c.disconnect()
        c.loop_stop()


def crash_and_restart(fleet: FleetKit) -> None:
    port, pid = fleet.broker.port, fleet.broker.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    fleet.broker.wait()
    fleet.broker = MosquittoBroker(fleet.home.broker.root, port=port).start()


def test_mosquitto_sigkill_restart_with_a_real_pipeline(fleet: FleetKit, kafka_bootstrap: str,
                                                        unique_topic_prefix: str, tmp_path: Path) -> None:
    topic = unique_topic_prefix + "reid_input"
    ensure_topics(kafka_bootstrap, [TopicSpec(topic, 1, 1)])
    cfg = load(None, [f"source.url={PETS}", "source.loop=true", "source.realtime=true",
                      f"kafka.bootstrap={kafka_bootstrap}", f"kafka.topic={topic}",
                      f"spool.dir={tmp_path / 'spool'}", "device_id=cam-1",
                      "detector.threads=1"])
    pipe = Pipeline(cfg, serve_http=False).start()
    runner = threading.Thread(target=pipe.run, daemon=True)
    runner.start()
    fleet.controls["cam-1"] = pipe  # type: ignore[assignment]  # the real pipeline is the agent's control
    try:
        manager = fleet.start_manager()
        agent = fleet.start_agent(fleet.add_device("cam-1"))
        inv, sh = manager.inventory, manager.shadows
        wait_for(lambda: (inv.get("cam-1") or {}).get("state") == "online", 30, "online")
        sh.set_desired("cam-1", {"sending": {"crop_jpeg_quality": 70}})
        wait_for(lambda: sh.get("cam-1")["applied_version"] == 1, 30, "v1 applied")
        assert pipe.cfg.sending.crop_jpeg_quality == 70

        crash_and_restart(fleet)  # within mosquitto's autosave interval of the v1 publish
        wait_for(lambda: agent.connects >= 2 and agent.connected.is_set() and manager.connected.is_set(), 60,
                 "agent and manager reconnect")
        # The manager re-publishes desired configs on every reconnect: wait for that, don't race it.
        wait_for(lambda: (retained_desired(fleet, "cam-1") or {}).get("version") == 1, 30,
                 "retained desired v1 back on the broker")
        kept = retained_desired(fleet, "cam-1")
        assert kept is not None and kept["version"] == 1, f"retained desired lost in the crash: {kept}"

        fleet.broker.stop()  # a second outage, during which the operator changes the config
        wait_for(lambda: not agent.connected.is_set() and not manager.connected.is_set(), 30, "outage seen")
        frames_before = pipe.frames_processed
        sh.set_desired("cam-1", {"sending": {"crop_jpeg_quality": 60}})
        time.sleep(3)
        fleet.broker = MosquittoBroker(fleet.home.broker.root, port=fleet.broker.port).start()
        wait_for(lambda: sh.get("cam-1")["applied_version"] == 2, 60, "v2 delivered after the restart")
        assert pipe.cfg.sending.crop_jpeg_quality == 60
        assert pipe.frames_processed > frames_before, "the video loop kept running through the outage"
        wait_for(lambda: inv.get("cam-1")["state"] == "online", 30, "online again")
        n_connects = agent.connects

        crash_and_restart(fleet)  # v2 re-delivered on reconnect: re-reported, not re-applied
        wait_for(lambda: agent.connects > n_connects and agent.connected.is_set(), 60, "reconnect")
        wait_for(lambda: (retained_desired(fleet, "cam-1") or {}).get("version") == 2, 30,
                 "retained desired v2 back on the broker")
        kept = retained_desired(fleet, "cam-1")
        assert kept is not None and kept["version"] == 2, kept
        dev = wait_for(lambda: (d := inv.get("cam-1")) and d["state"] == "online" and d["telemetry"]
                       and d["telemetry"]["ts"] > time.time() - 5 and d, 30, "fresh telemetry")
        tel = dev["telemetry"]["pipeline"]
        assert tel["frames_processed"] > 0 and tel["source"]["state"] == "ok" and tel["kafka"]["state"] == "direct"
        assert sh.get("cam-1")["in_sync"] and pipe.cfg.sending.crop_jpeg_quality == 60
    finally:
        pipe.close()
        runner.join(30)
