"""Over-the-air model updates: download, verify, install into the inactive A/B slot, switch, check, roll back.

Layout under ``<data_dir>/models``::

    slot-a/  slot-b/      two model directories (manifest.json + files + installed.json)
    current -> slot-a     relative symlink, replaced atomically (symlink to a temp name + rename)
    journal.json          the step the installer is in, written (fsync + rename) before each step
    downloads/            <sha256>.part while downloading (resumed with HTTP Range)

Why HTTP with Range and not chunks over MQTT: a 3 MB artifact in MQTT chunks needs its own
windowing, acknowledgement and reassembly, keeps the broker busy for every box of a wave, and
widens the broker's message-size limit for everyone. HTTP gets resume from ``Range`` for free,
any static file server or CDN can serve artifacts, and integrity does not depend on the transport
because the agent checks the sha256 and the ed25519 signature before it touches anything else.

Crash safety: the ``current`` link only ever points at a slot that was completely installed
(``installed.json`` is written last, then the directory is renamed into place). A kill -9 or power
cut before the switch leaves ``current`` untouched and the job resumes when it is delivered again
(downloads resume from the partial file). A kill after the switch, before the health check passed,
is rolled back by :meth:`OtaInstaller.recover` at the next start: a model that crashed the box
while being checked is not tried again by itself.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from appliance.control import ApplianceControl
from common.signing import SignatureError, load_public_key, verify
from schemas.model_manifest import MANIFEST_NAME, ManifestError, load_manifest, sha256_file, verify_model_dir
from schemas.mqtt import OTA_TERMINAL, ArtifactRef, HealthCheckSpec, ModelRef, OtaJob, OtaProgress

log = logging.getLogger(__name__)

SLOTS = ("slot-a", "slot-b")
CURRENT = "current"
JOURNAL = "journal.json"
INSTALLED = "installed.json"
HISTORY_KEEP = 50
ProgressFn = Callable[[OtaProgress], None]


class OtaError(RuntimeError):
    """A job that cannot be carried out; the message is what the device reports."""


class HealthCheckFailed(OtaError):
    pass


class HealthChecker(Protocol):
    """Checks a freshly installed model directory; raises :class:`HealthCheckFailed` saying why."""

    name: str

    def check(self, model_dir: Path, spec: HealthCheckSpec) -> str: ...


def _brief(exc: BaseException, limit: int = 300) -> str:
    """One line of an exception: OpenVINO puts the source location first and the reason after."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("Exception from", "Check '"))] or lines
    return " ".join(useful)[:limit]


def _entrypoint(model_dir: Path) -> Path:
    if (model_dir / MANIFEST_NAME).is_file():
        return model_dir / load_manifest(model_dir).entrypoint
    xmls = sorted(model_dir.glob("*.xml"))
    if len(xmls) != 1:
        raise HealthCheckFailed(f"{model_dir}: expected one .xml, found {len(xmls)}")
    return xmls[0]


class IrParseCheck:
    """Lightweight check: OpenVINO parses the IR (xml + weights) and it has one image input.

    It proves the files form a loadable graph but runs no inference: used where many agents
    share one machine (the 20-agent rollout test and bench). :class:`DetectorHealthCheck` is the
    full check the appliance runs.
    """

    name = "ir-parse"

    def check(self, model_dir: Path, spec: HealthCheckSpec) -> str:
        import openvino as ov

        xml = _entrypoint(model_dir)
        try:
            model = ov.Core().read_model(str(xml))
        except Exception as exc:
            raise HealthCheckFailed(f"OpenVINO cannot read {xml.name}: {_brief(exc)}") from None
        if len(model.inputs) != 1 or len(model.inputs[0].get_partial_shape()) != 4:
            raise HealthCheckFailed(f"{xml.name}: expected one 4-D image input, got {len(model.inputs)} inputs")
        return f"IR parsed: {len(model.get_ops())} ops"


