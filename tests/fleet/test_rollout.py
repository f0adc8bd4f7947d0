"""Rollout campaigns over real agents on a real broker.

The 20-agent tests use ``IrParseCheck`` as the agents' health check (OpenVINO parses the IR; no
inference), so 20 agents fit on a 2-core machine. The full detector check (real inference on a
probe image with an FPS floor) is tested in tests/appliance/test_ota.py::test_full_detector_health_check.
"""

from __future__ import annotations

import time

import pytest

from appliance.ota import DetectorHealthCheck
from fleet.rollout import plan_waves
from tests.fleetkit import FleetKit, wait_for

pytestmark = pytest.mark.integration


def test_plan_waves() -> None:
    assert plan_waves(20) == [1, 2, 4, 8, 5]
    assert plan_waves(1) == [1]
    assert plan_waves(100, 5, 2) == [5, 10, 20, 40, 25]
    assert plan_waves(3, 50, 1) == [2, 1]
    assert sum(plan_waves(57, 3, 1.5)) == 57


def _fleet_of(fleet: FleetKit, n: int) -> list[str]:
    ids = [f"cam-{i:02d}" for i in range(n)]
    for d in ids:
        fleet.start_agent(fleet.add_device(d), telemetry_interval_s=2.0)
    inv = fleet.manager.inventory  # type: ignore[union-attr]
    wait_for(lambda: sum(d["state"] == "online" and d["model_version"] == "1.0.0" for d in inv.list()) == n,
             timeout_s=60, what=f"{n} agents online")
    return ids


def test_20_agents_wave_by_wave_then_a_failing_canary_aborts(fleet: FleetKit) -> None:
    manager = fleet.start_manager()
    ids = _fleet_of(fleet, 20)
    engine = manager.rollouts
    cid = engine.start(fleet.publish_model("2.0.0"), health=None)
    wait_for(lambda: engine.status(cid)["state"] == "succeeded", timeout_s=180, what="campaign v2")
    status = engine.status(cid)
    assert status["waves"] == [1, 2, 4, 8, 5] and status["counts"] == {"succeeded": 20}
    by_wave: dict[int, list[dict]] = {}
    for d in status["devices"]:
        by_wave.setdefault(d["wave"], []).append(d)
    for w in range(1, 5):  # a wave is sent only after every device of the previous one finished
        assert min(d["sent_at"] for d in by_wave[w]) >= max(d["finished_at"] for d in by_wave[w - 1])
    for d in ids:
        assert fleet.agents[d].installer.current().version == "2.0.0"  # type: ignore[union-attr]
    wait_for(lambda: all(d["model_version"] == "2.0.0" for d in manager.inventory.list()), what="inventory on v2")

    # a broken model: the canary rolls back by itself and the campaign aborts before anyone else gets it
    cid = engine.start(fleet.publish_model("3.0.0", corrupt_xml=True))
    wait_for(lambda: engine.status(cid)["state"] == "aborted", timeout_s=60, what="abort")
    status = engine.status(cid)
    assert status["counts"] == {"rolled_back": 1, "skipped": 19}, status["counts"]
    assert "1 of 1 finished devices failed" in status["reason"]
    for d in ids:
        assert fleet.agents[d].installer.current().version == "2.0.0"  # type: ignore[union-attr]


def test_failed_wave_aborts_and_reverts_updated_devices(fleet: FleetKit, tmp_path) -> None:
    manager = fleet.start_manager()
    for d in ("cam-00", "cam-02", "cam-03"):
        fleet.start_agent(fleet.add_device(d))
    # cam-01's health check needs a probe image that this box does not have: a real, device-side failure
    fleet.start_agent(fleet.add_device("cam-01"), checker=DetectorHealthCheck(tmp_path / "missing.jpg"))
    wait_for(lambda: sum(d["state"] == "online" for d in manager.inventory.list()) == 4, what="online")
    engine = manager.rollouts
    cid = engine.start(fleet.publish_model("2.0.0"))
    wait_for(lambda: engine.status(cid)["state"] == "aborted", timeout_s=60, what="abort")
    devices = {d["device_id"]: d for d in engine.status(cid)["devices"]}
    assert engine.status(cid)["waves"] == [1, 2, 1]
    assert devices["cam-01"]["state"] == "rolled_back" and "probe image" in devices["cam-01"]["error"]
    assert devices["cam-00"]["state"] == "reverted" and devices["cam-02"]["state"] == "reverted"
    assert devices["cam-03"]["state"] == "skipped"
    for d in ("cam-00", "cam-01", "cam-02", "cam-03"):
        assert fleet.agents[d].installer.current().version == "1.0.0", d  # type: ignore[union-attr]


def test_manager_restart_mid_rollout_resumes_and_pause_holds(fleet: FleetKit) -> None:
    manager = fleet.start_manager()
    _fleet_of(fleet, 6)
    engine = manager.rollouts
    cid = engine.start(fleet.publish_model("2.0.0"), soak_s=1.0)  # waves [1, 2, 3], 1 s soak after each
    wait_for(lambda: engine.status(cid)["counts"].get("succeeded", 0) >= 1, what="canary done")
    fleet.stop_manager()  # killed between waves
    time.sleep(1.5)
    manager = fleet.start_manager()
    engine = manager.rollouts
    assert engine.status(cid)["state"] == "running"
    wait_for(lambda: engine.status(cid)["current_wave"] >= 1, timeout_s=30, what="next wave after restart")
    engine.pause(cid)
    wave_at_pause = engine.status(cid)["current_wave"]
    assert wave_at_pause == 1  # paused before the last wave
    time.sleep(3.0)  # longer than soak + a wave: nothing new may start while paused
    assert engine.status(cid)["current_wave"] == wave_at_pause
    engine.resume(cid)
    wait_for(lambda: engine.status(cid)["state"] == "succeeded", timeout_s=60, what="done after resume")
    assert engine.status(cid)["counts"] == {"succeeded": 6}
