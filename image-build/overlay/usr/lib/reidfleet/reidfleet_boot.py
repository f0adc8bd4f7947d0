"""The appliance image's own glue: first-boot provisioning, the local status page, the watchdog
wrapper around the appliance, and a loopback forwarder for the boot test.

It lives in the image (``/usr/lib/reidfleet``) and runs with the appliance venv's Python, so it can
use ``schemas`` (the device bundle contract) and ``common``; it never imports the components.

Why a separate FAT partition labelled ``REIDFLEET`` for the bundle: every laptop (Windows, macOS,
Linux) mounts a FAT "basic data" partition when the flashed disk or a USB stick is plugged in, so an
installer can drop ``bundle.json`` (and ``camera.txt``) there without any tool. At boot the bundle is
validated, written to the data partition (0600) and removed from the FAT partition, because it holds
the device's broker password; a ``STATUS.TXT`` left in its place says what happened.
"""

from __future__ import annotations

import argparse
import contextlib
import html
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

log = logging.getLogger("reidfleet.boot")

BUNDLE_LABEL = "REIDFLEET"
BUNDLE_FILE = "bundle.json"
CAMERA_FILE = "camera.txt"
STATUS_FILE = "STATUS.TXT"
MAX_BUNDLE_BYTES = 1024 * 1024
APPLIANCE_HTTP_PORT = 9108
STATUS_HTTP_PORT = 80

# Machine-readable console line prefix: the boot test and a serial-console reader grep for it.
CONSOLE_TAG = "REIDFLEET-STATUS"


@dataclass(frozen=True)
class Paths:
    """Every location the image uses; tests point them at a temporary folder."""

    state: Path = Path("/var/lib/reidfleet")
    run: Path = Path("/run/reidfleet")
    factory_models: Path = Path("/usr/share/reidfleet/models")
    release: Path = Path("/etc/reidfleet-release")
    media_mount: Path = Path("/run/reidfleet/media")

    @property
    def bundle(self) -> Path:
        return self.state / BUNDLE_FILE

    @property
    def appliance_config(self) -> Path:
        return self.state / "appliance.yaml"

    @property
    def status(self) -> Path:
        return self.run / "status.json"

    @property
    def initrd_status(self) -> Path:
        return self.run / "initrd.status"


@dataclass
class Status:
    """What the status page and the console show. ``state`` is one word a person can look up in
    docs/installer.md; ``problems`` are complete sentences that say what to do."""

    state: str
    message: str
    problems: list[str] = field(default_factory=list)
    device_id: str = ""
    camera_url: str = ""
    kafka: str = ""
    mqtt: str = ""
    installed_at: float | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


# --- bundle ---------------------------------------------------------------------------------------------


