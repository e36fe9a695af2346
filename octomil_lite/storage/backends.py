"""Open the metadata store and blob store a Config names: SQLite and a directory, or PostgreSQL and S3."""

from __future__ import annotations

from typing import Any

from ..config import Config
from ..errors import OctomilError

_SCALE_HINT = "install the extra: pip install 'octomil-lite[scale]'"


def _require(module: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise OctomilError(f"This configuration needs the Python package '{module}'; {_SCALE_HINT}.")


async def open_database(config: Config) -> Any:
    """`sqlite:///path` (default: the data directory's registry.sqlite3) or `postgresql://…`."""
    url = config.database or f"sqlite:///{config.data_dir / 'registry.sqlite3'}"
    if url.startswith(("postgresql://", "postgres://")):
        _require("asyncpg")
        from .postgres import PostgresDatabase

        return await PostgresDatabase.open(url)
    if url.startswith("sqlite:///"):
        from pathlib import Path

        from ..db import Database

        path = Path(url.removeprefix("sqlite:///")).expanduser()
        if not path.is_absolute():
            path = Path.cwd() / path
        path.parent.mkdir(parents=True, exist_ok=True)
        return await Database.open(path)
    raise OctomilError(f"--database takes sqlite:///PATH or postgresql://USER:PASS@HOST:PORT/DB, not '{url[:100]}'.")


def open_blobs(config: Config, db: Any) -> Any:
    """A directory (default: the data directory's blobs/) or `s3://bucket/prefix`."""
    tmp = config.data_dir / "tmp"
    if config.blobs and config.blobs.startswith("s3://"):
        _require("obstore")
        from .s3 import S3BlobStore

        return S3BlobStore(config.blobs, db, tmp)
    from pathlib import Path

    from ..blobstore import BlobStore

    if config.blobs and "://" in config.blobs:
        raise OctomilError(f"--blobs takes a directory or s3://BUCKET/PREFIX, not '{config.blobs[:100]}'.")
    return BlobStore(config.data_dir, Path(config.blobs).expanduser() if config.blobs else None)
