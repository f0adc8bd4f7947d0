"""ed25519 artifact signing: keys on disk, statements, tampering."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from common.signing import (
    SignatureError,
    artifact_statement,
    generate_keypair,
    load_private_key,
    load_public_key,
    sign,
    verify,
)


def test_sign_verify_and_tamper(tmp_path: Path) -> None:
    pub = generate_keypair(tmp_path / "k", tmp_path / "k.pub")
    key = load_private_key(tmp_path / "k")
    stmt = artifact_statement("yolo", "2.0.0", "a" * 64, 123)
    sig = sign(key, stmt)
    verify(load_public_key((tmp_path / "k.pub").read_text()), stmt, sig)
    verify(pub, stmt, sig)
    for other in (artifact_statement("yolo", "2.0.1", "a" * 64, 123),
                  artifact_statement("yolo", "2.0.0", "b" * 64, 123),
                  artifact_statement("yolo", "2.0.0", "a" * 64, 124),
                  artifact_statement("yolo2", "2.0.0", "a" * 64, 123)):
        with pytest.raises(SignatureError, match="does not match"):
            verify(pub, other, sig)
    with pytest.raises(SignatureError, match="base64"):
        verify(pub, stmt, "not base64!")
    with pytest.raises(SignatureError, match="64"):
        verify(pub, stmt, "AAAA")


def test_private_key_is_0600_and_never_replaced(tmp_path: Path) -> None:
    generate_keypair(tmp_path / "k", tmp_path / "k.pub")
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        generate_keypair(tmp_path / "k", tmp_path / "k.pub")
    os.chmod(tmp_path / "k", 0o644)
    with pytest.raises(SignatureError, match="0600"):
        load_private_key(tmp_path / "k")
    with pytest.raises(SignatureError, match="not found"):
        load_private_key(tmp_path / "missing")


def test_other_key_rejected(tmp_path: Path) -> None:
    generate_keypair(tmp_path / "a", tmp_path / "a.pub")
    other = generate_keypair(tmp_path / "b", tmp_path / "b.pub")
    stmt = artifact_statement("m", "1", "c" * 64, 1)
    with pytest.raises(SignatureError):
        verify(other, stmt, sign(load_private_key(tmp_path / "a"), stmt))


def test_statement_rejects_ambiguous_fields() -> None:
    with pytest.raises(ValueError):
        artifact_statement("a\nb", "1", "c" * 64, 1)
