"""The two narrow interfaces the registry stores through, and the errors every store raises.

`MetadataStore` keeps rows (models, versions, artifacts and their conversion jobs, API keys); `BlobStore` keeps
immutable bytes addressed by their sha256. A backend implements both as plain classes (structural typing: no base
class needed) and translates its own exceptions into the errors below at its boundary, so the registry never
sees a driver's exception. Single machine: `storage.sqlite.SQLiteStore` and `storage.local.LocalBlobStore`;
several processes (the `scale` extra): `storage.postgres.PostgresStore` and `storage.s3.S3BlobStore`, chosen by
`Config.database` / `Config.blobs` URLs and imported only when configured.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from ..errors import OctomilError

if TYPE_CHECKING:
    from ..config import Config

Row = dict[str, Any]
# (digest, object key, size) -> the key that digest maps to once this transaction commits (the first one wins)
Recorder = Callable[[str, str, int], Awaitable[str]]
# Makes a blob durable-and-visible inside the transaction that adds its row; an object store records its key.
Publish = Callable[[Recorder], Awaitable[None]]
Resolve = Callable[[Row], tuple[list[str], Row]]  # what is here -> (clashes, what to write); see transfer.py
# The tables `migrate` copies from one metadata store to another (export_rows -> import_rows), parents first;
# direct_uploads stay behind (their half-done bytes live in the source's tmp/).
EXPORTED_TABLES = ("models", "versions", "artifacts", "api_keys", "devices", "training_rounds", "training_updates",
                   "federations", "federation_models", "model_events")
# Portable SQL both stores run: every digest a row names (gc keeps these), and every row naming a blob (verify).
REFERENCED = ("SELECT digest FROM versions UNION SELECT digest FROM artifacts WHERE digest IS NOT NULL "
              "UNION SELECT digest FROM training_updates")
STORED_REFERENCES = (
    "SELECT m.id AS model_id, v.number, v.format, v.digest, v.size FROM versions v "
    "JOIN models m ON m.seq = v.model_seq UNION ALL "
    "SELECT m.id, v.number, a.format, a.digest, a.size FROM artifacts a "
    "JOIN versions v ON v.seq = a.version_seq "
    "JOIN models m ON m.seq = v.model_seq WHERE a.digest IS NOT NULL UNION ALL "
    "SELECT m.id, v.number, 'training update ' || u.id, u.digest, u.size FROM training_updates u "
    "JOIN versions v ON v.seq = u.base_version_seq JOIN models m ON m.seq = u.model_seq")


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

    size: int
    digest: str
    head: bytes  # the first bytes, for sniffing the format

    async def write(self, data: bytes) -> None: ...
    async def finish(self) -> str:
        """Flush everything durably; return the hex sha256."""
    async def discard(self) -> None:
        """Drop the staged bytes unless committed; safe to call more than once, and after commit."""
    def open_reader(self) -> BinaryIO:
        """A seekable reader over the finished bytes (to list a zip's members)."""
    def local_path(self) -> contextlib.AbstractAsyncContextManager[Path]:
        """The finished bytes as a local file for a sandboxed check (a temporary copy for an object store)."""


class BlobSource(Protocol):
    """Where a download's bytes come from: a local file, or an object read with the client's range."""

    async def begin(self, start: int, length: int) -> None:
        """Start reading (before any header is sent, so a missing blob is still a JSON error)."""
    def chunks(self, start: int, length: int) -> AsyncIterator[bytes]: ...
    def close(self) -> None: ...


class BlobStore(Protocol):
    """Immutable blobs by sha256 hex digest. Raises StorageFull / StorageError on write failures."""

    tmp: Path  # local scratch space: staged uploads (directory store), conversion working directories

    def uri(self, digest: str) -> str:
        """The blob's location as clients see it (model_path)."""
    def stage(self) -> StagedBlob: ...
    async def stage_file(self, path: Path) -> StagedBlob:
        """Take a finished file under `tmp` (a conversion's output) into the store, not yet committed."""
    async def commit(self, staged: StagedBlob, record: Recorder) -> str:
        """Inside the row's transaction: make staged bytes the blob of their digest (idempotent)."""
    async def presign(self, digest: str, ttl: int) -> str | None:
        """A pre-signed GET URL valid for `ttl` seconds, or None where the store has no such thing."""
    async def has(self, digest: str) -> bool:
        """Whether the blob is stored (and, in a bucket, mapped)."""
    async def open_source(self, digest: str) -> BlobSource:
        """Where to read a blob; StorageError when it is missing."""
    def local_copy(self, digest: str) -> contextlib.AbstractAsyncContextManager[Path]:
        """A blob as a local file (a conversion child's source): the blob itself, or a temporary download."""
    def sweep_tmp(self, older_than: float | None = None, dry_run: bool = False) -> tuple[int, int]:
        """Delete temp files (all, or those untouched for `older_than` seconds); return (count, bytes)."""
    async def gc(self, db: MetadataStore, grace: float, dry_run: bool) -> dict[str, int]:
        """Delete blobs no row references and leftovers of uploads, all untouched for `grace` seconds."""
    async def verify(self, db: MetadataStore) -> tuple[list[str], dict[str, int]]:
        """Re-hash every blob (size and sha256) and check every row against the store."""


class TrainingStore(Protocol):
    """Federated-learning rows: devices, rounds and the updates devices submit (Row columns as in SQLite's)."""

    async def get_device(self, device_id: str | None = None, *, identifier: str | None = None) -> Row | None: ...
    async def register_device(self, row: Row, refresh: Row) -> Row:
        """Insert a device, or (same identifier) refresh its fields; return the stored row."""
    async def update_device(self, device_seq: int, fields: Row) -> None: ...
    async def list_devices(self) -> list[Row]: ...
    async def insert_round(self, row: Row) -> None: ...
    async def get_round(self, round_id: str) -> Row | None: ...
    async def list_rounds(self, model_seq: int | None, status: str | None, limit: int = 200) -> list[Row]: ...
    async def update_round(self, round_seq: int, fields: Row, *, only_status: str | None = None) -> bool: ...
    async def insert_update(self, row: Row, publish: Publish) -> Row:
        """Publish and record an update; the same bytes from the same device on the same base give the stored one."""
    async def list_updates(self, *, round_seq: int | None = None, base_version_seq: int | None = None,
                           status: str | None = None, device_seq: int | None = None) -> list[Row]: ...
    async def insert_aggregate(self, model_seq: int, version: Row, artifacts: list[Row], publish: Publish,
                               round_row: Row | None, round_seq: int | None, fields: Row,
                               update_seqs: Iterable[int]) -> int | None:
        """The aggregated version, its round completed and its updates marked, in one write."""


class MetadataStore(TrainingStore, Protocol):
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
    async def page_versions(self, model_seq: int, limit: int, offset: int, status: str | None) -> tuple[list[Row], int]:
        """A page of versions, newest first, and the count of all of `status` (None: all)."""
    async def get_version(self, model_seq: int, *, number: int | None = None, label: str | None = None) -> Row | None:
        """A version by number, by label, or (neither given) the newest published one."""
    async def update_version(self, version_seq: int, fields: Row) -> None: ...
    async def find_model_nocase(self, name: str) -> Row | None:
        """The model named exactly `name`, else the oldest whose name equals it ignoring ASCII case."""
    async def insert_version(self, model_seq: int, row: Row, model_fields: Row, artifacts: list[Row],
                             publish: Publish) -> int | None:
        """Publish the blob, then add the model's next version and its artifacts; None if the model is gone."""
    async def delete_version(self, version_seq: int) -> bool: ...

    # artifacts (converted formats) and the conversion jobs they queue
    async def list_artifacts(self, version_seq: int) -> list[Row]: ...
    async def get_artifact(self, version_seq: int, fmt: str) -> Row | None: ...
    async def request_artifact(self, version_seq: int, fmt: str, when: str) -> Row:
        """The artifact row, created as a pending job if it does not exist."""
    async def claim_job(self, when: str, owner: str, lease: float) -> Row | None:
        """Lease a pending job, or a running one whose lease ran out (its process died), to `owner` for `lease`
        seconds; each job goes to exactly one claimer. Round-robin by uploading key: the oldest job of the key
        whose last claim is oldest (or who has none), so one key's queue delays another key by at most one job
        per worker. Return it with what the converter needs."""
    async def lease_owners(self) -> set[str]:
        """The owners of running jobs' leases."""
    async def expire_leases(self, owners: list[str]) -> int:
        """End these owners' leases now (their processes are known to be dead); return how many jobs."""
    async def renew_lease(self, artifact_seq: int, owner: str, lease: float) -> bool:
        """Extend `owner`'s lease; False if the job was taken over."""
    async def finish_job(self, artifact_seq: int, owner: str, fields: Row, publish: Publish | None = None) -> bool:
        """Record a job's outcome (publishing its blob first) if `owner` still holds it; else False."""

    # blob objects: an object store's digest -> key map, and the keys of uploads in flight
    async def add_pending_object(self, key: str) -> None: ...
    async def drop_pending_object(self, key: str) -> None: ...
    async def object_key(self, digest: str) -> Row | None: ...
    async def object_rows(self) -> list[Row]: ...
    async def pending_keys(self) -> set[str]: ...
    async def reap_objects(self, cutoff_age: float) -> list[str]:
        """Forget unreferenced objects and in-flight uploads older than `cutoff_age` s; return their keys."""
    async def publish_blob(self, publish: Publish) -> None:
        """Run `publish` in a transaction of its own (a blob copied ahead of its rows)."""
    async def export_rows(self) -> dict[str, list[Row]]:
        """Every row of models, versions, artifacts and api_keys (`migrate`'s source)."""
    async def link_secret(self) -> bytes:
        """The download-link signing key, made on first use, the same for every process of the registry."""
    async def rotate_link_secret(self) -> None:
        """Replace the signing key; links signed with the old one stop working everywhere at once."""

    # three-step uploads: one row per upload-url, its state moved by compare-and-set
    async def insert_direct_upload(self, row: Row) -> None: ...
    async def get_direct_upload(self, storage_key: str) -> Row | None: ...
    async def move_direct_upload(self, storage_key: str, before: str, after: str, fields: Row | None = None) -> bool:
        """Set state `after` (and `fields`) only if the state is `before`; False otherwise."""
    async def delete_direct_upload(self, storage_key: str) -> None: ...
    async def recover_direct_uploads(self) -> None:
        """After a restart: uploads cut short mid-PUT may be PUT again; those cut short mid-confirm are dropped."""
    async def expired_direct_uploads(self, before: int) -> list[Row]: ...
    async def direct_upload_keys(self) -> set[str]: ...

    # federations and the models attached to them
    async def insert_federation(self, row: Row) -> None: ...
    async def get_federation(self, federation_id: str | None = None, *, name: str | None = None) -> Row | None: ...
    async def list_federations(self, name: str | None) -> list[Row]: ...
    async def attach_model(self, federation_seq: int, model_seq: int, when: str) -> bool:
        """Add a model to a federation; False if it already was in it."""
    async def federation_models(self, federation_seq: int) -> list[Row]: ...

    # usage counters
    async def count_events(self, counts: dict[tuple[int, str], int], when: str, max_names: int) -> None:
        """Add to each (model seq, event name) counter, at most `max_names` names a model (the rest: 'other')."""
    async def model_events(self, model_seq: int) -> list[Row]: ...

    # bundles
    async def bundle_rows(self, model_ids: list[str] | None, formats: list[str]) -> tuple[list[Row], list[Row],
                                                                                         list[Row]]:
        """(models, versions, ready artifacts in `formats`) of the given models, or of every model when None."""
    async def import_models(self, models: list[Row], resolve: Resolve,
                            publish: Publish | None) -> tuple[list[str], dict[str, int]]:
        """In one write: read what is here of these models (rows with 'versions', each with 'artifacts'), let
        `resolve` decide; with clashes write nothing and return them; `publish` None only checks."""

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


_SCALE_HINT = "pip install 'octomil-lite[scale]'"


def _require(module: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise StorageError(f"This storage configuration needs the Python package '{module}'; {_SCALE_HINT}.")


async def open_metadata(config: Config) -> MetadataStore:
    """`sqlite:///PATH` (default: the data directory's registry.sqlite3) or `postgresql://…`."""
    url = config.database or f"sqlite:///{config.data_dir / 'registry.sqlite3'}"
    if url.startswith(("postgresql://", "postgres://")):
        _require("asyncpg")
        from .postgres import PostgresStore

        return await PostgresStore.open(url)
    if url.startswith("sqlite:///"):
        from .sqlite import SQLiteStore

        path = Path(url.removeprefix("sqlite:///")).expanduser().absolute()
        path.parent.mkdir(parents=True, exist_ok=True)
        return await SQLiteStore.open(path)
    raise StorageError(f"--database takes sqlite:///PATH or postgresql://USER:PASS@HOST:PORT/DB, not '{url[:100]}'.")


def open_blobs(config: Config, db: MetadataStore) -> BlobStore:
    """A directory (default: the data directory's blobs/) or `s3://bucket/prefix`."""
    if config.blobs and config.blobs.startswith("s3://"):
        _require("obstore")
        from .s3 import S3BlobStore

        return S3BlobStore(config.blobs, db, config.data_dir / "tmp")
    if config.blobs and "://" in config.blobs:
        raise StorageError(f"--blobs takes a directory or s3://BUCKET/PREFIX, not '{config.blobs[:100]}'.")
    from .local import LocalBlobStore

    return LocalBlobStore(config.data_dir, Path(config.blobs).expanduser() if config.blobs else None)


async def open_stores(config: Config) -> tuple[MetadataStore, BlobStore]:
    """The stores a Config names: SQLite and a directory by default, PostgreSQL and S3 to scale out."""
    db = await open_metadata(config)
    try:
        return db, open_blobs(config, db)
    except BaseException:
        await db.close()
        raise
