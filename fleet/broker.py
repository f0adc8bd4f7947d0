"""The fleet's MQTT broker: mosquitto with a generated CA, TLS, per-device passwords and an ACL.

Why mosquitto and a generated config: it is one Debian package, small enough for the admin box,
and its ``pattern`` ACL (``%u`` = the logged-in username) confines every device to its own
subtree without a rule per device. Devices log in with username = device id, so adding a device
is one line in the password file and a SIGHUP, never an ACL edit.

The ACL is tighter than "readwrite the own subtree": a device may only *read* what the manager
writes (desired config, OTA jobs) and only *write* what it reports, so a compromised box can
neither forge its own desired state nor read anyone else's. Anonymous access is off; the only
listener is TLS, with a server certificate from the fleet CA (``ca.crt`` goes into each bundle).

Mosquitto 2.0 reads its certificate, password and ACL files after dropping root to the
``mosquitto`` user, so when we run as root the broker directory is chowned to that user.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from schemas.mqtt import MANAGER_USERNAME, check_device_id
from schemas.topics import MQTT_ROOT

log = logging.getLogger(__name__)

MOSQUITTO_USER = "mosquitto"
#: What each device may do in its own subtree (``%u`` = its username = its device id).
DEVICE_ACL = (
    ("write", "status"),
    ("write", "telemetry"),
    ("write", "config/reported"),
    ("write", "ota/progress"),
    ("read", "config/desired"),
    ("read", "ota/job"),
)


class BrokerError(RuntimeError):
    """The broker could not be configured or started; the message says why (with its log tail)."""


@dataclass(frozen=True)
class BrokerPaths:
    root: Path

    @property
    def ca_crt(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_crt(self) -> Path:
        return self.root / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    @property
    def passwd(self) -> Path:
        return self.root / "passwd"

    @property
    def acl(self) -> Path:
        return self.root / "acl"

    @property
    def conf(self) -> Path:
        return self.root / "mosquitto.conf"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "mosquitto.log"

    @property
    def manager_password(self) -> Path:
        return self.root / "manager.password"


# --- certificates ----------------------------------------------------------------------------------


def _write_private(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically with a 0600 file owned like its directory.

    The owner matters when root edits a live broker's files: mosquitto re-reads them as the
    ``mosquitto`` user on SIGHUP, and a root-owned 0600 password file would be unreadable there,
    which mosquitto 2.0 treats as "no users" and locks every device and the manager out until
    the next good reload. ``fleet device add`` signals the broker itself, so the file must be
    right at the moment it appears, not chowned afterwards.
    """
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        if os.geteuid() == 0:
            owner = path.parent.stat()
            os.fchown(f.fileno(), owner.st_uid, owner.st_gid)
    tmp.replace(path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def ensure_ca(paths: BrokerPaths, hostnames: tuple[str, ...] = ("localhost", "127.0.0.1")) -> None:
    """Create the fleet CA (10 years) and a server certificate (2 years) for ``hostnames`` if missing.

    The server certificate is re-issued when ``hostnames`` gain a name it does not cover.
    """
    paths.root.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    if not (paths.ca_crt.is_file() and paths.ca_key.is_file()):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "reidfleet fleet CA")])
        cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA256())
        )
        _write_private(paths.ca_key, _key_pem(key))
        paths.ca_crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths.server_crt.unlink(missing_ok=True)
    if paths.server_crt.is_file() and paths.server_key.is_file():
        existing = x509.load_pem_x509_certificate(paths.server_crt.read_bytes())
        san = existing.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        covered = {str(v) for v in san.get_values_for_type(x509.DNSName)}
        covered |= {str(v) for v in san.get_values_for_type(x509.IPAddress)}
        if set(hostnames) <= covered and existing.not_valid_after_utc > now + dt.timedelta(days=30):
            return
    ca_key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(paths.ca_crt.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = []
    for h in hostnames:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            alt.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=730))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    _write_private(paths.server_key, _key_pem(key))
    paths.server_crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


# --- passwords and ACL -----------------------------------------------------------------------------


