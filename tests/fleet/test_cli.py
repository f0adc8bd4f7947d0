"""``python -m fleet`` end to end on one home dir, against a running manager and agent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fleet.cli import main
from schemas.bundle import DeviceBundle
from tests.fleetkit import FleetKit, wait_for

pytestmark = pytest.mark.integration


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> object:
    capsys.readouterr()
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_device_config_publish_rollout(fleet: FleetKit, capsys: pytest.CaptureFixture[str]) -> None:
    home = str(fleet.home.root)
    added = run_json(capsys, "--home", home, "device", "add", "shop1-cam1", "--group", "shop1",
                     "--camera-url", "rtsp://10.0.0.5/stream")
    bundle = DeviceBundle.model_validate_json(Path(added["bundle_json"]).read_text())  # type: ignore[index]
    assert bundle.group == "shop1" and bundle.mqtt.port == fleet.broker.port and "BEGIN PUBLIC KEY" in \
        bundle.fleet_public_key_pem
    assert main(["device", "add", "Bad/Id", "--home", home]) == 1
    fleet.broker.reload()
    manager = fleet.start_manager()
    fleet.start_agent(bundle)
    wait_for(lambda: (manager.inventory.get("shop1-cam1") or {}).get("state") == "online", what="online")
    devices = run_json(capsys, "devices", "--home", home, "--group", "shop1")
    assert [d["device_id"] for d in devices] == ["shop1-cam1"] and devices[0]["state"] == "online"  # type: ignore[index]
    result = run_json(capsys, "config", "set", "shop1-cam1", "jpeg_quality=65", "--home", home, "--wait", "20")
    assert result == {"shop1-cam1": {"desired_version": 1, "status": "applied", "error": "", "problems": []}}
    capsys.readouterr()
    assert main(["config", "set", "shop1-cam1", "jpeg_quality=5000", "--home", home, "--wait", "20", "--json"]) == 1
    rejected = json.loads(capsys.readouterr().out)["shop1-cam1"]
    assert rejected["status"] == "rejected" and any("jpeg_quality" in p for p in rejected["problems"])
    ref = run_json(capsys, "model", "publish", str(fleet.model("2.0.0")), "--home", home)
    assert ref["version"] == "2.0.0" and len(ref["signature"]) == 88  # type: ignore[index]
    assert main(["model", "publish", str(fleet.model("2.0.0")), "--home", home]) == 1  # same version twice
    # the CLI builds URLs from fleet.yaml: point it at this test's artifact server
    started = run_json(capsys, "rollout", "start", "yolo11n_coco_int8_640:2.0.0", "--group", "shop1", "--home", home)
    cid = started["campaign_id"]  # type: ignore[index]
    wait_for(lambda: manager.rollouts.status(cid)["state"] == "succeeded", timeout_s=60, what="rollout")
    status = run_json(capsys, "rollout", "status", cid, "--home", home)
    assert status["counts"] == {"succeeded": 1}  # type: ignore[index]
    capsys.readouterr()
    assert main(["rollout", "pause", cid, "--home", home]) == 1  # finished campaigns cannot be paused
    assert "cannot pause campaign" in capsys.readouterr().err
    assert main(["--home", home, "devices"]) == 0 and "shop1-cam1" in capsys.readouterr().out
    assert main(["--home", home, "rollout", "status", "--all"]) == 0