class BundleError(ValueError):
    """A bundle that cannot be used; ``problems`` lists each reason with its key path."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


def parse_bundle(raw: bytes, camera_override: str = "") -> Any:
    """Validate bundle bytes against ``schemas.bundle.DeviceBundle``; returns the model.

    ``camera_override`` (from ``camera.txt``) fills or replaces ``camera_url`` so the installer can set
    the camera on site. Raises :class:`BundleError` with every problem, never a bare traceback.
    """
    from pydantic import ValidationError

    from common.configfile import format_validation_error
    from schemas.bundle import DeviceBundle

    if len(raw) > MAX_BUNDLE_BYTES:
        raise BundleError([f"{BUNDLE_FILE} is {len(raw)} bytes; a device bundle is a few KB (wrong file?)"])
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        problem = f"{BUNDLE_FILE} is not UTF-8 text ({exc.reason} at byte {exc.start}): wrong file?"
        raise BundleError([problem]) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BundleError([f"{BUNDLE_FILE} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"]) \
            from None
    if not isinstance(data, dict):
        raise BundleError([f"{BUNDLE_FILE} must hold a JSON object, found {type(data).__name__}"])
    if camera_override:
        data["camera_url"] = camera_override
    try:
        bundle = DeviceBundle.model_validate(data)
    except ValidationError as exc:
        raise BundleError([f"{BUNDLE_FILE}: {p}" for p in format_validation_error(exc)]) from None
    if not bundle.camera_url.strip():
        raise BundleError([
            f"{BUNDLE_FILE}: camera_url is empty. Put the camera address (e.g. rtsp://user:pass@192.168.1.20/stream1)"
            f" on the first line of {CAMERA_FILE} next to {BUNDLE_FILE}, or set it in `fleet device add`."
        ])
    return bundle


def read_camera_override(media: Path) -> str:
    path = media / CAMERA_FILE
    if not path.is_file():
        return ""
    for line in path.read_text(encoding="utf-8-sig", errors="replace").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            return line
    return ""


def find_bundle_file(media: Path) -> tuple[Path | None, list[str]]:
    """``bundle.json`` on the media, or the only other ``*.json`` there (browsers save a second download
    as ``bundle (1).json``). Returns (path or None, problems)."""
    exact = media / BUNDLE_FILE
    if exact.is_file():
        return exact, []
    others = sorted(p for p in media.glob("*.json") if p.is_file() and not p.name.startswith("."))
    if len(others) == 1:
        return others[0], []
    if len(others) > 1:
        names = ", ".join(p.name for p in others)
        return None, [f"several .json files on the {BUNDLE_LABEL} partition ({names}) and none named {BUNDLE_FILE}: "
                      f"keep only the bundle and name it {BUNDLE_FILE}"]
    return None, []


def write_atomic(path: Path, data: bytes, mode: int = 0o600, owner: tuple[int, int] | None = None) -> None:
    """tmp + fsync + rename + fsync(dir): a power cut leaves either the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
        if owner is not None:
            os.fchown(fd, *owner)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def appliance_config(bundle: Any, paths: Paths, spool_max_bytes: int) -> dict[str, Any]:
    """The ``appliance.config.ApplianceConfig`` document for this device (as plain data, written as YAML).

    Only keys the appliance config defines are set; everything else keeps the appliance's defaults.
    A local file camera (the bundled test clip, or a file on the data partition) loops in real time
    so it behaves like a live camera.
    """
    url = bundle.camera_url.strip()
    is_file = url.startswith("/") or url.startswith("file://")
    source: dict[str, Any] = {"url": url.removeprefix("file://")}
    if is_file:
        source.update(loop=True, realtime=True)
    producer: dict[str, Any] = {}
    if bundle.kafka.security_protocol != "PLAINTEXT":
        producer["security.protocol"] = bundle.kafka.security_protocol.lower()
    segment = 16 * 1024 * 1024
    return {
        "device_id": bundle.device_id,
        "camera_id": bundle.device_id,
        "source": source,
        "detector": {"model_dir": str(paths.state / "models" / "current")},
        "kafka": {"bootstrap": bundle.kafka.bootstrap, "producer": producer},
        "spool": {"dir": str(paths.state / "spool"), "max_bytes": max(spool_max_bytes, 2 * segment),
                  "segment_bytes": segment},
        # The status page and the fleet read health from the shop LAN; no secrets are served there.
        "http": {"host": "0.0.0.0", "port": APPLIANCE_HTTP_PORT},
    }


def spool_budget(state_dir: Path) -> int:
    """Half of the data partition for the offline spool: the rest stays for logs, models and updates."""
    try:
        st = os.statvfs(state_dir)
    except OSError:
        return 256 * 1024 * 1024
    return int(st.f_blocks * st.f_frsize * 0.5)


def seed_models(bundle: Any, paths: Paths) -> str:
    """Model slot A on the data partition from the model the image ships (OTA replaces it later)."""
    factory = sorted(p for p in paths.factory_models.iterdir() if p.is_dir()) if paths.factory_models.is_dir() else []
    if not factory:
        return "no factory model in the image"
    current = paths.state / "models" / "current"
    if current.exists():
        return f"model slots present ({os.readlink(current) if current.is_symlink() else current})"
    from appliance.ota import IrParseCheck, OtaInstaller

    info = OtaInstaller(paths.state, bundle.fleet_public_key_pem, IrParseCheck()).seed(factory[0])
    return f"seeded {info.slot} with {info.model_id} {info.version}"


def _reidfleet_ids() -> tuple[int, int] | None:
    try:
        import pwd

        pw = pwd.getpwnam("reidfleet")
        return pw.pw_uid, pw.pw_gid
    except (KeyError, ImportError):
        return None


