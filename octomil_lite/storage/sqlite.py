"""SQLite metadata store: one writer connection, one reader, WAL; every SQL query of the registry lives here."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import aiosqlite

from ..errors import DISK_FULL
from . import (
    EXPORTED_TABLES,
    REFERENCED,
    STORED_REFERENCES,
    Conflict,
    Publish,
    Recorder,
    Row,
    StorageError,
    StorageFull,
)
from .secret import LinkSecret
from .sqlite_schema import MIGRATIONS
from .sqlite_sdk import _LATEST_JOIN, _MODEL_COLUMNS, SdkTables, _assignments, _insert
from .training import TrainingQueries
from .transfer import TransferQueries

# The next claimable job (pending, or running under a lease that ran out), from the uploading key whose last claim
# is oldest or who has none, oldest first within a key; `claimed` numbers the claims in order.
_CLAIM_NEXT = """
    UPDATE artifacts SET status = 'running', updated_at = ?, lease_owner = ?, lease_expires = ?,
        claimed = (SELECT COALESCE(MAX(claimed), 0) + 1 FROM artifacts)
    WHERE seq = (
        SELECT a.seq FROM artifacts a JOIN versions v ON v.seq = a.version_seq
        WHERE a.status = 'pending' OR (a.status = 'running' AND (a.lease_expires IS NULL OR a.lease_expires < ?))
        ORDER BY (SELECT MAX(b.claimed) FROM artifacts b JOIN versions w ON w.seq = b.version_seq
                  WHERE w.uploaded_by IS v.uploaded_by) NULLS FIRST, a.seq
        LIMIT 1)
    RETURNING seq
"""

@contextmanager
def _translated() -> Iterator[None]:
    """sqlite3's exceptions leave this module as the storage errors the registry knows."""
    try:
        yield
    except sqlite3.IntegrityError as exc:
        raise Conflict("The change clashes with a stored name, label or key; nothing was written.") from exc
    except sqlite3.OperationalError as exc:
        if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(exc):
            raise StorageFull(DISK_FULL) from exc
        raise


def _dict_factory(cursor: sqlite3.Cursor, row: tuple[Any, ...]) -> Row:
    return {col[0]: value for col, value in zip(cursor.description, row)}


async def _connect(path: Path) -> aiosqlite.Connection:
    conn = await aiosqlite.connect(path, isolation_level=None)
    conn.row_factory = _dict_factory
    await conn.execute("PRAGMA busy_timeout = 10000")
    await conn.execute("PRAGMA foreign_keys = ON")
    return conn