def hash_password(password: str, *, iterations: int = 101) -> str:
    """Mosquitto 2.0's ``$7$`` format (PBKDF2-HMAC-SHA512, 12-byte salt), as ``mosquitto_passwd`` writes.

    Computed here so adding a device needs no subprocess and the manager can rewrite the file.
    """
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def new_password() -> str:
    return secrets.token_urlsafe(24)


def set_password(paths: BrokerPaths, username: str, password: str) -> None:
    """Add or replace ``username`` in the password file (atomically; 0600)."""
    if username != MANAGER_USERNAME:
        check_device_id(username)
    lines = []
    if paths.passwd.is_file():
        lines = [ln for ln in paths.passwd.read_text().splitlines() if ln and not ln.startswith(f"{username}:")]
    lines.append(f"{username}:{hash_password(password)}")
    _write_private(paths.passwd, ("\n".join(lines) + "\n").encode())


def remove_user(paths: BrokerPaths, username: str) -> bool:
    if not paths.passwd.is_file():
        return False
    lines = paths.passwd.read_text().splitlines()
    kept = [ln for ln in lines if ln and not ln.startswith(f"{username}:")]
    _write_private(paths.passwd, ("\n".join(kept) + "\n").encode())
    return len(kept) != len([ln for ln in lines if ln])


def acl_text() -> str:
    rules = ["# generated by reidfleet (fleet/broker.py); devices: username = device id",
             f"user {MANAGER_USERNAME}", f"topic readwrite {MQTT_ROOT}/#", ""]
    rules += [f"pattern {access} {MQTT_ROOT}/devices/%u/{leaf}" for access, leaf in DEVICE_ACL]
    return "\n".join(rules) + "\n"


def ensure_manager_account(paths: BrokerPaths) -> str:
    """The manager's broker password, created on first use (kept 0600 next to the broker config)."""
    if paths.manager_password.is_file():
        password = paths.manager_password.read_text().strip()
        if paths.passwd.is_file() and f"{MANAGER_USERNAME}:" in paths.passwd.read_text():
            return password
    else:
        password = new_password()
        _write_private(paths.manager_password, password.encode())
    set_password(paths, MANAGER_USERNAME, password)
    return password


# --- the process -----------------------------------------------------------------------------------

_RELOAD_LINE = b"Reloading config."


def _logged_since(log_path: Path, offset: int, line: bytes) -> bool:
    try:
        with open(log_path, "rb") as f:
            if f.seek(0, os.SEEK_END) < offset:  # rotated or truncated meanwhile: all of it is new
                offset = 0
            f.seek(offset)
            return line in f.read()
    except OSError:
        return False


def request_reload(pid: int, log_path: Path, timeout_s: float = 5.0) -> bool:
    """SIGHUP mosquitto ``pid`` and wait until a reload starts after this call, signalling again if none does.

    Why not one signal: mosquitto 2.0 clears its reload flag when a reload *ends*, so a SIGHUP that arrives
    while an earlier reload runs is lost, and that earlier reload may have read the password file before
    the caller's write: the new device would stay unknown until some later reload (seen when 20 devices
    are added back to back). A reload whose "Reloading config." line is logged after this call began
    reads the file as the caller left it. Returns whether one was seen; raises ProcessLookupError if the
    broker is gone."""
    offset = log_path.stat().st_size if log_path.exists() else 0
    deadline = time.monotonic() + timeout_s
    while True:
        os.kill(pid, signal.SIGHUP)
        resend = min(time.monotonic() + 0.5, deadline)
        while time.monotonic() < resend:
            if _logged_since(log_path, offset, _RELOAD_LINE):
                return True
            time.sleep(0.02)
        if time.monotonic() >= deadline:
            log.warning("mosquitto (pid %d) logged no reload within %.0f s of SIGHUP", pid, timeout_s)
            return False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _traversable_by_others(path: Path) -> bool:
    for parent in path.parents:  # the root itself is chowned to mosquitto
        st = parent.stat()
        if not st.st_mode & 0o001 and st.st_uid != pwd.getpwnam(MOSQUITTO_USER).pw_uid:
            return False
    return True