def install_bundle(raw_bundle: bytes, bundle: Any, paths: Paths) -> list[str]:
    """Write bundle + appliance config into the data partition; returns notes for the status page."""
    import yaml

    owner = _reidfleet_ids() if os.geteuid() == 0 else None
    paths.state.mkdir(parents=True, exist_ok=True)
    if owner:
        os.chown(paths.state, *owner)
    notes = []
    # The installed copy keeps the camera override, so a reboot without the media stays the same device.
    write_atomic(paths.bundle, json.dumps(bundle.model_dump(mode="json"), indent=2).encode(), owner=owner)
    cfg = appliance_config(bundle, paths, spool_budget(paths.state))
    write_atomic(paths.appliance_config, yaml.safe_dump(cfg, sort_keys=False).encode(), owner=owner)
    try:
        notes.append(seed_models(bundle, paths))
    except Exception as exc:  # a broken factory model must not block provisioning: the status page says so
        notes.append(f"model slots not seeded: {exc}")
    if owner:
        for p in (paths.state / "models",):
            if p.exists():
                subprocess.run(["chown", "-R", f"{owner[0]}:{owner[1]}", str(p)], check=False)
    return notes


def installed_bundle(paths: Paths) -> Any | None:
    try:
        return parse_bundle(paths.bundle.read_bytes())
    except (OSError, BundleError):
        return None


def provision_from_media(media: Path | None, paths: Paths) -> Status:
    """Decide what the box runs with, given the (mounted) installer media or None.

    Order: a valid bundle on the media wins (re-provisioning); an invalid one is reported and leaves the
    installed bundle running; no media and no installed bundle means waiting for the installer.
    """
    previous = installed_bundle(paths)
    found: Path | None = None
    problems: list[str] = []
    if media is not None:
        found, problems = find_bundle_file(media)
    if found is not None:
        assert media is not None
        raw = found.read_bytes()
        try:
            bundle = parse_bundle(raw, read_camera_override(media))
        except BundleError as exc:
            problems = exc.problems
        else:
            notes = install_bundle(raw, bundle, paths)
            removed = _remove_secret(found)
            (media / CAMERA_FILE).unlink(missing_ok=True)
            if not removed:
                notes.append(f"could not delete {found.name} from the {BUNDLE_LABEL} partition: delete it by hand")
            st = _status_for(bundle, "provisioned", f"bundle for {bundle.device_id} installed from {found.name}")
            st.details["notes"] = notes
            _write_media_status(media, st)
            return st
    if problems:
        if previous is not None:
            st = _status_for(previous, "bundle_rejected",
                             "the new bundle was rejected; still running with the installed one")
            st.problems = problems
        else:
            st = Status("bundle_invalid", f"the bundle on the {BUNDLE_LABEL} partition cannot be used", problems)
        if media is not None:
            _write_media_status(media, st)
        return st
    if previous is not None:
        return _status_for(previous, "provisioned", "using the installed bundle")
    where = "no REIDFLEET partition or USB stick found" if media is None else f"no {BUNDLE_FILE} on it"
    return Status("waiting_for_bundle", f"waiting for the device bundle ({where})", [
        f"Copy {BUNDLE_FILE} from `fleet device add` onto the {BUNDLE_LABEL} partition of this disk (or a USB stick"
        f" named {BUNDLE_LABEL}) and restart the box."])


def _status_for(bundle: Any, state: str, message: str) -> Status:
    return Status(state, message, device_id=bundle.device_id, camera_url=_redact_url(bundle.camera_url),
                  kafka=bundle.kafka.bootstrap, mqtt=f"{bundle.mqtt.host}:{bundle.mqtt.port}",
                  installed_at=time.time())


def _redact_url(url: str) -> str:
    """Camera URLs often carry a password (rtsp://user:pass@host): never show it."""
    return re.sub(r"(//[^/:@]+):[^/@]*@", r"\1:***@", url)


def _remove_secret(path: Path) -> bool:
    try:
        size = path.stat().st_size
        with open(path, "r+b") as f:  # overwrite first: FAT keeps deleted clusters readable
            f.write(b"\0" * size)
            f.flush()
            os.fsync(f.fileno())
        path.unlink()
        return True
    except OSError as exc:
        log.warning("could not remove %s: %s", path, exc)
        return False


