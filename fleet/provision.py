"""Device provisioning: identity, broker credentials and the bundle the installer puts on the box.

``add_device`` registers the id in the inventory, adds a fresh random password to the broker's
password file (only its PBKDF2 hash is stored on the admin side), asks a running broker to reload,
and writes ``bundles/<id>/bundle.json`` (0600) plus ``bundles/<id>.tar.gz`` for the installer.
The plaintext password exists only in the bundle: re-running ``device add`` rotates it.
"""

from __future__ import annotations

import io
import logging
import os
import tarfile
import time
from pathlib import Path

from fleet.broker import (
    BrokerPaths,
    ensure_ca,
    ensure_manager_account,
    new_password,
    remove_user,
    request_reload,
    set_password,
)
from fleet.db import FleetDB
from fleet.home import FleetConfig, FleetHome
from fleet.inventory import Inventory
from schemas.bundle import BUNDLE_FILE, DeviceBundle, KafkaEndpoint, MqttEndpoint
from schemas.mqtt import check_device_id

log = logging.getLogger(__name__)

PID_FILE = "broker.pid"


def reload_running_broker(paths: BrokerPaths) -> bool:
    """SIGHUP the broker started by ``fleet broker run`` (if any) so it re-reads passwd and ACL."""
    pid_file = paths.root / PID_FILE
    try:
        pid = int(pid_file.read_text().strip())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"mosquitto" not in f.read():
                return False
        return request_reload(pid, paths.log)
    except (OSError, ValueError):
        return False


def make_bundle(device_id: str, password: str, cfg: FleetConfig, ca_pem: str, public_key_pem: str,
                group: str = "default", camera_url: str = "", mqtt_port: int | None = None) -> DeviceBundle:
    return DeviceBundle(
        device_id=device_id, group=group, created_at=time.time(), camera_url=camera_url,
        mqtt=MqttEndpoint(host=cfg.mqtt_host, port=mqtt_port or cfg.mqtt_port, tls=True, ca_cert_pem=ca_pem,
                          username=device_id, password=password),
        kafka=KafkaEndpoint(bootstrap=cfg.kafka_bootstrap), fleet_public_key_pem=public_key_pem)


def write_bundle(bundle: DeviceBundle, out_dir: Path) -> Path:
    """``out_dir/bundle.json`` (0600) and ``out_dir.tar.gz``; returns the tarball path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(out_dir, 0o700)
    data = (bundle.model_dump_json(indent=2) + "\n").encode()
    path = out_dir / BUNDLE_FILE
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tar_path = out_dir.with_name(out_dir.name + ".tar.gz")
    tmp = tar_path.with_name(tar_path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
        info = tarfile.TarInfo(f"{bundle.device_id}/{BUNDLE_FILE}")
        info.size, info.mode, info.mtime = len(data), 0o600, int(bundle.created_at)
        tar.addfile(info, io.BytesIO(data))
    tmp.replace(tar_path)
    return tar_path


def add_device(home: FleetHome, device_id: str, *, group: str = "default", camera_url: str = "",
               out_dir: Path | None = None) -> tuple[DeviceBundle, Path]:
    """Register (or re-key) ``device_id``; returns the bundle and the tarball path."""
    check_device_id(device_id)
    cfg = home.config()
    if not home.public_key.is_file():
        raise FileNotFoundError(f"no fleet signing key at {home.public_key}: run `python -m fleet keys generate` first")
    paths = home.broker
    ensure_ca(paths, tuple(dict.fromkeys(["localhost", "127.0.0.1", cfg.mqtt_host, *cfg.mqtt_cert_names])))
    ensure_manager_account(paths)
    password = new_password()
    set_password(paths, device_id, password)
    db = FleetDB(home.db_path)
    try:
        Inventory(db).add(device_id, group)
    finally:
        db.close()
    if reload_running_broker(paths):
        log.info("broker reloaded its password file")
    bundle = make_bundle(device_id, password, cfg, paths.ca_crt.read_text(), home.public_key.read_text(),
                         group=group, camera_url=camera_url)
    tar_path = write_bundle(bundle, out_dir or home.bundles / device_id)
    return bundle, tar_path


def remove_device(home: FleetHome, device_id: str) -> bool:
    """Revoke: the broker forgets the password (new logins fail after the reload; restart the broker to
    also drop a session that is already connected), and the inventory marks the device revoked."""
    removed = remove_user(home.broker, device_id)
    db = FleetDB(home.db_path)
    try:
        revoked = Inventory(db).revoke(device_id)
    finally:
        db.close()
    reload_running_broker(home.broker)
    return removed or revoked
