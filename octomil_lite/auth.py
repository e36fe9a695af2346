"""API keys (random, stored only as sha256), the download-link signing secret and a per-key rate limiter."""

from __future__ import annotations

import hashlib
import math
import os
import secrets
import time
from pathlib import Path

SCOPES = ("read", "write", "admin")
KEY_PREFIX = "oml_"
ASGI_SCOPE_KEY = "octomil_lite.key"  # where the pre-routing check leaves the caller's KeyInfo in the ASGI scope


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    # Keys carry 256 random bits, so a plain sha256 is as strong as a slow KDF and costs microseconds.
    return hashlib.sha256(key.encode()).hexdigest()


class LinkSecret:
    """The HMAC key of download links, in one owner-only file; a replaced file is picked up on the next use."""

    def __init__(self, path: Path):
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._key = b""

    def current(self) -> bytes:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._create()
            st = os.stat(self.path)
        # A stat costs about a microsecond; `secret rotate` replaces the file, so inode and mtime change.
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._key = self.path.read_bytes()
            self._stamp = stamp
        return self._key

    def _create(self) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
            f.flush()
            os.fsync(f.fileno())

    def rotate(self) -> None:
        """Replace the key atomically: every link signed with the old one stops working."""
        tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(8)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def scope_allows(granted: str, needed: str) -> bool:
    return SCOPES.index(granted) >= SCOPES.index(needed)


class RateLimiter:
    """Token buckets: `per_minute` requests per minute per identity, bursting up to that many."""

    def __init__(self, per_minute: int, max_identities: int = 100_000):
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.max_identities = max_identities
        self._buckets: dict[str, tuple[float, float]] = {}

    def hit(self, identity: str) -> int | None:
        """Take one token; return None if allowed, else the whole seconds to wait."""
        if self.capacity <= 0:
            return None
        now = time.monotonic()
        tokens, last = self._buckets.get(identity, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self._buckets[identity] = (tokens, now)
            return max(1, math.ceil((1.0 - tokens) / self.rate))
        if len(self._buckets) >= self.max_identities and identity not in self._buckets:
            self._buckets.clear()  # bounded memory under a flood of distinct identities
        self._buckets[identity] = (tokens - 1.0, now)
        return None
