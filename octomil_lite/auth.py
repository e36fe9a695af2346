"""API keys (random, stored only as sha256), the download-link signing secret and a per-key rate limiter."""

from __future__ import annotations

import hashlib
import math
import secrets
import time

SCOPES = ("read", "device", "write", "admin")  # each allows what those before it do; device = read + submit updates
KEY_PREFIX = "oml_"
ASGI_SCOPE_KEY = "octomil_lite.key"  # where the pre-routing check leaves the caller's KeyInfo in the ASGI scope


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    # Keys carry 256 random bits, so a plain sha256 is as strong as a slow KDF and costs microseconds.
    return hashlib.sha256(key.encode()).hexdigest()


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
