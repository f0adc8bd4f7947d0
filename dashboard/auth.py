"""Password checks and roles for the dashboard login (no Streamlit import, so it is unit tested).

Passwords are stored as PBKDF2-SHA256 hashes (stdlib, no extra dependency) or read from an
environment variable / file at check time, and compared in constant time. A name that fails
``max_failures`` times in a row is locked out for ``lockout_s`` so the login form cannot be
brute-forced at page-reload speed.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dashboard.config import AuthConfig, Role, UserConfig

PBKDF2_ITERATIONS = 390_000
PAGES_BY_ROLE: dict[str, tuple[str, ...]] = {
    "manager": ("overview", "live", "analytics", "search"),
    "admin": ("overview", "live", "analytics", "search", "fleet", "settings"),
}


def hash_password(password: str, *, iterations: int = PBKDF2_ITERATIONS, salt: bytes | None = None) -> str:
    """``pbkdf2_sha256$<iterations>$<salt hex>$<digest hex>``, the form ``password_hash`` expects."""
    if not password:
        raise ValueError("empty password")
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return f"pbkdf2_sha256${iterations}${salt.hex()}${digest.hex()}"


def verify_hash(password: str, encoded: str) -> bool:
    try:
        _, iterations, salt_hex, digest_hex = encoded.split("$")
        digest = hashlib.pbkdf2_hmac("sha256", password.encode(), bytes.fromhex(salt_hex), int(iterations))
    except ValueError:
        return False
    return hmac.compare_digest(digest.hex(), digest_hex)


class SecretMissing(RuntimeError):
    """The configured secret source is empty or absent: an operator error, shown as such."""


def _plain_secret(user: UserConfig, name: str) -> str:
    if user.password_env:
        value = os.environ.get(user.password_env, "")
        if not value:
            raise SecretMissing(f"user {name!r}: environment variable {user.password_env} is not set")
        return value
    assert user.password_file is not None
    path = Path(user.password_file)
    try:
        value = path.read_text().splitlines()[0].strip() if path.exists() else ""
    except (OSError, IndexError):
        value = ""
    if not value:
        raise SecretMissing(f"user {name!r}: password file {path} is missing or empty")
    return value


def check_password(user: UserConfig, name: str, password: str) -> bool:
    if user.password_hash:
        return verify_hash(password, user.password_hash)
    return hmac.compare_digest(_plain_secret(user, name).encode(), password.encode())


@dataclass(frozen=True)
class LoginResult:
    ok: bool
    role: Role | None = None
    message: str = ""


class Authenticator:
    """Checks logins against the config; one instance per dashboard process keeps the lockouts."""

    def __init__(self, cfg: AuthConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self._clock = clock
        self._failures: dict[str, tuple[int, float]] = {}
        self._lock = threading.Lock()

    def login(self, name: str, password: str) -> LoginResult:
        name = name.strip()
        now = self._clock()
        with self._lock:
            count, since = self._failures.get(name, (0, now))
            if count >= self.cfg.max_failures and now - since < self.cfg.lockout_s:
                wait = int(self.cfg.lockout_s - (now - since)) + 1
                return LoginResult(False, None, f"Too many failed attempts for {name!r}; try again in {wait} s.")
        user = self.cfg.users.get(name)
        try:
            ok = user is not None and check_password(user, name, password)
        except SecretMissing as exc:
            return LoginResult(False, None, f"Login is not configured: {exc}.")
        with self._lock:
            if ok:
                self._failures.pop(name, None)
            else:
                prev, since = self._failures.get(name, (0, now))
                if now - since >= self.cfg.lockout_s:
                    prev, since = 0, now
                self._failures[name] = (prev + 1, since)
        if not ok or user is None:
            return LoginResult(False, None, "Wrong user name or password.")
        return LoginResult(True, user.role, "")


def pages_for(role: str | None) -> tuple[str, ...]:
    return PAGES_BY_ROLE.get(role or "", ())