class MosquittoBroker:
    """Configure and run one mosquitto on ``host:port`` (TLS only). ``port=0`` picks a free port."""

    def __init__(self, root: Path, host: str = "127.0.0.1", port: int = 0,
                 hostnames: tuple[str, ...] = ("localhost", "127.0.0.1"), binary: str = "mosquitto") -> None:
        self.paths = BrokerPaths(Path(root).resolve())
        self.host = host
        self.requested_port = port
        self.port = port
        self.hostnames = tuple(dict.fromkeys((*hostnames, host)))
        self.binary = binary
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    # configuration
    def prepare(self) -> None:
        if shutil.which(self.binary) is None:
            raise BrokerError(f"{self.binary} not found: install the Debian package `mosquitto` "
                              "(./just does it from apt-packages.txt)")
        ensure_ca(self.paths, self.hostnames)
        ensure_manager_account(self.paths)
        self.paths.acl.write_text(acl_text())
        self.paths.data.mkdir(parents=True, exist_ok=True)

    def _write_conf(self) -> None:
        p = self.paths
        lines = [
            "# generated by reidfleet (fleet/broker.py): do not edit, it is rewritten on every start",
            "per_listener_settings false",
            "allow_anonymous false",
            f"password_file {p.passwd}",
            f"acl_file {p.acl}",
            "persistence true",
            f"persistence_location {p.data}/",
            "autosave_interval 10",
            f"log_dest file {p.log}",
            "log_type error", "log_type warning", "log_type notice", "log_type information",
            "connection_messages true",
            "max_inflight_messages 100",
            f"listener {self.port} {self.host}",
            f"cafile {p.ca_crt}",
            f"certfile {p.server_crt}",
            f"keyfile {p.server_key}",
            "tls_version tlsv1.2",
        ]
        if os.geteuid() == 0:
            if _traversable_by_others(p.root):
                lines.insert(1, f"user {MOSQUITTO_USER}")
            else:  # the mosquitto user could not even reach its files: stay root, and say so
                log.warning("%s is not reachable by user %s; mosquitto keeps running as root", p.root,
                            MOSQUITTO_USER)
                lines.insert(1, "user root")
        p.conf.write_text("\n".join(lines) + "\n")
        if os.geteuid() == 0:
            ent = pwd.getpwnam(MOSQUITTO_USER)
            for path in [p.root, *p.root.rglob("*")]:
                os.chown(path, ent.pw_uid, ent.pw_gid)

    def reload(self) -> None:
        """Re-read the password file and ACL (after a device was added or removed). Their owner is already
        right: the password file is written owned like the broker dir (``_write_private``), the ACL only
        before a start, which chowns the whole dir."""
        if self._proc and self._proc.poll() is None:
            request_reload(self._proc.pid, self.paths.log)

    # lifecycle
    def start(self, timeout_s: float = 10.0) -> MosquittoBroker:
        self.prepare()
        last_error = ""
        for _attempt in range(5):
            if self.requested_port == 0:
                self.port = free_port(self.host)
            self._write_conf()
            offset = self.paths.log.stat().st_size if self.paths.log.exists() else 0
            self._proc = subprocess.Popen([self.binary, "-c", str(self.paths.conf)], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE, start_new_session=True)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    break
                try:
                    with socket.create_connection((self.host, self.port), timeout=0.5):
                        (self.paths.root / "broker.pid").write_text(f"{self._proc.pid}\n")
                        log.info("mosquitto listening on %s:%d (TLS)", self.host, self.port,
                                 extra={"pid": self._proc.pid, "broker_dir": str(self.paths.root)})
                        return self
                except OSError:
                    time.sleep(0.05)
            stderr = b""
            if self._proc.poll() is None:
                self._proc.kill()
            _, stderr = self._proc.communicate(timeout=5)
            last_error = stderr.decode(errors="replace") + self._log_tail(offset)
            if "Address already in use" not in last_error or self.requested_port:
                break
        raise BrokerError(f"mosquitto did not start on {self.host}:{self.port}: {last_error.strip()[-2000:]}")

    def _log_tail(self, offset: int) -> str:
        try:
            with open(self.paths.log, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (mosquitto saves retained messages on the way out), then SIGKILL if it hangs."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        if self._proc.stderr:
            self._proc.stderr.close()
        self._proc = None

    def wait(self) -> int:
        assert self._proc is not None
        return self._proc.wait()

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()
