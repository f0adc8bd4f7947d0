"""Model artifacts: pack a model directory into a tar, sign it, keep it in the store, serve it over HTTP.

An artifact is a deterministic, uncompressed tar (sorted names, zero mtimes and owners) of a
model directory that carries ``manifest.json`` (``schemas.model_manifest``), so the same model
always packs to the same sha256. INT8 weights barely compress, and a plain tar lets the device
stream it to disk. Publishing checks the directory against its manifest, then signs
``common.signing.artifact_statement`` (model id, version, sha256, size) with the fleet key.

Store layout: ``<store>/<model_id>/<version>/artifact.tar`` + ``artifact.json`` (an
``ArtifactRef`` without a URL). The HTTP server answers ``GET /artifacts/<model_id>/<version>/artifact.tar``
with single ``Range`` support, so a device resumes an interrupted download. It serves only
signed, hashed files, so plain HTTP on the fleet network is acceptable: a tampered or truncated
file fails the device's sha256/signature check before anything is installed.
"""

from __future__ import annotations

import logging
import re
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from common.signing import load_private_key, sign
from schemas.model_manifest import MANIFEST_NAME, sha256_file, verify_model_dir
from schemas.mqtt import ArtifactRef

log = logging.getLogger(__name__)

ARTIFACT_FILE = "artifact.tar"
ARTIFACT_META = "artifact.json"
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


class ArtifactError(ValueError):
    pass


def pack(model_dir: Path, out_tar: Path) -> None:
    """Deterministic tar of ``model_dir`` (regular files only)."""
    files = sorted(p for p in model_dir.rglob("*") if p.is_file())
    if model_dir / MANIFEST_NAME not in files:
        raise ArtifactError(f"{model_dir} has no {MANIFEST_NAME}; package it first (`python -m models package`)")
    tmp = out_tar.with_name(out_tar.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for p in files:
            ti = tarfile.TarInfo(p.relative_to(model_dir).as_posix())
            ti.size = p.stat().st_size
            ti.mode = 0o644
            ti.mtime = 0
            with open(p, "rb") as f:
                tar.addfile(ti, f)
    tmp.replace(out_tar)


def publish(model_dir: Path, store: Path, signing_key_path: Path, *, overwrite: bool = False) -> ArtifactRef:
    """Verify, pack and sign ``model_dir`` into the store; returns its (URL-less) reference."""
    manifest = verify_model_dir(model_dir)
    for name, value in (("model_id", manifest.model_id), ("version", manifest.version)):
        if not _SAFE.match(value):
            raise ArtifactError(f"manifest {name} {value!r} cannot be used in a path (letters, digits, ._+-)")
    key = load_private_key(signing_key_path)
    dest = store / manifest.model_id / manifest.version
    if (dest / ARTIFACT_META).exists() and not overwrite:
        raise ArtifactError(f"{manifest.model_id} {manifest.version} is already published; bump the version "
                            "in the manifest (devices skip a version they already run)")
    dest.mkdir(parents=True, exist_ok=True)
    pack(model_dir, dest / ARTIFACT_FILE)
    digest = sha256_file(dest / ARTIFACT_FILE)
    size = (dest / ARTIFACT_FILE).stat().st_size
    ref = ArtifactRef(model_id=manifest.model_id, version=manifest.version, sha256=digest, size_bytes=size,
                      signature="x")
    ref = ref.model_copy(update={"signature": sign(key, ref.statement())})
    tmp = dest / (ARTIFACT_META + ".tmp")
    tmp.write_text(ref.model_dump_json(indent=2) + "\n")
    tmp.replace(dest / ARTIFACT_META)
    log.info("published %s %s (%d bytes, sha256 %s)", ref.model_id, ref.version, size, digest[:12])
    return ref


def list_artifacts(store: Path) -> list[ArtifactRef]:
    out = []
    for meta in sorted(store.glob(f"*/*/{ARTIFACT_META}")):
        try:
            out.append(ArtifactRef.model_validate_json(meta.read_text()))
        except ValueError as exc:
            log.warning("skipping unreadable %s: %s", meta, exc)
    return out


def get_artifact(store: Path, model_id: str, version: str) -> ArtifactRef:
    if not (_SAFE.match(model_id) and _SAFE.match(version)):
        raise ArtifactError(f"bad model id or version: {model_id!r} {version!r}")
    meta = store / model_id / version / ARTIFACT_META
    if not meta.is_file():
        known = ", ".join(f"{a.model_id}:{a.version}" for a in list_artifacts(store)) or "none"
        raise ArtifactError(f"artifact {model_id}:{version} is not published (published: {known})")
    return ArtifactRef.model_validate_json(meta.read_text())


def artifact_path(model_id: str, version: str) -> str:
    return f"/artifacts/{model_id}/{version}/{ARTIFACT_FILE}"


_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class ArtifactServer:
    """Serves the store read-only on ``host:port`` (``port=0``: a free one; see ``.base_url``)."""

    def __init__(self, store: Path, host: str = "127.0.0.1", port: int = 0) -> None:
        self.store = Path(store).resolve()
        self.requests = 0
        self.bytes_sent = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                self._serve(body=True)

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def _serve(self, body: bool) -> None:
                parts = self.path.split("?", 1)[0].strip("/").split("/")
                if len(parts) != 4 or parts[0] != "artifacts" or parts[3] != ARTIFACT_FILE or not all(
                        _SAFE.match(p) for p in parts[1:3]):
                    return self._error(404, "not found")
                path = outer.store / parts[1] / parts[2] / ARTIFACT_FILE
                if not path.is_file():
                    return self._error(404, "not found")
                size = path.stat().st_size
                start, end, status = 0, size - 1, 200
                if rng := self.headers.get("Range"):
                    m = _RANGE.match(rng.strip())
                    if not m or int(m.group(1)) >= size:
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{size}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return None
                    start = int(m.group(1))
                    end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
                    status = 206
                length = end - start + 1
                self.send_response(status)
                self.send_header("Content-Type", "application/x-tar")
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(length))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                self.end_headers()
                outer.requests += 1
                if not body:
                    return None
                with open(path, "rb") as f:
                    f.seek(start)
                    left = length
                    while left > 0 and (block := f.read(min(left, 1 << 16))):
                        self.wfile.write(block)
                        left -= len(block)
                        outer.bytes_sent += len(block)
                return None

            def _error(self, code: int, text: str) -> None:
                data = (text + "\n").encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_args: Any) -> None:
                return

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.host = host
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="artifact-http", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url_for(self, ref: ArtifactRef) -> str:
        return self.base_url + artifact_path(ref.model_id, ref.version)

    def start(self) -> ArtifactServer:
        self._thread.start()
        log.info("serving artifacts from %s on %s", self.store, self.base_url)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> ArtifactServer:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


__all__ = ["ArtifactError", "ArtifactServer", "get_artifact", "list_artifacts", "pack", "publish"]