class DetectorHealthCheck:
    """The full check: the detector loads the model, finds ``min_people`` in the probe image and
    keeps ``min_fps`` on it for ``duration_s`` seconds (measured beside the running pipeline, so
    the floor is a conservative one)."""

    name = "detector"

    def __init__(self, probe_image: Path, detector_settings: dict[str, Any] | None = None) -> None:
        self.probe_image = probe_image
        self.detector_settings = dict(detector_settings or {})

    def check(self, model_dir: Path, spec: HealthCheckSpec) -> str:
        import cv2

        from appliance.detect import build_detector
        from appliance.detect.base import DetectorConfig
        from appliance.types import PERSON_CLASS_ID

        image = cv2.imread(str(self.probe_image))
        if image is None:
            raise HealthCheckFailed(f"probe image {self.probe_image} cannot be read")
        try:
            detector = build_detector(DetectorConfig(model_dir=model_dir, **self.detector_settings))
        except Exception as exc:
            raise HealthCheckFailed(f"detector cannot load the model: {_brief(exc)}") from None
        try:
            people = int((detector.detect(image).class_id == PERSON_CLASS_ID).sum())
            if people < spec.min_people:
                raise HealthCheckFailed(f"found {people} people in the probe image, need {spec.min_people}")
            frames, t0 = 0, time.monotonic()
            while (elapsed := time.monotonic() - t0) < spec.duration_s or frames == 0:
                detector.detect(image)
                frames += 1
            fps = frames / max(elapsed, 1e-9)
            if spec.min_fps and fps < spec.min_fps:
                raise HealthCheckFailed(f"{fps:.1f} FPS over {elapsed:.1f} s, below the floor of {spec.min_fps}")
            return f"{people} people, {fps:.1f} FPS over {elapsed:.1f} s"
        finally:
            detector.close()


# --- small durable-file helpers ----------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write, fsync, rename, fsync the directory: after a power cut the file is old or new, never torn."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    _fsync_dir(path.parent)


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for d in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        _fsync_dir(d)


@dataclass(frozen=True)
class SlotInfo:
    slot: str
    model_id: str
    version: str
    sha256: str = ""

    @property
    def ref(self) -> ModelRef:
        return ModelRef(model_id=self.model_id, version=self.version)