def _write_media_status(media: Path, st: Status) -> None:
    lines = [f"reidfleet appliance: {st.state.upper().replace('_', ' ')}", "", st.message, ""]
    lines += [f"- {p}" for p in st.problems]
    if st.device_id:
        lines.append(f"device: {st.device_id}")
    lines += ["", time.strftime("written %Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "The status page of the box is at http://<box address>/ (see docs/installer.md)."]
    try:
        (media / STATUS_FILE).write_text("\r\n".join(lines) + "\r\n")
    except OSError as exc:
        log.warning("could not write %s: %s", STATUS_FILE, exc)


# --- devices, console, status file ------------------------------------------------------------------------


def bundle_devices() -> list[str]:
    """Block devices with the REIDFLEET label: the partition on the boot disk and any USB stick."""
    out = subprocess.run(["blkid", "-t", f"LABEL={BUNDLE_LABEL}", "-o", "device"], capture_output=True, text=True,
                         check=False).stdout
    return [d for d in out.split() if d]


@contextlib.contextmanager
def mounted_media(device: str, where: Path):
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "vfat", "-o", "rw,nosuid,nodev,noexec,umask=0077,flush", device, str(where)],
                   check=True, capture_output=True, text=True)
    try:
        yield where
    finally:
        subprocess.run(["sync"], check=False)
        subprocess.run(["umount", str(where)], check=False)


def read_release(paths: Paths) -> dict[str, str]:
    out = {}
    with contextlib.suppress(OSError):
        for line in paths.release.read_text().splitlines():
            if "=" in line:
                k, v = line.split("=", 1)
                out[k.strip()] = v.strip()
    return out


def boot_slot() -> str:
    with contextlib.suppress(OSError):
        m = re.search(r"\breidfleet\.slot=(\w+)", Path("/proc/cmdline").read_text())
        if m:
            return m.group(1)
    return "?"


def addresses() -> list[str]:
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True,
                         check=False).stdout
    return re.findall(r"inet (\d+\.\d+\.\d+\.\d+)", out)


def console(text: str) -> None:
    """Serial console and the HDMI screen: the two places an installer can look without a network."""
    for dev in ("/dev/console", "/dev/tty1"):
        with contextlib.suppress(OSError), open(dev, "w") as f:
            f.write(text)


def banner(st: dict[str, Any]) -> str:
    ips = st.get("addresses") or []
    page = ", ".join(f"http://{ip}/" for ips_ in [ips] for ip in ips_) or "(no network address yet)"
    rows = [f" state:       {st['state'].upper().replace('_', ' ')}", f" {st['message']}"]
    rows += [f"   ! {p}" for p in st.get("problems", [])]
    if st.get("device_id"):
        rows.append(f" device:      {st['device_id']}")
    rows += [f" status page: {page}", f" image:       {st.get('version', '?')} (slot {st.get('slot', '?')})"]
    line = "=" * 72
    tag = f"{CONSOLE_TAG} state={st['state']} device={st.get('device_id') or '-'}"
    # Plain \n: the console's tty turns it into \r\n itself.
    return "\n" + line + "\n reidfleet appliance\n" + "\n".join(rows) + "\n" + line + "\n" + tag + "\n"


def publish_status(st: Status, paths: Paths) -> dict[str, Any]:
    data = st.as_dict()
    rel = read_release(paths)
    data.update(version=rel.get("REIDFLEET_VERSION", "?"), build_id=rel.get("REIDFLEET_BUILD_ID", "?"),
                slot=boot_slot(), addresses=addresses(), updated_at=time.time())
    with contextlib.suppress(OSError):
        data["data_partition"] = paths.initrd_status.read_text().strip()
    paths.run.mkdir(parents=True, exist_ok=True)
    write_atomic(paths.status, json.dumps(data, indent=2).encode(), mode=0o644)
    return data


def cmd_provision(args: argparse.Namespace) -> int:
    paths = Paths()
    devices: list[str] = []
    for _ in range(int(args.wait_s)):  # the partition shows up with udev; a USB stick can be slower
        devices = bundle_devices()
        if devices:
            break
        time.sleep(1)
    st: Status | None = None
    for dev in devices:
        try:
            with mounted_media(dev, paths.media_mount) as media:
                st = provision_from_media(media, paths)
        except subprocess.CalledProcessError as exc:
            st = Status("bundle_invalid", f"the {BUNDLE_LABEL} partition {dev} cannot be mounted",
                        [f"mount failed: {exc.stderr.strip()}. Reformat it as FAT32 named {BUNDLE_LABEL}."])
        if st.state == "provisioned" and "installed from" in st.message:
            break  # a freshly installed bundle wins over anything on other devices
    if st is None:
        st = provision_from_media(None, paths)
    data = publish_status(st, paths)
    console(banner(data))
    log.info("provisioning: %s: %s", st.state, st.message)
    if st.state == "provisioned" and args.start:
        subprocess.run(["systemctl", "--no-block", "start", "reidfleet-appliance.service"], check=False)
    return 0


