"""Domain errors: each carries its HTTP status and the spec's error code."""

from __future__ import annotations

from typing import Any

UNEXPECTED = "An unexpected error occurred; the server log has the details."
DISK_FULL = "The registry's disk is full; free space in the data directory and try again."


class OctomilError(Exception):
    """Base of every error a client may see."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, details: list[Any] | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.details = details
        self.headers = headers or {}


class BadRequest(OctomilError):
    status = 400
    code = "bad_request"


class Unauthorized(OctomilError):
    status = 401
    code = "unauthorized"


class Forbidden(OctomilError):
    status = 403
    code = "forbidden"


class NotFound(OctomilError):
    status = 404
    code = "not_found"


class Conflict(OctomilError):
    status = 409
    code = "conflict"


class PayloadTooLarge(OctomilError):
    status = 413
    code = "payload_too_large"


class RateLimited(OctomilError):
    status = 429
    code = "rate_limited"


class ServiceUnavailable(OctomilError):
    status = 503
    code = "service_unavailable"


MAX_REASON_CHARS = 300


def bounded_reason(text: object) -> str:
    """A conversion's failure reason as stored and shown: one printable line of at most MAX_REASON_CHARS.

    Loaders put file contents into exceptions (numpy's text readers do), so a reason never carries more.
    """
    flat = "".join(c if c.isprintable() else " " for c in str(text)[:MAX_REASON_CHARS * 2])
    flat = " ".join(flat.split())
    return flat if len(flat) <= MAX_REASON_CHARS else flat[:MAX_REASON_CHARS - 1] + "…"


class NotImplementedHere(OctomilError):
    """Part of the hosted Octomil platform that a one-organisation registry does not have."""

    status = 501
    code = "not_implemented"