class OtaInstaller:
    """Runs OTA jobs for one box. Not thread-safe: the agent runs one job at a time."""

    def __init__(self, data_dir: Path, public_key_pem: str, checker: HealthChecker,
                 control: ApplianceControl | None = None, *, download_timeout_s: float = 30.0,
                 download_attempts: int = 4) -> None:
        self.root = Path(data_dir) / "models"
        self.downloads = self.root / "downloads"
        self.public_key = load_public_key(public_key_pem)
        self.checker = checker
        self.control = control
        self.download_timeout_s = download_timeout_s
        self.download_attempts = download_attempts
        self.root.mkdir(parents=True, exist_ok=True)
        self.downloads.mkdir(exist_ok=True)

    # --- slots and pointer -----------------------------------------------------------------------
    @property
    def current_link(self) -> Path:
        return self.root / CURRENT

    def current_dir(self) -> Path:
        """The model directory the appliance loads (through the ``current`` link)."""
        return self.current_link

    def slot_info(self, slot: str) -> SlotInfo | None:
        marker = self.root / slot / INSTALLED
        try:
            data = json.loads(marker.read_text())
            return SlotInfo(slot, data["model_id"], data["version"], data.get("sha256", ""))
        except (OSError, ValueError, KeyError):
            return None

    def active_slot(self) -> str | None:
        try:
            target = os.readlink(self.current_link)
        except OSError:
            return None
        return target if target in SLOTS else None

    def current(self) -> SlotInfo | None:
        slot = self.active_slot()
        return self.slot_info(slot) if slot else None

    def inactive_slot(self) -> str:
        return SLOTS[1] if self.active_slot() == SLOTS[0] else SLOTS[0]

    def _point_to(self, slot: str) -> None:
        tmp = self.root / (CURRENT + ".tmp")
        tmp.unlink(missing_ok=True)
        os.symlink(slot, tmp)
        os.replace(tmp, self.current_link)
        _fsync_dir(self.root)

    def seed(self, factory_dir: Path, model_id: str | None = None, version: str | None = None) -> SlotInfo:
        """First boot: copy the model the image ships into slot-a and point ``current`` at it.

        A factory directory with a manifest is verified against it; one without (e.g. a plain
        Ultralytics export) is named after its folder with version ``factory``.
        """
        if (info := self.current()) is not None:
            return info
        if (factory_dir / MANIFEST_NAME).is_file():
            manifest = verify_model_dir(factory_dir)
            model_id, version = model_id or manifest.model_id, version or manifest.version
        slot = SLOTS[0]
        staging = self.root / (slot + ".tmp")
        if staging.is_symlink() or staging.is_file():
            staging.unlink()  # rmtree refuses links; a leftover of any kind must not block first boot
        elif staging.exists():
            shutil.rmtree(staging)  # errors surface here, not as a confusing FileExistsError below
        shutil.copytree(factory_dir, staging)
        write_json_atomic(staging / INSTALLED, {"model_id": model_id or factory_dir.name,
                                                "version": version or "factory", "sha256": "",
                                                "installed_at": time.time(), "job_id": "factory"})
        _fsync_tree(staging)
        shutil.rmtree(self.root / slot, ignore_errors=True)
        staging.rename(self.root / slot)
        self._point_to(slot)
        log.info("seeded %s from %s", slot, factory_dir)
        info = self.current()
        assert info is not None
        return info

    # --- journal ---------------------------------------------------------------------------------
    def journal(self) -> dict[str, Any]:
        try:
            return json.loads((self.root / JOURNAL).read_text())
        except (OSError, ValueError):
            return {"history": {}}

    def _write_journal(self, **fields: Any) -> None:
        j = self.journal()
        j.update(fields)
        write_json_atomic(self.root / JOURNAL, j)

    def _finish(self, progress: OtaProgress) -> OtaProgress:
        j = self.journal()
        history: dict[str, Any] = j.get("history", {})
        history[progress.job_id] = progress.model_dump(mode="json")
        while len(history) > HISTORY_KEEP:
            history.pop(next(iter(history)))
        j.update(history=history, job_id=progress.job_id, state=progress.state)
        write_json_atomic(self.root / JOURNAL, j)
        return progress

    def finished(self, job_id: str) -> OtaProgress | None:
        """The final progress of a job already done (a retained job delivered again is not re-run)."""
        done = self.journal().get("history", {}).get(job_id)
        return OtaProgress.model_validate(done) if done else None

    def recover(self) -> OtaProgress | None:
        """Run at start, before the appliance loads its model: undo a switch that was never confirmed.

        Returns the final progress to report when a job was interrupted after its switch.
        """
        for slot in SLOTS:
            shutil.rmtree(self.root / (slot + ".tmp"), ignore_errors=True)
        (self.root / (CURRENT + ".tmp")).unlink(missing_ok=True)
        j = self.journal()
        state, job_id = j.get("state"), j.get("job_id")
        result = None
        if state in ("switching", "health_check") and job_id:
            previous = j.get("previous")
            if previous in SLOTS and self.slot_info(previous) is not None:
                self._point_to(previous)
            info = self.current()
            result = self._finish(OtaProgress(
                job_id=job_id, campaign_id=j.get("campaign_id", ""), action=j.get("action", "install"),
                state="rolled_back", model_id=info.model_id if info else "", model_version=info.version if info else "",
                error=f"interrupted (crash or power cut) during {state}; rolled back to {previous}"))
            log.warning("OTA job %s was interrupted during %s: rolled back to %s", job_id, state, previous)
        # whatever happened, current must point at a complete slot
        if self.current() is None:
            for slot in SLOTS:
                if self.slot_info(slot) is not None:
                    log.warning("current model link is missing or broken: pointing it at %s", slot)
                    self._point_to(slot)
                    break
        return result

    # --- running a job ---------------------------------------------------------------------------
    def run(self, job: OtaJob, on_progress: ProgressFn | None = None) -> OtaProgress:
        """Carry out ``job`` and return its final progress (never raises for a bad job)."""
        report = on_progress or (lambda _p: None)
        if (done := self.finished(job.job_id)) is not None:
            report(done)
            return done
        info = self.current()

        def progress(state: str, **kw: Any) -> OtaProgress:
            now = self.current()
            p = OtaProgress(job_id=job.job_id, campaign_id=job.campaign_id, action=job.action, state=state,
                            model_id=now.model_id if now else "", model_version=now.version if now else "", **kw)
            report(p)
            return p

        self._write_journal(job_id=job.job_id, campaign_id=job.campaign_id, action=job.action, state="received",
                            previous=self.active_slot())
        progress("received")
        try:
            if info is None:
                raise OtaError("no working model installed (seed the factory model first)")
            if job.action == "install":
                assert job.artifact is not None
                target = self._install(job, job.artifact, progress)
            else:
                assert job.revert_to is not None
                target = self._prepare_revert(job.revert_to)
            if target is None:  # already on the requested model
                return self._finish(progress("succeeded", progress=1.0))
            self._write_journal(state="switching", previous=info.slot, target=target)
            progress("switching")
            self._point_to(target)
            self._write_journal(state="health_check")
            progress("health_check")
        except OtaError as exc:
            log.warning("OTA job %s failed: %s", job.job_id, exc)
            return self._finish(progress("failed", error=str(exc)))
        pipeline_switched = False
        try:
            detail = self.checker.check(self.root / target, job.health)
            if self.control is not None:
                pipeline_switched = True
                self.control.load_model(self.current_link)
        except Exception as exc:
            error = str(exc) if isinstance(exc, OtaError) else f"{type(exc).__name__}: {exc}"
            self._point_to(info.slot)
            if self.control is not None and pipeline_switched:
                try:
                    self.control.load_model(self.current_link)
                except Exception:
                    log.exception("reloading the previous model after a rollback failed")
            log.warning("OTA job %s: health check failed (%s); rolled back to %s %s", job.job_id, error,
                        info.model_id, info.version)
            return self._finish(progress("rolled_back", error=f"health check failed: {error}"))
        log.info("OTA job %s: now on %s (%s)", job.job_id, target, detail)
        if job.artifact is not None:
            for f in self.downloads.glob(job.artifact.sha256 + "*"):
                f.unlink(missing_ok=True)
        return self._finish(progress("succeeded", progress=1.0))

    def _prepare_revert(self, want: ModelRef) -> str | None:
        info = self.current()
        if info and info.ref == want:
            return None
        slot = self.inactive_slot()
        other = self.slot_info(slot)
        if other is None or other.ref != want:
            have = f"{other.model_id} {other.version}" if other else "nothing"
            raise OtaError(f"cannot revert to {want.model_id} {want.version}: the inactive slot holds {have}")
        return slot

    def _install(self, job: OtaJob, art: ArtifactRef, progress: Callable[..., OtaProgress]) -> str | None:
        info = self.current()
        if info is not None and art.sha256 == info.sha256:
            return None
        self._write_journal(state="downloading")
        path = self._download(art, progress)
        # verify BEFORE anything else reads the file
        self._write_journal(state="verifying")
        progress("verifying", progress=1.0, bytes_done=art.size_bytes, bytes_total=art.size_bytes)
        digest = sha256_file(path)
        if digest != art.sha256:
            path.unlink(missing_ok=True)
            raise OtaError(f"sha256 mismatch: downloaded {digest}, job says {art.sha256}")
        try:
            verify(self.public_key, art.statement(), art.signature)
        except SignatureError as exc:
            path.unlink(missing_ok=True)
            raise OtaError(f"artifact signature rejected: {exc}") from None
        target = self.inactive_slot()
        self._write_journal(state="installing", target=target)
        progress("installing")
        staging = self.root / (target + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            with tarfile.open(path, "r:*") as tar:
                tar.extractall(staging, filter="data")
            manifest = verify_model_dir(staging)
        except (tarfile.TarError, ManifestError, OSError) as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise OtaError(f"artifact content rejected: {exc}") from None
        if (manifest.model_id, manifest.version) != (art.model_id, art.version):
            shutil.rmtree(staging, ignore_errors=True)
            raise OtaError(f"artifact holds {manifest.model_id} {manifest.version}, job names {art.model_id} "
                           f"{art.version}")
        write_json_atomic(staging / INSTALLED, {"model_id": art.model_id, "version": art.version,
                                                "sha256": art.sha256, "installed_at": time.time(),
                                                "job_id": job.job_id})
        _fsync_tree(staging)
        shutil.rmtree(self.root / target, ignore_errors=True)
        staging.rename(self.root / target)
        _fsync_dir(self.root)
        return target

    def _download(self, art: ArtifactRef, progress: Callable[..., OtaProgress]) -> Path:
        done_path = self.downloads / f"{art.sha256}.tar"
        if done_path.is_file() and done_path.stat().st_size == art.size_bytes:
            return done_path
        if not art.url:
            raise OtaError("the job names no download URL")
        free = shutil.disk_usage(self.root).free
        if free < 3 * art.size_bytes:
            raise OtaError(f"not enough disk space: {free} bytes free, need {3 * art.size_bytes}")
        part = self.downloads / f"{art.sha256}.part"
        last_error = ""
        for attempt in range(1, self.download_attempts + 1):
            have = part.stat().st_size if part.exists() else 0
            if have > art.size_bytes:
                part.unlink()
                have = 0
            if have == art.size_bytes:
                break
            try:
                self._fetch(art, part, have, progress)
            except urllib.error.HTTPError as exc:
                if exc.code == 416:  # we already hold everything the server has: it is short
                    total = (exc.headers.get("Content-Range") or "").rpartition("/")[2]
                    part.unlink(missing_ok=True)
                    raise OtaError(f"truncated artifact: the server has {total or 'fewer'} bytes, the job names "
                                   f"{art.size_bytes}") from None
                last_error = str(exc)
                log.warning("download attempt %d of %s failed: %s", attempt, art.url, exc)
                time.sleep(min(0.2 * 2**attempt, 5))
                continue
            except (OSError, urllib.error.URLError, OtaError) as exc:
                last_error = str(exc)
                log.warning("download attempt %d of %s failed: %s", attempt, art.url, exc)
                time.sleep(min(0.2 * 2**attempt, 5))
                continue
            if part.stat().st_size == art.size_bytes:
                break
            last_error = f"server sent {part.stat().st_size} of {art.size_bytes} bytes (truncated)"
        else:
            raise OtaError(f"download failed after {self.download_attempts} attempts: {last_error}")
        if part.stat().st_size != art.size_bytes:
            raise OtaError(f"download failed: {last_error}")
        part.replace(done_path)
        return done_path

    def _fetch(self, art: ArtifactRef, part: Path, have: int, progress: Callable[..., OtaProgress]) -> None:
        req = urllib.request.Request(art.url, headers={"Range": f"bytes={have}-"} if have else {})
        with urllib.request.urlopen(req, timeout=self.download_timeout_s) as resp:
            if have and resp.status != 206:  # server ignored the Range: start over
                have = 0
            length = resp.headers.get("Content-Length")
            if length is not None and have + int(length) != art.size_bytes:
                raise OtaError(f"truncated artifact: the server offers {have + int(length)} bytes, the job names "
                               f"{art.size_bytes}")
            mode = "ab" if have else "wb"
            last_report = 0.0
            with open(part, mode) as f:
                done = have
                while block := resp.read(1 << 16):
                    done += len(block)
                    if done > art.size_bytes:
                        raise OtaError(f"server sent more than the {art.size_bytes} bytes the job names")
                    f.write(block)
                    if time.monotonic() - last_report > 0.5:
                        f.flush()
                        last_report = time.monotonic()
                        progress("downloading", progress=done / art.size_bytes, bytes_done=done,
                                 bytes_total=art.size_bytes)
                f.flush()
                os.fsync(f.fileno())
        progress("downloading", progress=done / art.size_bytes, bytes_done=done, bytes_total=art.size_bytes)


__all__ = ["OTA_TERMINAL", "DetectorHealthCheck", "HealthCheckFailed", "HealthChecker", "IrParseCheck",
           "OtaError", "OtaInstaller"]
