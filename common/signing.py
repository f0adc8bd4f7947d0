"""Ed25519 signing of fleet artifacts: key generation, signing, verification.

Why ed25519: 32-byte keys and 64-byte signatures fit in a JSON bundle and an MQTT job, signing
and verifying take microseconds on a small CPU box, and there are no parameters to get wrong.

The private key is written once with mode 0600 and is only ever read by the admin's own
``python -m fleet model publish``; the fleet manager daemon and the devices only see the public
key. What is signed is not the raw file but a short statement binding the artifact's sha256 to its
model id, version and size (:func:`artifact_statement`), so a valid signature for one model cannot
be replayed to claim another name or version.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

STATEMENT_PREFIX = "reidfleet-artifact-v1"


class SignatureError(ValueError):
    """A signature that does not verify, or a key that cannot be read."""


def artifact_statement(model_id: str, version: str, sha256: str, size_bytes: int) -> bytes:
    """The exact bytes that are signed for one artifact (one field per line, no ambiguity)."""
    for name, value in (("model_id", model_id), ("version", version), ("sha256", sha256)):
        if "\n" in value or not value:
            raise ValueError(f"{name} must be a non-empty single line")
    return f"{STATEMENT_PREFIX}\n{model_id}\n{version}\n{sha256}\n{int(size_bytes)}\n".encode()


def generate_keypair(private_path: Path, public_path: Path, *, overwrite: bool = False) -> Ed25519PublicKey:
    """Create a new key pair; the private key file is created 0600 from the start (no umask race)."""
    if not overwrite and (private_path.exists() or public_path.exists()):
        raise FileExistsError(f"{private_path} or {public_path} exists; refusing to replace a fleet signing key")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    private_path.parent.mkdir(parents=True, exist_ok=True)
    public_path.parent.mkdir(parents=True, exist_ok=True)
    if overwrite:
        private_path.unlink(missing_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    public_path.write_bytes(public_pem(key.public_key()).encode())
    return key.public_key()


def public_pem(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read the signing key, refusing one that other users can read."""
    if not path.is_file():
        raise SignatureError(f"signing key {path} not found; create one with `python -m fleet keys generate`")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise SignatureError(f"signing key {path} has mode {mode:o}; it must be 0600 (chmod 600 {path})")
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path} is not an ed25519 private key")
    return key


def load_public_key(pem: str | bytes) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
    except ValueError as exc:
        raise SignatureError(f"not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError("the fleet public key is not an ed25519 key")
    return key


def sign(key: Ed25519PrivateKey, message: bytes) -> str:
    """Base64 signature (88 characters) over ``message``."""
    return base64.b64encode(key.sign(message)).decode()


def verify(key: Ed25519PublicKey, message: bytes, signature_b64: str) -> None:
    """Raise :class:`SignatureError` unless ``signature_b64`` is a valid signature of ``message``."""
    try:
        raw = base64.b64decode(signature_b64, validate=True)
    except ValueError:
        raise SignatureError("signature is not valid base64") from None
    if len(raw) != 64:
        raise SignatureError(f"signature is {len(raw)} bytes; ed25519 signatures are 64")
    try:
        key.verify(raw, message)
    except InvalidSignature:
        raise SignatureError("signature does not match the fleet public key") from None