# --- status page -----------------------------------------------------------------------------------------


def appliance_health(port: int = APPLIANCE_HTTP_PORT, timeout_s: float = 2.0) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return {"answering": True, "http_status": resp.status, **json.loads(resp.read() or b"{}")}
    except urllib.error.HTTPError as exc:  # 503 = running but not healthy: the body says why
        try:
            body = json.loads(exc.read() or b"{}")
        except ValueError:
            body = {}
        return {"answering": True, "http_status": exc.code, **body}
    except (OSError, ValueError) as exc:
        return {"answering": False, "error": str(exc)}


def overall(status: dict[str, Any], health: dict[str, Any]) -> str:
    """One word for the page title and the console: ok / starting / attention."""
    if status.get("state") != "provisioned":
        return "attention" if status.get("state") != "waiting_for_bundle" else "waiting"
    if health.get("answering") and health.get("ok"):
        return "running"
    return "starting" if not health.get("answering") else "degraded"


PAGE = """<!doctype html><html><head><meta charset="utf-8"><meta http-equiv="refresh" content="5">
<title>reidfleet: {word}</title><style>body{{font-family:sans-serif;margin:2em;max-width:50em}}
.s{{font-size:2em;padding:.3em .6em;border-radius:.3em;color:#fff;background:{colour}}}
td{{padding:.2em 1em .2em 0;vertical-align:top}} li{{color:#a00}}</style></head><body>
<h1>reidfleet appliance</h1><p><span class="s">{word}</span></p><p>{message}</p><ul>{problems}</ul>
<table>{rows}</table><p><a href="/status.json">status.json</a> · <a href="/healthz">healthz</a></p></body></html>"""
COLOURS = {"running": "#2a2", "starting": "#c90", "waiting": "#36c", "degraded": "#c60", "attention": "#c22"}


def render_page(status: dict[str, Any], health: dict[str, Any]) -> str:
    word = overall(status, health)
    e = html.escape
    rows = [("device", status.get("device_id") or "-"), ("camera", status.get("camera_url") or "-"),
            ("kafka", status.get("kafka") or "-"), ("mqtt", status.get("mqtt") or "-"),
            ("appliance", _health_line(health)), ("image", f"{status.get('version', '?')} slot "
                                                          f"{status.get('slot', '?')}"),
            ("data partition", status.get("data_partition", "-")),
            ("addresses", ", ".join(status.get("addresses") or []) or "-")]
    return PAGE.format(word=e(word.upper()), colour=COLOURS[word], message=e(status.get("message", "")),
                       problems="".join(f"<li>{e(p)}</li>" for p in status.get("problems", [])),
                       rows="".join(f"<tr><td>{e(k)}</td><td>{e(str(v))}</td></tr>" for k, v in rows))


def _health_line(health: dict[str, Any]) -> str:
    if not health.get("answering"):
        return "not answering yet"
    keys = [k for k in ("ok", "source", "kafka", "fps", "degraded", "error") if health.get(k) not in (None, [])]
    return ", ".join(f"{k}={health[k]}" for k in keys) or f"HTTP {health.get('http_status')}"


