"""SQLite metadata store: one writer connection, one reader, WAL; every SQL query of the registry lives here."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import aiosqlite

from ..errors import DISK_FULL
from . import Conflict, Publish, Row, StorageFull

MIGRATIONS: list[str] = [
    """
    CREATE TABLE models (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        name TEXT,
        use_case TEXT,
        framework TEXT,
        framework_version TEXT,
        description TEXT,
        is_baseline INTEGER NOT NULL DEFAULT 0,
        round_id TEXT,
        accuracy REAL,
        loss REAL,
        created_at TEXT NOT NULL,
        next_version INTEGER NOT NULL DEFAULT 1
    );
    CREATE UNIQUE INDEX models_by_name ON models(name) WHERE name IS NOT NULL;
    CREATE INDEX models_by_framework ON models(framework, seq);
    CREATE INDEX models_by_baseline ON models(is_baseline, seq);
    CREATE INDEX models_by_use_case ON models(use_case, seq);
    CREATE TABLE versions (
        seq INTEGER PRIMARY KEY,
        model_seq INTEGER NOT NULL REFERENCES models(seq) ON DELETE CASCADE,
        number INTEGER NOT NULL,
        label TEXT,
        format TEXT NOT NULL,
        kind TEXT NOT NULL,
        digest TEXT NOT NULL,
        size INTEGER NOT NULL,
        description TEXT,
        round_id TEXT,
        accuracy REAL,
        loss REAL,
        input_shape TEXT,
        uploaded_at TEXT NOT NULL,
        UNIQUE (model_seq, number)
    );
    CREATE UNIQUE INDEX versions_by_label ON versions(model_seq, label) WHERE label IS NOT NULL;
    CREATE INDEX versions_by_digest ON versions(digest);
    CREATE TABLE artifacts (
        seq INTEGER PRIMARY KEY,
        version_seq INTEGER NOT NULL REFERENCES versions(seq) ON DELETE CASCADE,
        format TEXT NOT NULL,
        status TEXT NOT NULL,
        reason TEXT,
        digest TEXT,
        size INTEGER,
        parity TEXT,
        signature TEXT,
        converter TEXT,
        updated_at TEXT NOT NULL,
        UNIQUE (version_seq, format)
    );
    CREATE INDEX artifacts_by_status ON artifacts(status, seq);
    CREATE INDEX artifacts_by_digest ON artifacts(digest);
    CREATE TABLE api_keys (
        seq INTEGER PRIMARY KEY,
        name TEXT NOT NULL,
        key_hash TEXT NOT NULL UNIQUE,
        prefix TEXT NOT NULL,
        scope TEXT NOT NULL,
        created_at TEXT NOT NULL,
        revoked_at TEXT
    );
    CREATE UNIQUE INDEX api_keys_active_name ON api_keys(name) WHERE revoked_at IS NULL;
    """,
    # 2: fair conversion scheduling: who uploaded a version, and the order in which jobs were claimed
    """
    ALTER TABLE versions ADD COLUMN uploaded_by TEXT;
    ALTER TABLE artifacts ADD COLUMN claimed INTEGER;
    CREATE INDEX versions_by_uploader ON versions(uploaded_by);
    """,
]

_CLAIM_NEXT = """
    UPDATE artifacts SET status = 'running', updated_at = ?,
        claimed = (SELECT COALESCE(MAX(claimed), 0) + 1 FROM artifacts)
    WHERE seq = (
        SELECT a.seq FROM artifacts a JOIN versions v ON v.seq = a.version_seq WHERE a.status = 'pending'
        ORDER BY (SELECT MAX(b.claimed) FROM artifacts b JOIN versions w ON w.seq = b.version_seq
                  WHERE w.uploaded_by IS v.uploaded_by) NULLS FIRST, a.seq
        LIMIT 1)
    RETURNING seq
"""

_MODEL_COLUMNS = """
    m.seq, m.id, m.name, m.use_case, m.framework, m.framework_version, m.description, m.is_baseline, m.round_id,
    m.accuracy, m.loss, m.created_at, v.digest AS digest, v.size AS size
"""
_LATEST_JOIN = """
    LEFT JOIN versions v ON v.seq = (SELECT seq FROM versions WHERE model_seq = m.seq ORDER BY number DESC LIMIT 1)
