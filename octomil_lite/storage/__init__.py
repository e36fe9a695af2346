"""The two narrow interfaces the registry stores through, and the errors every store raises.

`MetadataStore` keeps rows (models, versions, artifacts and their conversion jobs, API keys); `BlobStore` keeps
immutable bytes addressed by their sha256. A backend implements both as plain classes (structural typing: no base
class needed) and translates its own exceptions into the errors below at its boundary, so the registry never
sees a driver's exception. Today: `storage.sqlite.SQLiteStore` and `storage.local.LocalBlobStore`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from ..errors import OctomilError

Row = dict[str, Any]
Publish = Callable[[], Awaitable[None]]


class StorageError(OctomilError):
    """The store could not read or write (the message says what, never how the backend said it)."""


class StorageFull(StorageError):
    """The disk or quota under the store is full."""

    status = 507
    code = "insufficient_storage"


class Conflict(StorageError):
    """A write would break a uniqueness rule (model name, version label, active key name)."""

    status = 409
    code = "conflict"


class StagedBlob(Protocol):
    """Bytes on their way into a BlobStore: hashed while written, invisible until committed."""

    path: Path
    size: int
    digest: str
    head: bytes  # the first bytes, for sniffing the format

    async def write(self, data: bytes) -> None: ...
    async def finish(self) -> str:
        """Flush everything durably; return the hex sha256."""
    async def discard(self) -> None:
        """Drop the staged bytes; safe to call more than once, and after commit."""


class BlobStore(Protocol):
    """Immutable blobs by sha256 hex digest. Raises StorageFull / StorageError on write failures."""

    tmp: Path  # scratch space on the same filesystem: staged uploads, conversion working directories

    def path(self, digest: str) -> Path:
        """Where a blob's bytes can be read as a file (a conversion child reads its source from here)."""
    def uri(self, digest: str) -> str:
        """The blob's location as clients see it (model_path)."""
    def stage(self) -> StagedBlob: ...
    async def stage_file(self, path: Path) -> StagedBlob:
        """Stage a finished file already under `tmp` (a conversion's output)."""
    async def commit(self, staged: StagedBlob) -> str:
        """Make finished staged bytes the blob of their digest (idempotent); return the digest."""
    def open(self, digest: str) -> int:
        """A read-only file descriptor on a blob; OSError when it is missing."""
    def delete(self, digest: str) -> int:
        """Remove a blob; return the bytes freed."""
    def digests(self) -> Iterator[str]: ...
    def rehash(self, digest: str) -> tuple[str, int]:
        """(sha256, size) of the bytes as stored now, for `verify`."""
    def sweep_tmp(self, older_than: float | None = None, dry_run: bool = False) -> tuple[int, int]:
        """Delete temp files (all, or those untouched for `older_than` seconds); return (count, bytes)."""


class MetadataStore(Protocol):
    """Rows of the registry. Every write is atomic; `publish` callbacks run inside the write, before it commits,
    so a blob is published exactly when its row is. Raises Conflict on a uniqueness clash, StorageFull when full."""

    async def close(self) -> None: ...

    # models: `Row`s carry the model's columns plus `digest` and `size` of its latest version
    async def insert_model(self, row: Row) -> None: ...
    async def get_model(self, model_id: str | None = None, *, name: str | None = None) -> Row | None: ...
    async def list_models(self, limit: int, offset: int, filters: Row) -> tuple[list[Row], int]:
        """A page of models, newest first, and the count of all that match `filters` (column: value)."""
    async def update_model(self, model_seq: int, fields: Row) -> None: ...
    async def delete_model(self, model_seq: int) -> bool: ...

    # versions
    async def list_versions(self, model_seq: int) -> list[Row]: ...
    async def get_version(self, model_seq: int, *, number: int | None = None, label: str | None = None) -> Row | None:
        """A version by number, by label, or (neither given) the newest."""
    async def insert_version(self, model_seq: int, row: Row, model_fields: Row, artifacts: list[Row],
                             publish: Publish) -> int | None:
        """Publish the blob, then add the model's next version and its artifacts; None if the model is gone."""
    async def delete_version(self, version_seq: int) -> bool: ...

    # artifacts (converted formats) and the conversion jobs they queue
    async def list_artifacts(self, version_seq: int) -> list[Row]: ...
    async def get_artifact(self, version_seq: int, fmt: str) -> Row | None: ...
    async def request_artifact(self, version_seq: int, fmt: str, when: str) -> Row:
        """The artifact row, created as a pending job if it does not exist."""
    async def claim_job(self, when: str) -> Row | None:
        """Mark the next pending job running, round-robin by uploading key; return it with what the converter needs."""
    async def finish_job(self, artifact_seq: int, fields: Row, publish: Publish | None = None) -> bool:
        """Record a job's outcome (publishing its blob first); False if the version is gone."""
    async def requeue_running(self) -> int:
        """Jobs left running by a dead process go back to pending; return how many."""

    # storage accounting (gc, verify)
    async def referenced_digests(self) -> set[str]: ...
    async def delete_unreferenced(self, candidates: set[str], delete: Callable[[str], int]) -> tuple[int, int]:
        """With uploads excluded, `delete` the candidates still unreferenced; return (count, bytes freed)."""
    async def stored_references(self) -> list[Row]:
        """Every row that names a blob: model_id, number, format, digest, size."""
    async def integrity_check(self) -> str:
        """'ok', or what the backend's own consistency check found."""

    # api keys
    async def insert_key(self, row: Row) -> None: ...
    async def find_key(self, key_hash: str) -> Row | None: ...
    async def list_keys(self) -> list[Row]: ...
    async def revoke_key(self, name: str, when: str) -> bool: ...
    async def count_active_keys(self) -> int: ...


async def open_stores(data_dir: Path) -> tuple[MetadataStore, BlobStore]:
    """The stores of one data directory: SQLite metadata and local blobs."""
    from .local import LocalBlobStore
    from .sqlite import SQLiteStore

    blobs = LocalBlobStore(data_dir)
    return await SQLiteStore.open(data_dir / "registry.sqlite3"), blobs
