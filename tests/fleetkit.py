"""Test kit for the fleet and the agent: a real mosquitto, artifact server, manager and agents.

Loaded as a pytest plugin from tests/conftest.py. Nothing here is faked: ``SimpleControl`` is a
small but real ``ApplianceControl`` (validated live settings, model loads through the OTA slot
link) standing in for the video pipeline, which would cost a core per agent.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import Field

from appliance.agent import FleetAgent
from appliance.ota import HealthChecker, IrParseCheck, OtaInstaller
from common.assets import model_path
from common.configfile import StrictModel, validate
from common.signing import generate_keypair
from fleet.artifacts import ArtifactServer, publish
from fleet.broker import MosquittoBroker
from fleet.home import FleetConfig, FleetHome
from fleet.manager import FleetManager
from fleet.provision import add_device
from schemas.bundle import DeviceBundle
from schemas.model_manifest import MANIFEST_NAME
from schemas.mqtt import ArtifactRef

YOLO_DIR = "yolo11n_int8_openvino_model"


class LiveSettings(StrictModel):
    """The live-tunable part of an appliance config, as the pipeline validates it."""

    conf_threshold: float = Field(0.25, gt=0, lt=1)
    jpeg_quality: int = Field(85, ge=10, le=100)
    send_mode: Literal["track", "full"] = "track"
    max_fps: float = Field(15.0, gt=0, le=120)
    source_url: str = Field("file:///dev/null", min_length=1)


class SimpleControl:
    """A real ApplianceControl without video: settings validated whole and swapped atomically."""

    def __init__(self) -> None:
        self._settings = LiveSettings()
        self.loaded: list[Path] = []
        self.lock = threading.Lock()

    def telemetry(self) -> dict[str, Any]:
        return {"fps": 14.2, "latency_ms": {"detect": 48.0}, "drops": 0, "spool_bytes": 0, "health": "ok",
                "model_dir": str(self.loaded[-1]) if self.loaded else ""}

    def current_settings(self) -> dict[str, Any]:
        return self._settings.model_dump(mode="json")

    def apply_settings(self, settings: dict[str, Any]) -> dict[str, Any]:
        new = validate(LiveSettings, settings, "desired config")  # raises ConfigError, keeps the old
        with self.lock:
            self._settings = new
        return new.model_dump(mode="json")

    def load_model(self, model_dir: Path) -> None:
        self.loaded.append(Path(os.path.realpath(model_dir)))


def make_model_dir(dst: Path, version: str, *, model_id: str | None = None, corrupt_xml: bool = False) -> Path:
    """A copy of the shared YOLO11n IR with a manifest for ``version`` (made at test time, never committed)."""
    from models.manifest import build_manifest, write_manifest
    from models.presets import PRESETS

    src = model_path(YOLO_DIR)
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.is_file() and p.name != MANIFEST_NAME:
            shutil.copyfile(p, dst / p.name)
    if corrupt_xml:  # a signed artifact whose model is broken: passes every check until it is loaded
        (dst / "yolo11n.xml").write_text("<net name='broken'><layers><layer id='0' type='Nope'/></net>")
    manifest = build_manifest(dst, PRESETS["yolo11n_int8_640"], version)
    if model_id:
        manifest = manifest.model_copy(update={"model_id": model_id})
    write_manifest(dst, manifest)
    return dst


def wait_for(predicate: Callable[[], Any], timeout_s: float = 20.0, poll_s: float = 0.05, what: str = "") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what or predicate}")


class FleetKit:
    """One fleet on loopback: home dir, keys, mosquitto, artifact server; manager and agents on demand."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = FleetHome(root / "home")
        generate_keypair(self.home.private_key, self.home.public_key)
        self.broker = MosquittoBroker(self.home.broker.root, port=0)
        self.home.broker.root.mkdir(parents=True, exist_ok=True)
        self.broker.start()
        self.artifact_server = ArtifactServer(self.home.artifacts, port=0).start()
        self.home.write_config(FleetConfig(mqtt_port=self.broker.port, artifact_port=self.artifact_server.port))
        self.manager: FleetManager | None = None
        self.agents: dict[str, FleetAgent] = {}
        self.controls: dict[str, SimpleControl] = {}
        self._models = root / "models"

    # devices
    def add_device(self, device_id: str, group: str = "default") -> DeviceBundle:
        bundle, _ = add_device(self.home, device_id, group=group)  # SIGHUPs the broker, as in production
        return bundle

    def model(self, version: str, **kw: Any) -> Path:
        path = self._models / f"{version}{'-bad' if kw.get('corrupt_xml') else ''}"
        return path if path.exists() else make_model_dir(path, version, **kw)

    def publish_model(self, version: str, **kw: Any) -> ArtifactRef:
        ref = publish(self.model(version, **kw), self.home.artifacts, self.home.private_key)
        return ref.model_copy(update={"url": self.artifact_server.url_for(ref)})

    def start_agent(self, bundle: DeviceBundle, *, checker: HealthChecker | None = None,
                    factory_version: str = "1.0.0", telemetry_interval_s: float = 1.0) -> FleetAgent:
        data = self.root / "devices" / bundle.device_id
        control = self.controls.setdefault(bundle.device_id, SimpleControl())
        installer = OtaInstaller(data, bundle.fleet_public_key_pem, checker or IrParseCheck(), control)
        installer.seed(self.model(factory_version))
        agent = FleetAgent(bundle, control, installer, data, telemetry_interval_s=telemetry_interval_s).start()
        self.agents[bundle.device_id] = agent
        return agent

    def start_manager(self, tick_s: float = 0.1) -> FleetManager:
        self.manager = FleetManager(self.home.db_path, mqtt_host="127.0.0.1", mqtt_port=self.broker.port,
                                    ca_cert=self.home.broker.ca_crt,
                                    password=self.home.broker.manager_password.read_text().strip(),
                                    tick_s=tick_s).start(wait_connected_s=10)
        return self.manager

    def stop_manager(self) -> None:
        if self.manager:
            self.manager.stop()
            self.manager = None

    def close(self) -> None:
        for agent in self.agents.values():
            agent.stop(timeout_s=2)
        self.stop_manager()
        self.artifact_server.stop()
        self.broker.stop()


def mosquitto_reachable_tmpdir() -> Path:
    """A temp dir the broker's ``mosquitto`` user can reach (pytest's own tmp root is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="reidfleet-fleet-"))
    os.chmod(path, 0o711)
    return path


@pytest.fixture
def fleet() -> Iterator[FleetKit]:
    root = mosquitto_reachable_tmpdir()
    kit = FleetKit(root)
    try:
        yield kit
    finally:
        kit.close()
        shutil.rmtree(root, ignore_errors=True)
