"""OTA installer against a real artifact server: verification, A/B switch, rollback, kill -9 at each step."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.ota import DetectorHealthCheck, IrParseCheck, OtaInstaller
from common.assets import data_path, model_path
from common.signing import generate_keypair, load_private_key, sign
from fleet.artifacts import ArtifactServer, pack, publish
from schemas.model_manifest import ArtifactFile, InputSpec, ModelManifest, sha256_file, verify_model_dir
from schemas.mqtt import ArtifactRef, HealthCheckSpec, ModelRef, OtaJob
from tests.fleetkit import SimpleControl, make_model_dir

pytestmark = pytest.mark.integration

PROBE = data_path("mot15", "train", "PETS09-S2L1", "img1", "000001.jpg")


@dataclass
class Env:
    root: Path
    server: ArtifactServer
    key: Path
    pub_pem: str

    def publish(self, version: str, **kw: object) -> ArtifactRef:
        d = self.root / "models" / f"{version}{'-bad' if kw.get('corrupt_xml') else ''}"
        if not d.exists():
            make_model_dir(d, version, **kw)  # type: ignore[arg-type]
        ref = publish(d, self.root / "store", self.key)
        return ref.model_copy(update={"url": self.server.url_for(ref)})

    def installer(self, name: str = "box", checker: object | None = None, control: SimpleControl | None = None,
                  **kw: object) -> OtaInstaller:
        inst = OtaInstaller(self.root / name, self.pub_pem, checker or IrParseCheck(), control, **kw)  # type: ignore[arg-type]
        d = self.root / "models" / "1.0.0"
        if not d.exists():
            make_model_dir(d, "1.0.0")
        inst.seed(d)
        return inst


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    generate_keypair(tmp_path / "k", tmp_path / "k.pub")
    (tmp_path / "store").mkdir()
    with ArtifactServer(tmp_path / "store") as server:
        yield Env(tmp_path, server, tmp_path / "k", (tmp_path / "k.pub").read_text())


def job(ref: ArtifactRef, job_id: str = "j1", **kw: object) -> OtaJob:
    return OtaJob(job_id=job_id, artifact=ref, health=HealthCheckSpec(duration_s=0), **kw)  # type: ignore[arg-type]


def assert_working(inst: OtaInstaller, version: str) -> None:
    info = inst.current()
    assert info is not None and info.version == version
    verify_model_dir(inst.current_dir())
    IrParseCheck().check(inst.current_dir(), HealthCheckSpec())


def test_install_switches_slot_and_is_idempotent(env: Env) -> None:
    control = SimpleControl()
    inst = env.installer(control=control)
    states: list[str] = []
    result = inst.run(job(env.publish("2.0.0")), on_progress=lambda p: states.append(p.state))
    assert result.state == "succeeded", result.error
    assert states[:2] == ["received", "downloading"] and states[-3:] == ["switching", "health_check", "succeeded"]
    assert inst.active_slot() == "slot-b" and result.model_version == "2.0.0"
    assert_working(inst, "2.0.0")
    assert control.loaded[-1] == (inst.root / "slot-b").resolve()
    requests = env.server.requests
    # the same job delivered again (retained message after a reconnect) is answered from the journal
    redo = inst.run(job(ArtifactRef.model_validate_json((env.root / "store" / "yolo11n_coco_int8_640" / "2.0.0" /
                                                          "artifact.json").read_text())))
    assert redo.state == "succeeded" and env.server.requests == requests and inst.active_slot() == "slot-b"


def test_bad_signature_rejected_before_install(env: Env) -> None:
    inst = env.installer()
    ref = env.publish("2.0.0")
    generate_keypair(env.root / "evil", env.root / "evil.pub")
    forged = ref.model_copy(update={"signature": sign(load_private_key(env.root / "evil"), ref.statement())})
    result = inst.run(job(forged))
    assert result.state == "failed" and "signature" in result.error
    assert_working(inst, "1.0.0")
    assert not (inst.root / "slot-b").exists() and not list(inst.downloads.iterdir())
    # a genuine signature for another version does not carry over either
    other = env.publish("3.0.0")
    result = inst.run(job(ref.model_copy(update={"signature": other.signature}), job_id="j2"))
    assert result.state == "failed" and "signature" in result.error


def test_wrong_hash_rejected(env: Env) -> None:
    inst = env.installer()
    ref = env.publish("2.0.0")
    result = inst.run(job(ref.model_copy(update={"sha256": "0" * 64})))
    assert result.state == "failed" and "sha256 mismatch" in result.error
    assert_working(inst, "1.0.0")


def test_truncated_download_rejected(env: Env) -> None:
    inst = env.installer(download_attempts=2)
    ref = env.publish("2.0.0")
    tar = env.root / "store" / ref.model_id / ref.version / "artifact.tar"
    with open(tar, "r+b") as f:
        f.truncate(ref.size_bytes // 2)
    result = inst.run(job(ref))
    assert result.state == "failed" and "truncated" in result.error
    assert_working(inst, "1.0.0")


def test_download_resumes_with_range(env: Env) -> None:
    inst = env.installer()
    ref = env.publish("2.0.0")
    tar = env.root / "store" / ref.model_id / ref.version / "artifact.tar"
    half = ref.size_bytes // 2
    (inst.downloads / f"{ref.sha256}.part").write_bytes(tar.read_bytes()[:half])
    sent = env.server.bytes_sent
    assert inst.run(job(ref)).state == "succeeded"
    assert env.server.bytes_sent - sent == ref.size_bytes - half  # only the missing half came over the wire


def _signed_tar(env: Env, model_dir: Path, version: str) -> ArtifactRef:
    """Sign a tar the publisher would refuse (what a compromised or buggy build pipeline could ship)."""
    out = env.root / "store" / "yolo11n_coco_int8_640" / version
    out.mkdir(parents=True)
    tar = out / "artifact.tar"
    if (model_dir / "manifest.json").exists():
        pack(model_dir, tar)
    else:
        with tarfile.open(tar, "w") as t:
            t.add(model_dir, arcname=".")
    ref = ArtifactRef(model_id="yolo11n_coco_int8_640", version=version, sha256=sha256_file(tar),
                      size_bytes=tar.stat().st_size, signature="x")
    ref = ref.model_copy(update={"signature": sign(load_private_key(env.key), ref.statement())})
    return ref.model_copy(update={"url": env.server.url_for(ref)})


def test_corrupt_model_content_rejected(env: Env) -> None:
    inst = env.installer()
    d = make_model_dir(env.root / "models" / "4.0.0", "4.0.0")
    with open(d / "yolo11n.bin", "r+b") as f:  # weights changed after the manifest was written
        f.seek(1000)
        f.write(b"\xff" * 64)
    result = inst.run(job(_signed_tar(env, d, "4.0.0")))
    assert result.state == "failed" and "sha256 differs" in result.error
    assert_working(inst, "1.0.0")
    # a tar that tries to write outside the slot
    evil = env.root / "evil"
    evil.mkdir()
    (evil / "x").write_text("x")
    tar_dir = env.root / "store" / "yolo11n_coco_int8_640" / "5.0.0"
    tar_dir.mkdir(parents=True)
    with tarfile.open(tar_dir / "artifact.tar", "w") as t:
        t.add(evil / "x", arcname="../../escaped")
    ref = ArtifactRef(model_id="yolo11n_coco_int8_640", version="5.0.0", sha256=sha256_file(tar_dir / "artifact.tar"),
                      size_bytes=(tar_dir / "artifact.tar").stat().st_size, signature="x")
    ref = ref.model_copy(update={"signature": sign(load_private_key(env.key), ref.statement()),
                                 "url": env.server.url_for(ref)})
    result = inst.run(job(ref, job_id="j2"))
    assert result.state == "failed" and "rejected" in result.error
    assert not (inst.root.parent / "escaped").exists() and not (inst.root / "escaped").exists()
    assert_working(inst, "1.0.0")


def test_failed_health_check_rolls_back(env: Env) -> None:
    control = SimpleControl()
    inst = env.installer(control=control)
    result = inst.run(job(env.publish("3.0.0", corrupt_xml=True)))
    assert result.state == "rolled_back" and "health check failed" in result.error and "OpenVINO" in result.error
    assert inst.active_slot() == "slot-a" and result.model_version == "1.0.0"
    assert_working(inst, "1.0.0")
    assert control.loaded == []  # the broken model never reached the pipeline


def test_revert_to_previous_slot(env: Env) -> None:
    control = SimpleControl()
    inst = env.installer(control=control)
    assert inst.run(job(env.publish("2.0.0"))).state == "succeeded"
    bad = inst.run(OtaJob(job_id="r0", action="revert", revert_to=ModelRef(model_id="yolo11n_coco_int8_640",
                                                                             version="9.9.9")))
    assert bad.state == "failed" and "inactive slot holds" in bad.error
    ok = inst.run(OtaJob(job_id="r1", action="revert", revert_to=ModelRef(model_id="yolo11n_coco_int8_640",
                                                                            version="1.0.0"),
                         health=HealthCheckSpec(duration_s=0)))
    assert ok.state == "succeeded" and ok.model_version == "1.0.0" and inst.active_slot() == "slot-a"
    assert control.loaded[-1] == (inst.root / "slot-a").resolve()


KILLER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from appliance.ota import IrParseCheck, OtaInstaller
    from schemas.mqtt import OtaJob
    data, pub, job_json, kill_at = sys.argv[1:5]
    inst = OtaInstaller(Path(data), Path(pub).read_text(), IrParseCheck())
    def progress(p):
        if p.state == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    inst.run(OtaJob.model_validate_json(job_json), on_progress=progress)
    print("not killed")
""")


