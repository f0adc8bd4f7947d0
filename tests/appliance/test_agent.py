"""The agent against a real broker and manager: status + will, telemetry, desired/reported config, re-sync."""

from __future__ import annotations

import pytest

from fleet.broker import MosquittoBroker
from tests.fleetkit import FleetKit, wait_for

pytestmark = pytest.mark.integration


def test_status_will_and_telemetry(fleet: FleetKit) -> None:
    manager = fleet.start_manager()
    agent = fleet.start_agent(fleet.add_device("cam-1"))
    inv = manager.inventory
    wait_for(lambda: (inv.get("cam-1") or {}).get("state") == "online", what="online")
    dev = wait_for(lambda: (d := inv.get("cam-1")) and d["telemetry"] and d, what="telemetry")
    tel = dev["telemetry"]
    assert dev["model_id"] == "yolo11n_coco_int8_640" and dev["model_version"] == "1.0.0"
    assert dev["health"] == "ok" and tel["pipeline"]["fps"] == 14.2 and tel["model_slot"] == "slot-a"
    assert tel["system"]["memory_total_bytes"] > 0 and tel["system"]["process_rss_bytes"] > 0
    agent.kill()  # no goodbye: the broker publishes the retained last will
    wait_for(lambda: inv.get("cam-1")["state"] == "offline", what="last will")
    assert inv.get("cam-1")["state_reason"] == "connection lost"


def test_bad_config_rejected_and_old_config_kept(fleet: FleetKit) -> None:
    manager = fleet.start_manager()
    fleet.start_agent(fleet.add_device("cam-1"))
    control = fleet.controls["cam-1"]
    sh = manager.shadows
    sh.set_desired("cam-1", {"jpeg_quality": 70, "send_mode": "full"})
    wait_for(lambda: sh.get("cam-1")["applied_version"] == 1, what="v1 applied")
    assert control.current_settings()["jpeg_quality"] == 70 and sh.get("cam-1")["in_sync"]
    sh.set_desired("cam-1", {"jpeg_quality": 500, "colour": "blue"})
    report = wait_for(lambda: (r := sh.get("cam-1"))["reported_version"] == 2 and r, what="v2 answered")
    assert report["reported_status"] == "rejected" and report["applied_version"] == 1 and not report["in_sync"]
    problems = " ".join(report["reported_problems"])
    assert "jpeg_quality" in problems and "colour" in problems and "unknown key" in problems
    assert "version 1 stays in force" in report["reported_error"]
    assert control.current_settings()["jpeg_quality"] == 70 and control.current_settings()["send_mode"] == "full"
    assert report["reported"]["jpeg_quality"] == 70  # what is in force, reported beside the error
    # the next good version applies on top of the last good one
    sh.set_desired("cam-1", {"jpeg_quality": 60}, replace=True)
    wait_for(lambda: sh.get("cam-1")["applied_version"] == 3, what="v3 applied")
    assert control.current_settings()["jpeg_quality"] == 60


def test_agent_resyncs_after_broker_restart(fleet: FleetKit) -> None:
    manager = fleet.start_manager()
    agent = fleet.start_agent(fleet.add_device("cam-1"))
    inv, sh = manager.inventory, manager.shadows
    wait_for(lambda: (inv.get("cam-1") or {}).get("state") == "online", what="online")
    port = fleet.broker.port
    fleet.broker.stop()
    wait_for(lambda: not agent.connected.is_set() and not manager.connected.is_set(), what="both see the outage")
    sh.set_desired("cam-1", {"max_fps": 5})  # changed while the broker is down
    fleet.broker = MosquittoBroker(fleet.home.broker.root, port=port).start()
    wait_for(lambda: agent.connected.is_set() and manager.connected.is_set(), timeout_s=60, what="reconnect")
    assert agent.connects >= 2
    wait_for(lambda: sh.get("cam-1")["applied_version"] == 1, timeout_s=30, what="desired delivered after restart")
    assert fleet.controls["cam-1"].current_settings()["max_fps"] == 5
    wait_for(lambda: inv.get("cam-1")["state"] == "online", what="online again")


def test_agent_restart_reapplies_last_good_config(fleet: FleetKit) -> None:
    manager = fleet.start_manager()
    bundle = fleet.add_device("cam-1")
    agent = fleet.start_agent(bundle)
    manager.shadows.set_desired("cam-1", {"jpeg_quality": 42})
    wait_for(lambda: manager.shadows.get("cam-1")["applied_version"] == 1, what="applied")
    agent.stop()
    assert manager.inventory.get("cam-1")["state_reason"] in ("shutdown", "")
    wait_for(lambda: manager.inventory.get("cam-1")["state"] == "offline", what="clean offline")
    fleet.controls.pop("cam-1")  # a fresh process: the pipeline starts from its own defaults
    fleet.start_agent(bundle)
    wait_for(lambda: fleet.controls["cam-1"].current_settings()["jpeg_quality"] == 42, what="re-applied")
