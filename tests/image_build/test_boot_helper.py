"""The image's boot helper (image-build/overlay/usr/lib/reidfleet/reidfleet_boot.py) on real files.

Provisioning runs against a real folder standing in for the mounted REIDFLEET partition and a real
state folder standing in for /var/lib/reidfleet; the generated appliance config is validated by the
appliance's own config model, so a drift between the two fails here and not on a box in a shop.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from appliance.config import ApplianceConfig
from common.configfile import load_config
from common.signing import generate_keypair, public_pem
from schemas.bundle import DeviceBundle

HELPER_DIR = Path(__file__).resolve().parents[2] / "image-build" / "overlay" / "usr" / "lib" / "reidfleet"
sys.path.insert(0, str(HELPER_DIR))
import reidfleet_boot as rb  # noqa: E402


@pytest.fixture
def paths(tmp_path: Path) -> rb.Paths:
    factory = tmp_path / "factory"
    return rb.Paths(state=tmp_path / "state", run=tmp_path / "run", factory_models=factory,
                    release=tmp_path / "release", media_mount=tmp_path / "mnt")


@pytest.fixture
def media(tmp_path: Path) -> Path:
    m = tmp_path / "media"
    m.mkdir()
    return m


@pytest.fixture(scope="module")
def public_key_pem(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.mktemp("keys")
    return public_pem(generate_keypair(d / "k", d / "k.pub"))


def bundle_dict(public_key_pem: str, **over: object) -> dict:
    data = {
        "device_id": "shop-7-door",
        "created_at": time.time(),
        "mqtt": {"host": "fleet.example", "port": 8883, "username": "shop-7-door",
                 "password": "s3cret-password-123456", "ca_cert_pem": ""},
        "kafka": {"bootstrap": "kafka1:9092,kafka2:9092"},
        "fleet_public_key_pem": public_key_pem,
        "camera_url": "rtsp://cam:pw@192.168.1.20/stream1",
    }
    data.update(over)
    return data


def test_valid_bundle_is_installed_removed_from_media_and_config_validates(paths, media, public_key_pem):
    (media / "bundle.json").write_text(json.dumps(bundle_dict(public_key_pem)))
    st = rb.provision_from_media(media, paths)
    assert st.state == "provisioned", st
    assert st.device_id == "shop-7-door"
    assert "pw" not in st.camera_url and st.camera_url == "rtsp://cam:***@192.168.1.20/stream1"
    # the secret left the FAT partition; a status note took its place
    assert not (media / "bundle.json").exists()
    assert "PROVISIONED" in (media / "STATUS.TXT").read_text()
    # installed copy is private and is the same bundle
    mode = stat.S_IMODE(paths.bundle.stat().st_mode)
    assert mode == 0o600
    assert DeviceBundle.model_validate_json(paths.bundle.read_text()).mqtt.password == "s3cret-password-123456"
    # the appliance accepts the generated config as it is
    cfg = load_config(ApplianceConfig, paths.appliance_config)
    assert cfg.device_id == "shop-7-door"
    assert cfg.kafka.bootstrap == "kafka1:9092,kafka2:9092"
    assert cfg.source.url == "rtsp://cam:pw@192.168.1.20/stream1"
    assert cfg.source.loop is False
    assert cfg.http.port == rb.APPLIANCE_HTTP_PORT and cfg.http.host == "0.0.0.0"
    assert cfg.detector.model_dir == paths.state / "models" / "current"
    assert cfg.spool.dir == paths.state / "spool"
    # a reboot without media keeps the installed device
    again = rb.provision_from_media(None, paths)
    assert again.state == "provisioned" and again.device_id == "shop-7-door"


def test_local_file_camera_loops_in_real_time(paths, media, public_key_pem):
    (media / "bundle.json").write_text(json.dumps(bundle_dict(public_key_pem, camera_url="")))
    (media / "camera.txt").write_text("# the test clip\n/usr/share/reidfleet/testclip.mp4\n")
    st = rb.provision_from_media(media, paths)
    assert st.state == "provisioned", st.problems
    cfg = load_config(ApplianceConfig, paths.appliance_config)
    assert cfg.source.url == "/usr/share/reidfleet/testclip.mp4"
    assert cfg.source.loop and cfg.source.realtime
    assert not (media / "camera.txt").exists()


@pytest.mark.parametrize(
    ("content", "expect"),
    [
        (b"{not json", "not valid JSON: Expecting property name"),
        (b"\xff\xfe\x00garbage", "not UTF-8"),
        (b"[1, 2]", "must hold a JSON object, found list"),
        (b"x" * (rb.MAX_BUNDLE_BYTES + 1), "a device bundle is a few KB"),
    ],
)
def test_unreadable_bundle_is_reported_and_kept(paths, media, content, expect):
    (media / "bundle.json").write_bytes(content)
    st = rb.provision_from_media(media, paths)
    assert st.state == "bundle_invalid"
    assert any(expect in p for p in st.problems), st.problems
    assert (media / "bundle.json").read_bytes() == content  # nothing lost
    assert expect.split(":")[0] in (media / "STATUS.TXT").read_text()
    assert not paths.appliance_config.exists()


def test_schema_errors_name_the_key(paths, media, public_key_pem):
    bad = bundle_dict(public_key_pem, device_id="Bad/ID")
    bad["kafka"]["security_protocol"] = "TLS"
    bad["extra_key"] = 1
    (media / "bundle.json").write_text(json.dumps(bad))
    st = rb.provision_from_media(media, paths)
    assert st.state == "bundle_invalid"
    text = "\n".join(st.problems)
    assert "device_id" in text and "kafka.security_protocol" in text and "extra_key" in text


def test_missing_camera_says_how_to_fix(paths, media, public_key_pem):
    (media / "bundle.json").write_text(json.dumps(bundle_dict(public_key_pem, camera_url="")))
    st = rb.provision_from_media(media, paths)
    assert st.state == "bundle_invalid"
    assert "camera.txt" in st.problems[0]


def test_bad_new_bundle_keeps_the_installed_one(paths, media, public_key_pem):
    (media / "bundle.json").write_text(json.dumps(bundle_dict(public_key_pem)))
    assert rb.provision_from_media(media, paths).state == "provisioned"
    before = paths.appliance_config.read_bytes()
    (media / "bundle.json").write_text('{"device_id": 5}')
    st = rb.provision_from_media(media, paths)
    assert st.state == "bundle_rejected" and st.device_id == "shop-7-door" and st.problems
    assert paths.appliance_config.read_bytes() == before


def test_renamed_download_is_found_but_two_candidates_are_not_guessed(paths, media, public_key_pem):
    (media / "bundle (1).json").write_text(json.dumps(bundle_dict(public_key_pem)))
    assert rb.provision_from_media(media, paths).state == "provisioned"
    (media / "a.json").write_text("{}")
    (media / "b.json").write_text("{}")
    st = rb.provision_from_media(media, rb.Paths(state=paths.state.parent / "other", run=paths.run))
    assert st.state == "bundle_invalid" and "several .json files" in st.problems[0]


def test_nothing_anywhere_waits_for_the_installer(paths, media):
    st = rb.provision_from_media(media, paths)
    assert st.state == "waiting_for_bundle"
    assert "bundle.json" in st.problems[0]
    assert rb.provision_from_media(None, paths).state == "waiting_for_bundle"


def test_factory_model_seeds_slot_a(paths, media, public_key_pem, assets):
    src = assets / "models" / "yolo11n_int8_openvino_model"
    dst = paths.factory_models / "yolo11n_coco_int8_640"
    dst.mkdir(parents=True)
    for f in src.iterdir():
        os.symlink(f, dst / f.name)  # the test reads the shared assets in place, never copies them
    (media / "bundle.json").write_text(json.dumps(bundle_dict(public_key_pem)))
    st = rb.provision_from_media(media, paths)
    assert any("seeded slot-a" in n for n in st.details["notes"]), st.details
    current = paths.state / "models" / "current"
    assert os.readlink(current) == "slot-a"
    assert (current / "yolo11n.xml").exists()


def test_status_file_banner_and_page(paths, media, public_key_pem):
    (media / "bundle.json").write_text("{")
    st = rb.provision_from_media(media, paths)
    data = rb.publish_status(st, paths)
    assert json.loads(paths.status.read_text())["state"] == "bundle_invalid"
    text = rb.banner(data)
    assert "BUNDLE INVALID" in text and "REIDFLEET-STATUS state=bundle_invalid" in text
    page = rb.render_page(data, {"answering": False})
    assert "ATTENTION" in page and "not valid JSON" in page


def test_status_server_reports_appliance_health(paths):
    st = rb.Status("provisioned", "ok", device_id="d1")
    rb.publish_status(st, paths)
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"ok": True, "fps": 9.5}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_a: object) -> None:
            return

    health = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=health.serve_forever, daemon=True).start()
    server = rb.make_status_server(paths, "127.0.0.1", 0, health.server_address[1])
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status.json", timeout=5) as r:
            got = json.loads(r.read())
        assert got["overall"] == "running" and got["appliance"]["fps"] == 9.5
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
            assert b"RUNNING" in r.read()
        health.shutdown()
        health.server_close()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status.json", timeout=5) as r:
            assert json.loads(r.read())["overall"] == "starting"
    finally:
        server.shutdown()
        server.server_close()


def test_sd_notify_reaches_a_real_socket(tmp_path, monkeypatch):
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert rb.sd_notify("READY=1")
        assert s.recv(100) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert rb.sd_notify("READY=1") is False


def test_forward_spec_parsing():
    assert rb.parse_forwards("quiet reidfleet.tcp_forward=9092:10.0.2.100:9093 ro") == [(9092, "10.0.2.100", 9093)]
    assert rb.parse_forwards("a=1 b") == []
    with pytest.raises(ValueError, match="LPORT:HOST:RPORT"):
        rb.parse_forwards("reidfleet.tcp_forward=9092:x")


# --- A/B OS update ------------------------------------------------------------------------------------------


@pytest.fixture
def signed_update(tmp_path: Path):
    from common.signing import load_private_key, sign

    upd = tmp_path / "update"
    upd.mkdir()
    (upd / "root.img").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (upd / "vmlinuz").write_bytes(b"kernel-" + os.urandom(1000))
    (upd / "initrd.img").write_bytes(b"initrd-" + os.urandom(1000))
    rb.write_os_manifest(upd, "v2", "20990101000000")
    pub = generate_keypair(tmp_path / "fleet.key", tmp_path / "fleet.pub")
    statement = rb.os_update_statement((upd / "manifest.json").read_bytes(), "20990101000000")
    (upd / "manifest.json.sig").write_text(sign(load_private_key(tmp_path / "fleet.key"), statement))
    return upd, public_pem(pub)


def _esp(tmp_path: Path) -> Path:
    esp = tmp_path / "esp"
    entries = esp / "loader" / "entries"
    entries.mkdir(parents=True)
    for slot, build in (("a", "20260101000000"), ("b", "20250101000000")):
        name, text = rb.render_loader_entry(slot, "v1", build)
        (entries / name).write_text(text)
    return esp


def test_os_update_writes_the_inactive_slot_and_boots_it_next_with_a_counter(tmp_path, signed_update):
    upd, pub = signed_update
    esp = _esp(tmp_path)
    dev = tmp_path / "root-b.part"
    dev.write_bytes(b"\0" * (8 * 1024 * 1024))
    slot = rb.install_os_update(upd, esp=esp, current_slot="a", public_key_pem=pub, slot_device=dev)
    assert slot == "b"
    data = dev.read_bytes()
    assert data.startswith((upd / "root.img").read_bytes()) and len(data) == 8 * 1024 * 1024
    assert (esp / "reidfleet" / "b" / "vmlinuz").read_bytes() == (upd / "vmlinuz").read_bytes()
    names = sorted(p.name for p in (esp / "loader" / "entries").iterdir())
    assert names == ["reidfleet-20260101000000-a.conf", "reidfleet-20990101000000-b+3.conf"]
    text = (esp / "loader" / "entries" / names[1]).read_text()
    assert "root=PARTLABEL=reidfleet-root-b" in text and "version    20990101000000" in text


@pytest.mark.parametrize("damage", ["signature", "file", "size", "slot"])
def test_os_update_refuses_bad_input_and_leaves_everything(tmp_path, signed_update, damage):
    upd, pub = signed_update
    esp = _esp(tmp_path)
    before = sorted(p.name for p in (esp / "loader" / "entries").iterdir())
    dev = tmp_path / "root-b.part"
    dev.write_bytes(b"\0" * (8 * 1024 * 1024))
    slot = "a"
    if damage == "signature":
        other = generate_keypair(tmp_path / "o.key", tmp_path / "o.pub")
        pub = public_pem(other)
    elif damage == "file":
        with open(upd / "vmlinuz", "ab") as f:
            f.write(b"x")
    elif damage == "size":
        dev.write_bytes(b"\0" * (1024 * 1024))
    else:
        slot = "c"
    with pytest.raises(ValueError, match=r"signature|sha256|does not fit|slot"):
        rb.install_os_update(upd, esp=esp, current_slot=slot, public_key_pem=pub, slot_device=dev)
    assert sorted(p.name for p in (esp / "loader" / "entries").iterdir()) == before
    assert dev.read_bytes().count(0) == dev.stat().st_size  # nothing written