def make_status_server(paths: Paths, host: str, port: int, health_port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            try:
                status = json.loads(paths.status.read_text())
            except (OSError, ValueError):
                status = {"state": "booting", "message": "provisioning has not finished yet"}
            health = appliance_health(health_port)
            path = self.path.split("?", 1)[0]
            if path == "/status.json":
                body = json.dumps({**status, "overall": overall(status, health), "appliance": health},
                                  default=str).encode()
                self._send(200, "application/json", body)
            elif path == "/healthz":
                ok = overall(status, health) == "running"
                self._send(200 if ok else 503, "application/json", json.dumps({"ok": ok, **health}).encode())
            elif path == "/":
                self._send(200, "text/html; charset=utf-8", render_page(status, health).encode())
            else:
                self._send(404, "text/plain", b"not found\n")

        def _send(self, code: int, ctype: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: Any) -> None:
            return

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def cmd_status_server(args: argparse.Namespace) -> int:
    paths = Paths()
    server = make_status_server(paths, args.host, args.port, args.health_port)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    last = ""
    while not stop.wait(5.0):  # announce transitions (starting -> running -> degraded) on the console
        try:
            status = json.loads(paths.status.read_text())
        except (OSError, ValueError):
            continue
        word = overall(status, appliance_health(args.health_port))
        if word != last:
            console(f"\n{CONSOLE_TAG} appliance={word} device={status.get('device_id') or '-'}\n")
            last = word
    server.shutdown()
    return 0


# --- appliance wrapper: systemd notify + watchdog from the health endpoint ---------------------------------


def sd_notify(message: str) -> bool:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.sendto(message.encode(), addr)
        except OSError:
            return False
    return True


def _appliance_takes_bundle() -> bool:
    """Whether ``python -m appliance run`` accepts ``--bundle`` (the in-process fleet agent)."""
    out = subprocess.run([sys.executable, "-m", "appliance", "run", "--help"], capture_output=True, text=True,
                         check=False).stdout
    return "--bundle" in out


def cmd_run_appliance(args: argparse.Namespace) -> int:
    """Start ``python -m appliance run`` and speak sd_notify for it: READY=1 once its health endpoint answers,
    WATCHDOG=1 while it keeps answering. A hung appliance stops answering and systemd restarts it; a broker
    outage does not (the endpoint still answers, with ok=false, while the appliance spools)."""
    cmd = [sys.executable, "-m", "appliance", "run", "--config", args.config]
    if args.bundle and Path(args.bundle).is_file() and _appliance_takes_bundle():
        # The fleet agent (MQTT, OTA) runs in the appliance process; its model slots are the ones provisioning
        # seeded on the data partition (<data-dir>/models/current).
        cmd += ["--bundle", args.bundle, "--data-dir", str(Path(args.config).parent)]
    child = subprocess.Popen(cmd)

    def forward(signum: int, _frame: Any) -> None:
        child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    ready = False
    sd_notify("STATUS=starting the appliance")
    while child.poll() is None:
        health = appliance_health(args.health_port, timeout_s=3.0)
        if health.get("answering"):
            if not ready:
                sd_notify("READY=1")
                ready = True
            sd_notify(f"WATCHDOG=1\nSTATUS=health {'ok' if health.get('ok') else 'not ok'}")
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=args.interval_s)
    return child.returncode if child.returncode >= 0 else 128 - child.returncode


# --- whole-image A/B update --------------------------------------------------------------------------------

OS_ARTIFACT = "reidfleet-os-image"
OS_FILES = ("root.img", "vmlinuz", "initrd.img")
BOOT_TRIES = 3


def render_loader_entry(slot: str, version: str, build_id: str, tries: int | None = None) -> tuple[str, str]:
    """(file name, text) of the systemd-boot entry for one root slot.

    Entries sort by ``version`` (the build id) newest first, so the slot written last boots next. A
    ``+N`` in the file name is systemd-boot's boot counter: it drops by one per start, reidfleet-boot-check
    + systemd-bless-boot remove it once the system is up, and at ``+0`` the entry sorts last so the other
    slot boots again. ``panic=10`` makes a failing initrd reboot (and so count) instead of opening a shell.
    """
    if slot not in ("a", "b") or not re.fullmatch(r"[0-9A-Za-z._-]+", build_id):
        raise ValueError(f"bad slot {slot!r} or build id {build_id!r}")
    name = f"reidfleet-{build_id}-{slot}" + (f"+{tries}" if tries is not None else "") + ".conf"
    text = (f"title      reidfleet appliance {version} (slot {slot})\n"
            f"sort-key   reidfleet\n"
            f"version    {build_id}\n"
            f"linux      /reidfleet/{slot}/vmlinuz\n"
            f"initrd     /reidfleet/{slot}/initrd.img\n"
            f"options    root=PARTLABEL=reidfleet-root-{slot} ro rootfstype=erofs reidfleet.slot={slot} panic=10 "
            f"console=tty0 console=ttyS0,115200n8 quiet loglevel=3 systemd.show_status=error rd.udev.log_level=3\n")
    return name, text


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def os_update_statement(manifest_bytes: bytes, build_id: str) -> bytes:
    """What the fleet key signs: the manifest's hash bound to the image name and build id."""
    import hashlib

    from common.signing import artifact_statement

    return artifact_statement(OS_ARTIFACT, build_id, hashlib.sha256(manifest_bytes).hexdigest(), len(manifest_bytes))