@pytest.mark.parametrize("kill_at", ["received", "downloading", "verifying", "installing", "switching",
                                     "health_check"])
def test_kill_9_at_each_step_leaves_a_working_model(env: Env, kill_at: str) -> None:
    inst = env.installer()
    the_job = job(env.publish("2.0.0"))
    pub = env.root / "k.pub"
    proc = subprocess.run([sys.executable, "-c", KILLER, str(env.root / "box"), str(pub), the_job.model_dump_json(),
                           kill_at], capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[2])
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    # "reboot": a fresh installer recovers before the appliance loads its model
    after = OtaInstaller(env.root / "box", env.pub_pem, IrParseCheck())
    recovered = after.recover()
    assert_working(after, "1.0.0")
    if kill_at in ("switching", "health_check"):  # the switch was never confirmed: rolled back, not retried
        assert recovered is not None and recovered.state == "rolled_back" and kill_at in recovered.error
        assert after.run(the_job).state == "rolled_back"
        assert_working(after, "1.0.0")
    else:  # nothing was switched: the job is delivered again (retained) and completes
        assert recovered is None
        result = after.run(the_job)
        assert result.state == "succeeded", result.error
        assert_working(after, "2.0.0")
    assert not list(after.root.glob("*.tmp"))
    del inst