"""

_REFERENCED = "SELECT digest FROM versions UNION SELECT digest FROM artifacts WHERE digest IS NOT NULL"


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


def _insert(table: str, row: Row) -> tuple[str, tuple[Any, ...]]:
    return f"INSERT INTO {table} ({', '.join(row)}) VALUES ({', '.join('?' for _ in row)})", tuple(row.values())


def _assignments(fields: Row) -> str:
    return ", ".join(f"{name} = ?" for name in fields)


class SQLiteStore:
    """The registry's MetadataStore on SQLite; writes are serialised through one connection."""

    def __init__(self, reader: aiosqlite.Connection, writer: aiosqlite.Connection):
        self._reader = reader
        self._writer = writer
        self._write_lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path) -> SQLiteStore:
        await asyncio.to_thread(migrate, path)
        writer = await _connect(path)
        await writer.execute("PRAGMA synchronous = FULL")
        reader = await _connect(path)
        return cls(reader, writer)

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
        """A version by number, by label, or (neither given) the newest."""
        if number is not None:
            return await self._one("SELECT * FROM versions WHERE model_seq = ? AND number = ?", (model_seq, number))
        if label is not None:
            return await self._one("SELECT * FROM versions WHERE model_seq = ? AND label = ?", (model_seq, label))
        return await self._one("SELECT * FROM versions WHERE model_seq = ? ORDER BY number DESC LIMIT 1", (model_seq,))

    async def insert_version(self, model_seq: int, row: Row, model_fields: Row, artifacts: list[Row],
                             publish: Publish) -> int | None:
        """Publish the blob, then add the model's next version, atomically; None if the model is gone."""
        async with self.transaction() as conn:
            cur = await conn.execute(
                "UPDATE models SET next_version = next_version + 1 WHERE seq = ? RETURNING next_version - 1 AS number",
                (model_seq,))
            found = await cur.fetchone()
            if found is None:
                return None
            number: int = found["number"]  # type: ignore[index]
            await publish()
            cur = await conn.execute(*_insert("versions", {"model_seq": model_seq, "number": number, **row}))
            version_seq = cur.lastrowid
            if model_fields:
                await conn.execute(f"UPDATE models SET {_assignments(model_fields)} WHERE seq = ?",
                                   (*model_fields.values(), model_seq))
            for artifact in artifacts:
                await conn.execute(*_insert("artifacts", {"version_seq": version_seq, **artifact}))
            return number

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

    async def claim_job(self, when: str) -> Row | None:
        """Mark a pending artifact running and return it with what the converter needs.

        Round-robin by uploader: the oldest pending job of the key whose last claimed job is oldest (or who has
        none), so one key's queue of hostile jobs delays another key by at most one job per worker."""
        async with self.transaction() as conn:
            cur = await conn.execute(_CLAIM_NEXT, (when,))
            claimed = await cur.fetchone()
            if claimed is None:
                return None
            cur = await conn.execute(
                "SELECT a.seq, a.format AS target, v.kind, v.format, v.digest, v.input_shape, v.seq AS version_seq "
                "FROM artifacts a JOIN versions v ON v.seq = a.version_seq WHERE a.seq = ?", (claimed["seq"],))  # type: ignore[index]
            return await cur.fetchone()  # type: ignore[return-value]

    async def finish_job(self, artifact_seq: int, fields: Row, publish: Publish | None = None) -> bool:
        """Record a job's outcome (publishing its blob first, atomically); False if the version is gone."""
        async with self.transaction() as conn:
            cur = await conn.execute("SELECT seq FROM artifacts WHERE seq = ?", (artifact_seq,))
            if await cur.fetchone() is None:
                return False
            if publish is not None:
                await publish()
            await conn.execute(f"UPDATE artifacts SET {_assignments(fields)} WHERE seq = ?",
                               (*fields.values(), artifact_seq))
            return True

    async def requeue_running(self) -> int:
        """After a restart, jobs left running by a dead process go back to pending."""
        async with self.transaction() as conn:
            return (await conn.execute("UPDATE artifacts SET status = 'pending' WHERE status = 'running'")).rowcount

    # storage accounting (gc, verify)

    async def referenced_digests(self) -> set[str]:
        rows = await self._all(_REFERENCED)
        return {r["digest"] for r in rows}

    async def delete_unreferenced(self, candidates: set[str], delete: Callable[[str], int]) -> tuple[int, int]:
        """Under the write lock (so no upload can publish and record meanwhile), delete candidates still unused."""
        async with self.transaction() as conn:
            cur = await conn.execute(_REFERENCED)
            referenced = {r["digest"] for r in await cur.fetchall()}  # type: ignore[index]
            doomed = candidates - referenced
            return len(doomed), sum(delete(digest) for digest in doomed)

    async def stored_references(self) -> list[Row]:
        """Every row that names a blob, for `verify`."""
        return await self._all(
            "SELECT m.id AS model_id, v.number, v.format, v.digest, v.size FROM versions v "
            "JOIN models m ON m.seq = v.model_seq UNION ALL "
            "SELECT m.id, v.number, a.format, a.digest, a.size FROM artifacts a "
            "JOIN versions v ON v.seq = a.version_seq "
            "JOIN models m ON m.seq = v.model_seq WHERE a.digest IS NOT NULL")

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