def write_os_manifest(update_dir: Path, version: str, build_id: str) -> dict[str, Any]:
    manifest = {"artifact": OS_ARTIFACT, "version": version, "build_id": build_id,
                "files": {name: {"sha256": _sha256(update_dir / name), "size_bytes": (update_dir / name).stat().st_size}
                          for name in OS_FILES}}
    (update_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def install_os_update(update_dir: Path, *, esp: Path, current_slot: str, public_key_pem: str,
                      slot_device: Path | None = None, tries: int = BOOT_TRIES) -> str:
    """Write a signed OS update into the inactive slot and make it the next boot (with boot counting).

    Nothing that the running slot needs is touched: its root partition, kernel, initrd and entry stay, so a
    power cut at any step leaves a bootable box. Returns the slot written. Raises ValueError (with the
    reason) on a bad signature, hash, size or slot.
    """
    from common.signing import load_public_key, verify

    manifest_bytes = (update_dir / "manifest.json").read_bytes()
    manifest = json.loads(manifest_bytes)
    build_id, version = str(manifest["build_id"]), str(manifest["version"])
    signature = (update_dir / "manifest.json.sig").read_text().strip()
    verify(load_public_key(public_key_pem), os_update_statement(manifest_bytes, build_id), signature)
    for name in OS_FILES:
        want = manifest["files"][name]["sha256"]
        if _sha256(update_dir / name) != want:
            raise ValueError(f"{name}: sha256 does not match the signed manifest")
    if current_slot not in ("a", "b"):
        raise ValueError(f"unknown running slot {current_slot!r}")
    target = "b" if current_slot == "a" else "a"
    device = slot_device or Path(f"/dev/disk/by-partlabel/reidfleet-root-{target}")
    root = update_dir / "root.img"
    with open(device, "r+b") as dev:
        capacity = dev.seek(0, os.SEEK_END)
        if root.stat().st_size > capacity:
            raise ValueError(f"root.img ({root.stat().st_size} B) does not fit slot {target} ({capacity} B)")
        dev.seek(0)
        with open(root, "rb") as src:
            while chunk := src.read(4 << 20):
                dev.write(chunk)
        dev.flush()
        os.fsync(dev.fileno())
    import hashlib

    h = hashlib.sha256()
    with open(device, "rb") as dev:  # read back: a flash that lies about writes is caught before the switch
        left = root.stat().st_size
        while left > 0 and (chunk := dev.read(min(4 << 20, left))):
            h.update(chunk)
            left -= len(chunk)
    if h.hexdigest() != manifest["files"]["root.img"]["sha256"]:
        raise ValueError(f"slot {target} read back differs from root.img: the disk may be failing")
    slot_dir = esp / "reidfleet" / target
    slot_dir.mkdir(parents=True, exist_ok=True)
    for name in ("vmlinuz", "initrd.img"):
        tmp = slot_dir / f"{name}.new"
        tmp.write_bytes((update_dir / name).read_bytes())
        os.replace(tmp, slot_dir / name)
    (slot_dir / "VERSION").write_text(f"{version} {build_id}\n")
    entries = esp / "loader" / "entries"
    entries.mkdir(parents=True, exist_ok=True)
    for old in entries.glob(f"reidfleet-*-{target}*.conf"):
        old.unlink()
    name, text = render_loader_entry(target, version, build_id, tries)
    (entries / f".{name}.tmp").write_text(text)
    os.replace(entries / f".{name}.tmp", entries / name)
    os.sync()
    return target


def cmd_loader_entry(args: argparse.Namespace) -> int:
    name, text = render_loader_entry(args.slot, args.version, args.build_id, args.tries)
    print(name if args.name_only else text, end="\n" if args.name_only else "")
    return 0


def cmd_os_update(args: argparse.Namespace) -> int:
    bundle = installed_bundle(Paths())
    if bundle is None:
        print("error: no installed device bundle, so no fleet key to check the update with", file=sys.stderr)
        return 2
    try:
        slot = install_os_update(args.update_dir, esp=args.esp, current_slot=boot_slot(),
                                 public_key_pem=bundle.fleet_public_key_pem)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: update not installed: {exc}", file=sys.stderr)
        return 1
    print(f"slot {slot} written; it boots next ({BOOT_TRIES} tries, then back to the running slot)")
    if args.reboot:
        subprocess.run(["systemctl", "reboot"], check=False)
    return 0


# --- loopback forwarder (boot test) ------------------------------------------------------------------------


def parse_forwards(cmdline: str) -> list[tuple[int, str, int]]:
    """``reidfleet.tcp_forward=LPORT:HOST:RPORT[,...]`` from the kernel command line.

    Only the boot test sets it: there the Kafka broker runs on the build host's loopback and advertises
    127.0.0.1:PORT, which inside the VM must lead back out through qemu's guestfwd address.
    """
    out = []
    for m in re.finditer(r"\breidfleet\.tcp_forward=(\S+)", cmdline):
        for item in m.group(1).split(","):
            parts = item.split(":")
            if len(parts) != 3 or not parts[0].isdigit() or not parts[2].isdigit():
                raise ValueError(f"bad reidfleet.tcp_forward item {item!r}: expected LPORT:HOST:RPORT")
            out.append((int(parts[0]), parts[1], int(parts[2])))
    return out


def cmd_forward(_args: argparse.Namespace) -> int:
    import asyncio

    forwards = parse_forwards(Path("/proc/cmdline").read_text())
    if not forwards:
        return 0

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                writer.close()

    async def main() -> None:
        servers = []
        for lport, host, rport in forwards:
            async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter, host: str = host,
                             rport: int = rport) -> None:
                try:
                    ur, uw = await asyncio.open_connection(host, rport)
                except OSError:
                    w.close()
                    return
                await asyncio.gather(pipe(r, uw), pipe(ur, w))

            servers.append(await asyncio.start_server(handle, "127.0.0.1", lport))
            log.info("forwarding 127.0.0.1:%d -> %s:%d", lport, host, rport)
        await asyncio.gather(*(s.serve_forever() for s in servers))

    asyncio.run(main())
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    ap = argparse.ArgumentParser(prog="reidfleet-boot", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("provision", help="install the device bundle from the REIDFLEET partition or a USB stick")
    p.add_argument("--wait-s", type=float, default=5, help="how long to wait for the partition to appear")
    p.add_argument("--start", action="store_true", help="start the appliance service after a good bundle")
    p.set_defaults(fn=cmd_provision)
    p = sub.add_parser("status-server", help="serve the local status page")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=STATUS_HTTP_PORT)
    p.add_argument("--health-port", type=int, default=APPLIANCE_HTTP_PORT)
    p.set_defaults(fn=cmd_status_server)
    p = sub.add_parser("run-appliance", help="run the appliance with systemd notify + watchdog")
    p.add_argument("--config", required=True)
    p.add_argument("--bundle", default=str(Paths().bundle), help="device bundle for the fleet agent")
    p.add_argument("--health-port", type=int, default=APPLIANCE_HTTP_PORT)
    p.add_argument("--interval-s", type=float, default=5.0)
    p.set_defaults(fn=cmd_run_appliance)
    p = sub.add_parser("loader-entry", help="print a systemd-boot entry (used by the image build)")
    p.add_argument("slot")
    p.add_argument("version")
    p.add_argument("build_id")
    p.add_argument("--tries", type=int, default=None)
    p.add_argument("--name-only", action="store_true")
    p.set_defaults(fn=cmd_loader_entry)
    p = sub.add_parser("os-update", help="write a signed OS update into the inactive root slot (A/B)")
    p.add_argument("update_dir", type=Path)
    p.add_argument("--esp", type=Path, default=Path("/efi"))
    p.add_argument("--reboot", action="store_true")
    p.set_defaults(fn=cmd_os_update)
    p = sub.add_parser("forward", help="loopback TCP forwards from reidfleet.tcp_forward= (boot test only)")
    p.set_defaults(fn=cmd_forward)
    args = ap.parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
