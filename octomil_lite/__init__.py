"""octomil-lite: a lightweight, single-process model registry speaking the Octomil Models API."""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """Import the HTTP client only when `octomil_lite.Client` or `OctomilLiteError` is asked for."""
    if name in ("Client", "OctomilLiteError"):
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
