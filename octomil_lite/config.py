"""Explicit, frozen configuration passed to everything that needs it (no globals)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

GiB = 1024**3


def default_data_dir() -> Path:
    """$OCTOMIL_LITE_HOME, else $XDG_DATA_HOME/octomil-lite, else ~/.local/share/octomil-lite."""
    if home := os.environ.get("OCTOMIL_LITE_HOME"):
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg).expanduser() / "octomil-lite"


@dataclass(frozen=True)
class Config:
    """Everything a running registry needs to know."""

    data_dir: Path = field(default_factory=default_data_dir)
    host: str = "127.0.0.1"
    port: int = 8080
    max_upload_size: int = 20 * GiB
    rate_limit: int = 6000  # requests per minute per key; 0 turns it off
    conversion_workers: int = 1
    conversion_timeout: float = 900.0
    conversion_memory_bytes: int = 8 * GiB
    max_link_age: int = 7 * 24 * 3600  # seconds; download-url refuses longer links, downloads refuse them too
    unsafe_conversions: bool = False  # run conversion jobs without isolation (the operator accepts the risk)
