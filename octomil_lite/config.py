"""Explicit, frozen configuration passed to everything that needs it (no globals)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

GiB = 1024**3
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human_size(n: int) -> str:
    """A byte count for people, in binary units: 512 B, 4.0 KiB, 1.5 MiB, 20.0 GiB."""
    size, unit = float(n), 0
    while size >= 1024 and unit < len(_UNITS) - 1:
        size, unit = size / 1024, unit + 1
    if unit == 0:
        return f"{n} B"
    return f"{size:.1f} {_UNITS[unit]}"


def default_data_dir() -> Path:
    """$OCTOMIL_LITE_HOME, else $XDG_DATA_HOME/octomil-lite, else ~/.local/share/octomil-lite."""
    if home := os.environ.get("OCTOMIL_LITE_HOME"):
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg).expanduser() / "octomil-lite"


# The longest --max-link-age accepted: the API schema states it, so a client can know it without asking.
LINK_AGE_CEILING = 366 * 24 * 3600


@dataclass(frozen=True)
class Config:
    """Everything a running registry needs to know."""

    data_dir: Path = field(default_factory=default_data_dir)
    database: str | None = None  # sqlite:///PATH or postgresql://…; None: the data directory's SQLite file
    blobs: str | None = None  # a directory or s3://bucket/prefix; None: the data directory's blobs/
    host: str = "127.0.0.1"
    port: int = 8080
    max_upload_size: int = 20 * GiB
    rate_limit: int = 6000  # requests per minute per key; 0 turns it off
    conversion_workers: int = 1
    conversion_timeout: float = 900.0
    conversion_memory_bytes: int = 8 * GiB
    max_link_age: int = 7 * 24 * 3600  # seconds (<= LINK_AGE_CEILING); longer links are refused
    presigned_downloads: bool = False  # download-url hands out the object store's pre-signed URL
    conversion_lease: float = 60.0  # seconds a job stays claimed without a renewal from its process
    warm_pool_size: int = 0  # idle warm workers kept per framework family; 0: off (`serve` keeps 1 by default)
    warm_idle_timeout: float = 300.0  # seconds a family goes unused before its warm workers are ended
    unsafe_conversions: bool = False  # run conversion jobs without isolation (the operator accepts the risk)

    def __post_init__(self) -> None:
        # conversion children run in their own working directory: a relative data directory would not be found
        object.__setattr__(self, "data_dir", self.data_dir.absolute())