def _retail_0013_dir(dst: Path) -> Path:
    """A real OpenVINO person detector that is not a YOLO head: loads fine, fails the detector check."""
    src = model_path("intel", "person-detection-retail-0013", "FP32")
    dst.mkdir(parents=True)
    files = []
    for p in sorted(src.iterdir()):
        shutil.copyfile(p, dst / p.name)
        files.append(ArtifactFile(path=p.name, sha256=sha256_file(p), size_bytes=p.stat().st_size))
    manifest = ModelManifest(model_id="yolo11n_coco_int8_640", version="6.0.0", task="detect",
                             entrypoint="person-detection-retail-0013.xml",
                             input=InputSpec(name="data", shape=[1, 3, 320, 544], color="BGR"), files=files)
    (dst / "manifest.json").write_text(manifest.model_dump_json())
    return dst


def test_full_detector_health_check(env: Env) -> None:
    """The check the appliance runs: real OpenVINO detector, real probe image, FPS floor."""
    control = SimpleControl()
    checker = DetectorHealthCheck(PROBE, {"threads": 1})
    inst = env.installer(checker=checker, control=control)
    good = inst.run(OtaJob(job_id="g", artifact=env.publish("2.0.0"),
                           health=HealthCheckSpec(duration_s=1.0, min_fps=1.0, min_people=3)))
    assert good.state == "succeeded", good.error
    # same model, an impossible FPS floor: rolled back
    slow = inst.run(OtaJob(job_id="s", artifact=env.publish("2.1.0"),
                           health=HealthCheckSpec(duration_s=0.5, min_fps=10_000, min_people=1)))
    assert slow.state == "rolled_back" and "below the floor" in slow.error
    # a detector of another family: OpenVINO loads it, our detector refuses its output
    ref = publish(_retail_0013_dir(env.root / "models" / "retail"), env.root / "store", env.key)
    wrong = inst.run(OtaJob(job_id="w", artifact=ref.model_copy(update={"url": env.server.url_for(ref)}),
                            health=HealthCheckSpec(duration_s=0.5)))
    assert wrong.state == "rolled_back" and "detector cannot load" in wrong.error, wrong.error
    assert_working(inst, "2.0.0")
    assert json.loads((inst.root / "journal.json").read_text())["history"]["w"]["state"] == "rolled_back"
    assert os.path.realpath(inst.current_dir()).endswith(inst.active_slot() or "?")