def migrate(path: Path) -> None:
    """Create or upgrade the schema (PRAGMA user_version counts the migrations applied)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout = 10000")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("BEGIN IMMEDIATE")
        current = conn.execute("PRAGMA user_version").fetchone()[0]
        if current > len(MIGRATIONS):
            conn.execute("ROLLBACK")
            raise RuntimeError(f"{path} was written by a newer octomil-lite (schema {current}); upgrade octomil-lite")
        for number, script in enumerate(MIGRATIONS[current:], start=current + 1):
            for statement in filter(str.strip, script.split(";")):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number}")
        conn.execute("COMMIT")
    finally:
        conn.close()


def _recorder(conn: aiosqlite.Connection) -> Recorder:
    async def record(digest: str, key: str, size: int) -> str:
        """Map digest -> key in this transaction; the key already mapped wins (publish once)."""
        cur = await conn.execute("DELETE FROM pending_objects WHERE key = ? RETURNING key", (key,))
        if await cur.fetchone() is None:
            raise StorageError("The upload took longer than the gc grace period and was reclaimed; upload again.")
        cur = await conn.execute(
            "INSERT INTO objects (digest, key, size, touched_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (digest) DO UPDATE SET touched_at = excluded.touched_at RETURNING key",
            (digest, key, size, time.time()))
        return str((await cur.fetchone())["key"])  # type: ignore[index]

    return record


class SQLiteStore(TrainingQueries, SdkTables, TransferQueries):
    """The registry's MetadataStore on SQLite; writes are serialised through one connection."""

    _recorder = staticmethod(_recorder)

    def __init__(self, path: Path, reader: aiosqlite.Connection, writer: aiosqlite.Connection):
        self.path = path
        self._secret = LinkSecret(path.parent / "secret.key")
        self._reader = reader
        self._writer = writer
        self._write_lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path) -> SQLiteStore:
        await asyncio.to_thread(migrate, path)
        writer = await _connect(path)
        await writer.execute("PRAGMA synchronous = FULL")
        reader = await _connect(path)
        return cls(path, reader, writer)

    async def close(self) -> None:
        await self._reader.close()
        await self._writer.close()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """BEGIN IMMEDIATE on the writer: also excludes a concurrent `gc` in another process."""
        async with self._write_lock:
            with _translated():
                await self._writer.execute("BEGIN IMMEDIATE")
                try:
                    yield self._writer
                except BaseException:
                    await self._writer.execute("ROLLBACK")
                    raise
                await self._writer.execute("COMMIT")

    async def _one(self, sql: str, params: Iterable[Any] = ()) -> Row | None:
        with _translated():
            rows = await self._reader.execute_fetchall(sql, tuple(params))
        return rows[0] if rows else None  # type: ignore[index]

    async def _all(self, sql: str, params: Iterable[Any] = ()) -> list[Row]:
        with _translated():
            return list(await self._reader.execute_fetchall(sql, tuple(params)))  # type: ignore[arg-type]

    # models

    async def insert_model(self, row: Row) -> None:
        async with self.transaction() as conn:
            await conn.execute(*_insert("models", row))

    async def get_model(self, model_id: str | None = None, *, name: str | None = None) -> Row | None:
        """A model by id, or by its unique name."""
        column, value = ("m.id", model_id) if model_id is not None else ("m.name", name)
        return await self._one(f"SELECT {_MODEL_COLUMNS} FROM models m {_LATEST_JOIN} WHERE {column} = ?", (value,))

    async def list_models(self, limit: int, offset: int, filters: Row) -> tuple[list[Row], int]:
        """A page of models, newest first, with the count of all that match `filters` (column: value)."""
        where = [f"m.{column} = ?" for column in filters]
        params = [int(v) if isinstance(v, bool) else v for v in filters.values()]
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = await self._all(
            f"SELECT {_MODEL_COLUMNS} FROM (SELECT * FROM models m {clause} ORDER BY m.seq DESC LIMIT ? OFFSET ?) m "
            f"{_LATEST_JOIN} ORDER BY m.seq DESC", (*params, limit, offset))
        total = await self._one(f"SELECT count(*) AS n FROM models m {clause}", params)
        return rows, total["n"] if total else 0

    async def update_model(self, model_seq: int, fields: Row) -> None:
        if fields:
            async with self.transaction() as conn:
                await conn.execute(f"UPDATE models SET {_assignments(fields)} WHERE seq = ?",
                                   (*fields.values(), model_seq))

    async def delete_model(self, model_seq: int) -> bool:
        async with self.transaction() as conn:
            return (await conn.execute("DELETE FROM models WHERE seq = ?", (model_seq,))).rowcount > 0

    # versions

    async def list_versions(self, model_seq: int) -> list[Row]:
        return await self._all("SELECT * FROM versions WHERE model_seq = ? ORDER BY number", (model_seq,))

    async def get_version(self, model_seq: int, *, number: int | None = None, label: str | None = None) -> Row | None:
        """A version by number, by label, or (neither given) the newest published one."""
        if number is not None:
            return await self._one("SELECT * FROM versions WHERE model_seq = ? AND number = ?", (model_seq, number))
        if label is not None:
            return await self._one("SELECT * FROM versions WHERE model_seq = ? AND label = ?", (model_seq, label))
        return await self._one("SELECT * FROM versions WHERE model_seq = ? AND status = 'published' "
                               "ORDER BY number DESC LIMIT 1", (model_seq,))

    async def update_version(self, version_seq: int, fields: Row) -> None:
        async with self.transaction() as conn:
            await conn.execute(f"UPDATE versions SET {_assignments(fields)} WHERE seq = ?",
                               (*fields.values(), version_seq))

    async def insert_version(self, model_seq: int, row: Row, model_fields: Row, artifacts: list[Row],
                             publish: Publish) -> int | None:
        """Publish the blob, then add the model's next version, atomically; None if the model is gone."""
        async with self.transaction() as conn:
            added = await self._add_version(conn, model_seq, row, model_fields, artifacts, publish)
            return added[0] if added else None

    @staticmethod
    async def _add_version(conn: aiosqlite.Connection, model_seq: int, row: Row, model_fields: Row,
                           artifacts: list[Row], publish: Publish) -> tuple[int, int] | None:
        """Inside a write: the model's next version (number, row seq), or None if the model is gone."""
        cur = await conn.execute(
            "UPDATE models SET next_version = next_version + 1 WHERE seq = ? RETURNING next_version - 1 AS number",
            (model_seq,))
        found = await cur.fetchone()
        if found is None:
            return None
        number: int = found["number"]  # type: ignore[index]
        await publish(_recorder(conn))
        cur = await conn.execute(*_insert("versions", {"model_seq": model_seq, "number": number, **row}))
        version_seq = cur.lastrowid
        if model_fields:
            await conn.execute(f"UPDATE models SET {_assignments(model_fields)} WHERE seq = ?",
                               (*model_fields.values(), model_seq))
        for artifact in artifacts:
            await conn.execute(*_insert("artifacts", {"version_seq": version_seq, **artifact}))
        return number, version_seq  # type: ignore[return-value]

    async def delete_version(self, version_seq: int) -> bool:
        async with self.transaction() as conn:
            return (await conn.execute("DELETE FROM versions WHERE seq = ?", (version_seq,))).rowcount > 0

    # artifacts (converted formats) and their conversion jobs

    async def list_artifacts(self, version_seq: int) -> list[Row]:
        return await self._all("SELECT * FROM artifacts WHERE version_seq = ? ORDER BY seq", (version_seq,))

    async def get_artifact(self, version_seq: int, fmt: str) -> Row | None:
        return await self._one("SELECT * FROM artifacts WHERE version_seq = ? AND format = ?", (version_seq, fmt))

    async def request_artifact(self, version_seq: int, fmt: str, when: str) -> Row:
        """The artifact row for (version, format), creating it as a pending job if it does not exist."""
        async with self.transaction() as conn:
            await conn.execute("INSERT OR IGNORE INTO artifacts (version_seq, format, status, updated_at) "
                               "VALUES (?, ?, 'pending', ?)", (version_seq, fmt, when))
            cur = await conn.execute("SELECT * FROM artifacts WHERE version_seq = ? AND format = ?",
                                     (version_seq, fmt))
            return await cur.fetchone()  # type: ignore[return-value]

    async def claim_job(self, when: str, owner: str, lease: float) -> Row | None:
        """Lease the next job, round-robin by uploading key (see MetadataStore.claim_job), for `lease` seconds."""
        async with self.transaction() as conn:
            now = time.time()
            cur = await conn.execute(_CLAIM_NEXT, (when, owner, now + lease, now))
            claimed = await cur.fetchone()
            if claimed is None:
                return None
            cur = await conn.execute(
                "SELECT a.seq, a.format AS target, v.kind, v.format, v.digest, v.input_shape, v.seq AS version_seq "
                "FROM artifacts a JOIN versions v ON v.seq = a.version_seq WHERE a.seq = ?", (claimed["seq"],))  # type: ignore[index]
            return await cur.fetchone()  # type: ignore[return-value]

    async def lease_owners(self) -> set[str]:
        return {r["lease_owner"] for r in await self._all(
            "SELECT DISTINCT lease_owner FROM artifacts WHERE status = 'running' AND lease_owner IS NOT NULL")}

    async def expire_leases(self, owners: list[str]) -> int:
        """End the leases of processes known to be dead, so their jobs are taken over now."""
        async with self.transaction() as conn:
            marks = ", ".join("?" for _ in owners)
            cur = await conn.execute(f"UPDATE artifacts SET lease_expires = 0 WHERE status = 'running' "
                                     f"AND lease_owner IN ({marks})", owners)
            return cur.rowcount

    async def renew_lease(self, artifact_seq: int, owner: str, lease: float) -> bool:
        """Extend a running job's lease; False if another process has taken the job over."""
        async with self.transaction() as conn:
            cur = await conn.execute("UPDATE artifacts SET lease_expires = ? WHERE seq = ? AND lease_owner = ? "
                                     "AND status = 'running'", (time.time() + lease, artifact_seq, owner))
            return cur.rowcount > 0

    async def finish_job(self, artifact_seq: int, owner: str, fields: Row, publish: Publish | None = None) -> bool:
        """Record a job's outcome if this process still holds its lease (publishing its blob first, atomically)."""
        async with self.transaction() as conn:
            cur = await conn.execute("SELECT seq FROM artifacts WHERE seq = ? AND lease_owner = ? "
                                     "AND status = 'running'", (artifact_seq, owner))
            if await cur.fetchone() is None:
                return False
            if publish is not None:
                await publish(_recorder(conn))
            await conn.execute(f"UPDATE artifacts SET {_assignments(fields)}, lease_owner = NULL, "
                               "lease_expires = NULL WHERE seq = ?", (*fields.values(), artifact_seq))
            return True

    # blob objects (an S3 store's digest -> object key map)

    async def add_pending_object(self, key: str) -> None:
        async with self.transaction() as conn:
            await conn.execute("INSERT INTO pending_objects (key, created_at) VALUES (?, ?)", (key, time.time()))

    async def drop_pending_object(self, key: str) -> None:
        async with self.transaction() as conn:
            await conn.execute("DELETE FROM pending_objects WHERE key = ?", (key,))

    async def object_key(self, digest: str) -> Row | None:
        return await self._one("SELECT key, size FROM objects WHERE digest = ?", (digest,))

    async def object_rows(self) -> list[Row]:
        return await self._all("SELECT digest, key, size FROM objects ORDER BY digest")

    async def pending_keys(self) -> set[str]:
        return {r["key"] for r in await self._all("SELECT key FROM pending_objects")}

    async def reap_objects(self, cutoff_age: float) -> list[str]:
        """Forget unreferenced objects and in-flight uploads untouched for `cutoff_age` s; return their keys."""
        async with self.transaction() as conn:
            cutoff = time.time() - cutoff_age
            cur = await conn.execute(f"DELETE FROM objects WHERE touched_at < ? AND digest NOT IN ({REFERENCED}) "
                                     "RETURNING key", (cutoff,))
            gone = [r["key"] for r in await cur.fetchall()]  # type: ignore[index]
            cur = await conn.execute("DELETE FROM pending_objects WHERE created_at < ? RETURNING key", (cutoff,))
            return gone + [r["key"] for r in await cur.fetchall()]  # type: ignore[index]

    async def publish_blob(self, publish: Publish) -> None:
        """Publish a blob with no row of its own yet (`migrate` copies bytes before the rows naming them)."""
        async with self.transaction() as conn:
            await publish(_recorder(conn))

    async def export_rows(self) -> dict[str, list[Row]]:
        """Every row of the registry's tables, for `migrate`."""
        # Column 1 is seq, or the first half of the key of a table without one.
        return {table: await self._all(f"SELECT * FROM {table} ORDER BY 1, 2") for table in EXPORTED_TABLES}

    async def link_secret(self) -> bytes:
        """The signing key for download links, a file beside the database readable only by its owner; a file
        replaced by `secret rotate` is picked up on the next use."""
        return self._secret.current()

    async def rotate_link_secret(self) -> None:
        self._secret.rotate()

    # storage accounting (gc, verify)

    async def referenced_digests(self) -> set[str]:
        rows = await self._all(REFERENCED)
        return {r["digest"] for r in rows}

    async def delete_unreferenced(self, candidates: set[str], delete: Callable[[str], int]) -> tuple[int, int]:
        """Under the write lock (so no upload can publish and record meanwhile), delete candidates still unused."""
        async with self.transaction() as conn:
            cur = await conn.execute(REFERENCED)
            referenced = {r["digest"] for r in await cur.fetchall()}  # type: ignore[index]
            doomed = candidates - referenced
            return len(doomed), sum(delete(digest) for digest in doomed)

    async def stored_references(self) -> list[Row]:
        """Every row that names a blob, for `verify`."""
        return await self._all(STORED_REFERENCES)

    async def integrity_check(self) -> str:
        row = await self._one("PRAGMA integrity_check")
        return str(next(iter(row.values()))) if row else "no answer"

    # api keys

    async def insert_key(self, row: Row) -> None:
        async with self.transaction() as conn:
            await conn.execute(*_insert("api_keys", row))

    async def find_key(self, key_hash: str) -> Row | None:
        return await self._one("SELECT * FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL", (key_hash,))

    async def list_keys(self) -> list[Row]:
        return await self._all("SELECT name, prefix, scope, created_at, revoked_at FROM api_keys ORDER BY seq")

    async def revoke_key(self, name: str, when: str) -> bool:
        async with self.transaction() as conn:
            cur = await conn.execute("UPDATE api_keys SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
                                     (when, name))
            return cur.rowcount > 0

    async def count_active_keys(self) -> int:
        row = await self._one("SELECT count(*) AS n FROM api_keys WHERE revoked_at IS NULL")
        return row["n"] if row else 0
