"""Boots the built appliance image under qemu (TCG, no KVM) and checks it from the host (`just image-test`).

What it proves, the way an installer would see it:
  1. a copy of the image gets a device bundle on its REIDFLEET partition (mcopy, as a laptop would);
  2. it boots with UEFI (OVMF) + systemd-boot, mounts the data partition, installs the bundle;
  3. the status page (guest :80) and the appliance health endpoint (guest :9108) answer on host loopback
     ports (qemu hostfwd);
  4. the appliance plays the bundled test clip into a real Kafka-protocol broker (tansu) on the host's
     loopback: EdgeFrame messages keyed by the device id arrive and decode;
  5. the box powers off cleanly through the qemu monitor (so writes to /var are not lost).

Network: `-netdev user,restrict=on`: the guest reaches nothing but the forwards. The broker advertises
127.0.0.1:PORT, so inside the guest a forwarder (reidfleet.tcp_forward= on the kernel command line, set
only on this test copy) relays 127.0.0.1:PORT to qemu's guestfwd address 10.0.2.100:PORT, and qemu runs
stdio_relay.py per connection to reach 127.0.0.1:PORT on the host. No traffic leaves the loopback.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
GUESTFWD_IP = "10.0.2.100"
DEVICE_ID = "boot-test-1"
TEST_CLIP = "/usr/share/reidfleet/testclip.mp4"


def log(msg: str) -> None:
    print(f"[image-test +{time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


T0 = time.monotonic()


def partitions(image: Path) -> dict[str, tuple[int, int]]:
    """GPT partition name -> (byte offset, byte size), read with sfdisk from the plain image file."""
    out = subprocess.run(["sfdisk", "--json", str(image)], capture_output=True, text=True, check=True).stdout
    table = json.loads(out)["partitiontable"]
    sector = table.get("sectorsize", 512)
    return {p.get("name", ""): (p["start"] * sector, p["size"] * sector) for p in table["partitions"]}


def mtools(args: list[str], image: Path, offset: int, stdin: bytes | None = None) -> bytes:
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    args = [a.replace("IMG", f"{image}@@{offset}") for a in args]
    return subprocess.run(args, input=stdin, capture_output=True, check=True, env=env).stdout


def make_bundle(kafka_port: int, keydir: Path, camera_url: str = TEST_CLIP) -> bytes:
    from common.signing import generate_keypair, public_pem
    from schemas.bundle import DeviceBundle

    pub = generate_keypair(keydir / "fleet.key", keydir / "fleet.pub")
    bundle = DeviceBundle(
        device_id=DEVICE_ID,
        created_at=time.time(),
        mqtt={"host": "127.0.0.1", "port": 1883, "tls": False, "username": DEVICE_ID,
              "password": "boot-test-password-0123456789"},
        kafka={"bootstrap": f"127.0.0.1:{kafka_port}"},
        fleet_public_key_pem=public_pem(pub),
        camera_url=camera_url,
    )
    return bundle.model_dump_json(indent=2).encode()


def prepare_disk(src: Path, dst: Path, bundle: bytes | None, cmdline_extra: str, grow_bytes: int = 1 << 30) -> None:
    """Sparse copy of the image with the bundle on REIDFLEET and extra kernel arguments in the loader entries."""
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)
    # A real disk is bigger than the image: the first boot must grow the data partition into the rest.
    with open(dst, "r+b") as f:
        f.truncate(dst.stat().st_size + grow_bytes)
    parts = partitions(dst)
    if bundle is not None:
        off = parts["REIDFLEET"][0]
        with tempfile.NamedTemporaryFile() as f:
            f.write(bundle)
            f.flush()
            mtools(["mcopy", "-o", "-i", "IMG", f.name, "::/bundle.json"], dst, off)
    if cmdline_extra:
        off = parts["ESP"][0]
        names = mtools(["mdir", "-b", "-i", "IMG", "::/loader/entries"], dst, off).decode().split()
        for name in names:
            entry = name.rsplit("/", 1)[-1]
            text = mtools(["mtype", "-i", "IMG", f"::/loader/entries/{entry}"], dst, off).decode()
            text = "\n".join(line + f" {cmdline_extra}" if line.startswith("options") else line
                             for line in text.splitlines()) + "\n"
            with tempfile.NamedTemporaryFile() as f:
                f.write(text.encode())
                f.flush()
                mtools(["mcopy", "-o", "-i", "IMG", f.name, f"::/loader/entries/{entry}"], dst, off)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Qemu:
    def __init__(self, disk: Path, workdir: Path, forwards: dict[int, int], kafka_port: int | None,
                 memory_mib: int = 2048) -> None:
        self.workdir = workdir
        self.serial = workdir / "serial.log"
        self.monitor = workdir / "monitor.sock"
        vars_copy = workdir / "OVMF_VARS.fd"
        shutil.copy(OVMF_VARS, vars_copy)
        net = ["user", "id=n0", "restrict=on"]
        net += [f"hostfwd=tcp:127.0.0.1:{h}-:{g}" for h, g in forwards.items()]
        if kafka_port:
            relay = f"{sys.executable} {HERE / 'stdio_relay.py'} 127.0.0.1 {kafka_port}"
            net.append(f"guestfwd=tcp:{GUESTFWD_IP}:{kafka_port}-cmd:{relay}")
        self.cmd = [
            "qemu-system-x86_64", "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2", "-M", "q35",
            "-m", str(memory_mib), "-nodefaults", "-display", "none", "-vga", "none",
            "-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
            "-drive", f"if=pflash,format=raw,file={vars_copy}",
            "-drive", f"file={disk},format=raw,if=virtio,cache=unsafe",
            "-netdev", ",".join(net), "-device", "virtio-net-pci,netdev=n0",
            "-serial", f"file:{self.serial}",
            "-monitor", f"unix:{self.monitor},server,nowait",
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Qemu:
        self.proc = subprocess.Popen(self.cmd, stdout=open(self.workdir / "qemu.log", "wb"),  # noqa: SIM115
                                     stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def serial_text(self) -> str:
        try:
            return self.serial.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def powerdown(self, timeout_s: float = 150.0) -> bool:
        """ACPI power button via the monitor, then wait: a kill would lose the last writes to /var."""
        if not self.alive():
            return True
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(self.monitor))
                s.sendall(b"system_powerdown\n")
                time.sleep(0.5)
        except OSError:
            pass
        assert self.proc is not None
        try:
            self.proc.wait(timeout_s)
            return True
        except subprocess.TimeoutExpired:
            self.kill()
            return False

    def kill(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)


def http_json(url: str, timeout_s: float = 3.0) -> tuple[int, dict[str, Any]] | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"{}")
        except ValueError:
            return exc.code, {}
    except (OSError, ValueError):
        return None


def wait_for(what: str, fn: Any, timeout_s: float, qemu: Qemu, every_s: float = 2.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not qemu.alive():
            raise RuntimeError(f"qemu exited while waiting for {what}; serial log tail:\n{qemu.serial_text()[-3000:]}")
        value = fn()
        if value:
            return value
        time.sleep(every_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}; serial tail:\n"
                       f"{qemu.serial_text()[-3000:]}")


def consume_frames(bootstrap: str, want: int, timeout_s: float) -> list[dict[str, Any]]:
    from confluent_kafka import Consumer

    from common.kafka import consumer_config
    from schemas.codec import AvroCodec
    from schemas.topics import REID_INPUT

    codec = AvroCodec("edge_frame")
    consumer = Consumer(consumer_config(bootstrap, f"image-test-{os.getpid()}", "image-test"))
    consumer.subscribe([REID_INPUT])
    frames: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(frames) < want and time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is None or msg.error():
                continue
            if msg.key() != DEVICE_ID.encode():
                continue
            frames.append(codec.decode(msg.value()))
    finally:
        consumer.close()
    return frames


def run(image: Path, *, workdir: Path, boot_timeout_s: float, frames_timeout_s: float, want_frames: int,
        with_bundle: bool = True) -> dict[str, Any]:
    from common.kafka import ensure_topics
    from common.tansu import EmbeddedKafka

    status_port, health_port = free_port(), free_port()
    result: dict[str, Any] = {"image": str(image), "with_bundle": with_bundle}
    broker = EmbeddedKafka(log_file=workdir / "tansu.log").start()
    qemu: Qemu | None = None
    try:
        ensure_topics(broker.bootstrap)
        bundle = make_bundle(broker.port, workdir) if with_bundle else None
        disk = workdir / "disk.img"
        log(f"copying {image.name} and writing the bundle to its REIDFLEET partition")
        # show_status: unit start/stop lines on the serial log of this test copy (the release image is quiet)
        prepare_disk(image, disk, bundle, f"reidfleet.tcp_forward={broker.port}:{GUESTFWD_IP}:{broker.port} "
                     "systemd.show_status=1")
        qemu = Qemu(disk, workdir, {status_port: 80, health_port: 9108}, broker.port)
        t_start = time.monotonic()
        qemu.start()
        log(f"qemu started (status page on 127.0.0.1:{status_port}, appliance health on 127.0.0.1:{health_port})")

        status = wait_for("the status page", lambda: http_json(f"http://127.0.0.1:{status_port}/status.json"),
                          boot_timeout_s, qemu)
        result["status_page_s"] = round(time.monotonic() - t_start, 1)
        log(f"status page answers after {result['status_page_s']}s: state={status[1].get('state')}")
        if not with_bundle:
            got = wait_for("state waiting_for_bundle", lambda: (
                (s := http_json(f"http://127.0.0.1:{status_port}/status.json")) and
                s[1].get("state") == "waiting_for_bundle" and s), 60, qemu)
            result["state"] = got[1]["state"]
            result["message"] = got[1].get("message")
            return result

        def healthy() -> Any:
            got = http_json(f"http://127.0.0.1:{health_port}/healthz")
            return got if got and got[0] == 200 else None

        health = wait_for("the appliance health endpoint to answer 200", healthy, boot_timeout_s, qemu)
        result["boot_to_ready_s"] = round(time.monotonic() - t_start, 1)
        result["health"] = health[1]
        log(f"appliance healthy after {result['boot_to_ready_s']}s")
        frames = consume_frames(broker.bootstrap, want_frames, frames_timeout_s)
        result["frames_received"] = len(frames)
        result["first_frame_s"] = round(time.monotonic() - t_start, 1)
        if frames:
            f0 = frames[0]
            result["frame_wh"] = [f0["frame_width"], f0["frame_height"]]
            result["device_id"] = f0["device_id"]
            result["detections_total"] = sum(len(f["detections"]) for f in frames)
        log(f"{len(frames)} EdgeFrame messages from {DEVICE_ID} on the host broker")
        status = http_json(f"http://127.0.0.1:{status_port}/status.json")
        result["status"] = status[1] if status else None
        result["serial_has_status"] = "REIDFLEET-STATUS" in qemu.serial_text()
        return result
    finally:
        if qemu is not None:
            t = time.monotonic()
            result["clean_poweroff"] = qemu.powerdown()
            result["poweroff_s"] = round(time.monotonic() - t, 1)
            shutil.copy(qemu.serial, workdir / "serial-final.log") if qemu.serial.exists() else None
        broker.stop()


def stage_slot_b(disk: Path, update_dir: Path, tries: int = 3) -> str:
    """Do on the host copy what the on-device A/B updater does (reidfleet_boot.install_os_update): root.img
    into reidfleet-root-b, kernel + initrd into ESP/reidfleet/b, a newer loader entry with a boot counter."""
    sys.path.insert(0, str(HERE / "overlay" / "usr" / "lib" / "reidfleet"))
    import reidfleet_boot as rb

    manifest = json.loads((update_dir / "manifest.json").read_text())
    build_id = str(int(manifest["build_id"]) + 1)
    parts = partitions(disk)
    off_b, size_b = parts["reidfleet-root-b"]
    root = update_dir / "root.img"
    if root.stat().st_size > size_b:
        raise ValueError("root.img does not fit slot b")
    with open(disk, "r+b") as dst, open(root, "rb") as src:
        dst.seek(off_b)
        shutil.copyfileobj(src, dst, 4 << 20)
    esp = parts["ESP"][0]
    for name in ("vmlinuz", "initrd.img"):
        mtools(["mcopy", "-o", "-i", "IMG", str(update_dir / name), f"::/reidfleet/b/{name}"], disk, esp)
    name, text = rb.render_loader_entry("b", f"{manifest['version']}-ab", build_id, tries)
    with tempfile.NamedTemporaryFile() as f:
        f.write(text.encode())
        f.flush()
        mtools(["mcopy", "-o", "-i", "IMG", f.name, f"::/loader/entries/{name}"], disk, esp)
    return name


def loader_entries(disk: Path) -> list[str]:
    esp = partitions(disk)["ESP"][0]
    out = mtools(["mdir", "-b", "-i", "IMG", "::/loader/entries"], disk, esp).decode().split()
    return sorted(n.rsplit("/", 1)[-1] for n in out)


def run_ab(image: Path, *, workdir: Path, boot_timeout_s: float) -> dict[str, Any]:
    """Slot B written as an update with a +3 boot counter: it must boot first and be blessed (counter gone)."""
    update_dir = image.parent / "update"
    disk = workdir / "disk.img"
    prepare_disk(image, disk, None, "systemd.show_status=1")
    staged = stage_slot_b(disk, update_dir)
    result: dict[str, Any] = {"staged_entry": staged, "entries_before": loader_entries(disk)}
    status_port = free_port()
    qemu = Qemu(disk, workdir, {status_port: 80}, None)
    t0 = time.monotonic()
    qemu.start()
    try:
        got = wait_for("the status page on slot b", lambda: http_json(f"http://127.0.0.1:{status_port}/status.json"),
                       boot_timeout_s, qemu)
        result["slot"] = got[1].get("slot")
        result["status_page_s"] = round(time.monotonic() - t0, 1)
        log(f"booted slot {result['slot']} after {result['status_page_s']}s; waiting for boot-complete + bless")
        time.sleep(60)  # reidfleet-boot-check, boot-complete.target, systemd-bless-boot
    finally:
        result["clean_poweroff"] = qemu.powerdown()
    result["entries_after"] = loader_entries(disk)
    disk.unlink(missing_ok=True)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", type=Path, default=HERE / "out" / "reidfleet-appliance.img")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the disk copy and logs here")
    ap.add_argument("--boot-timeout-s", type=float, default=600)
    ap.add_argument("--frames-timeout-s", type=float, default=600)
    ap.add_argument("--frames", type=int, default=2)
    ap.add_argument("--results", type=Path, default=REPO / "results" / "image.json")
    ap.add_argument("--no-bundle", action="store_true", help="boot without a bundle: expect waiting_for_bundle")
    ap.add_argument("--ab", action="store_true", help="A/B: stage out/update as slot b, boot it, check it is blessed")
    args = ap.parse_args()
    if not args.image.exists():
        print(f"error: no image at {args.image}; run `just image` first", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="reidfleet-image-test-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.ab:
        res = run_ab(args.image.resolve(), workdir=workdir, boot_timeout_s=args.boot_timeout_s)
        from report import merge

        merge(args.results, "boot_ab", res)
        print(json.dumps(res, indent=2))
        ok = res["slot"] == "b" and any(e.endswith("-b.conf") for e in res["entries_after"])
        print(f"RESULT image_ab ok={ok} slot={res['slot']} status_page_s={res['status_page_s']} "
              f"entries_after={','.join(res['entries_after'])}")
        return 0 if ok else 1
    try:
        res = run(args.image.resolve(), workdir=workdir, boot_timeout_s=args.boot_timeout_s,
                  frames_timeout_s=args.frames_timeout_s, want_frames=args.frames, with_bundle=not args.no_bundle)
    except Exception as exc:
        print(f"FAILED: {exc}\n(logs in {workdir})", file=sys.stderr)
        return 1
    finally:
        if args.workdir is None:  # a named work folder keeps the disk for a look at /var (journal) afterwards
            (workdir / "disk.img").unlink(missing_ok=True)
    from report import chart, merge

    ok = args.no_bundle or res.get("frames_received", 0) >= args.frames
    doc = merge(args.results, "boot_no_bundle" if args.no_bundle else "boot", res)
    chart(doc, args.results.with_suffix(".png"))
    print(json.dumps(res, indent=2, default=str))
    keys = ["status_page_s", "boot_to_ready_s", "first_frame_s", "frames_received", "clean_poweroff"]
    print(f"RESULT image_boot ok={ok} " + " ".join(f"{k}={res.get(k)}" for k in keys if k in res))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
