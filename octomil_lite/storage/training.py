"""SQLite queries of federated learning (devices, rounds, updates); mixed into SQLiteStore."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import aiosqlite

Row = dict[str, Any]
Publish = Callable[[], Awaitable[None]]

# Migration 2 (appended to the store's MIGRATIONS): devices, rounds, and the updates devices submit.
TRAINING_TABLES = """
CREATE TABLE devices (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    identifier TEXT NOT NULL UNIQUE,
    key_name TEXT NOT NULL,
    platform TEXT,
    os_version TEXT,
    sdk_version TEXT,
    app_version TEXT,
    metadata TEXT NOT NULL,
    capabilities TEXT NOT NULL,
    status TEXT NOT NULL,
    registered_at TEXT NOT NULL,
    last_seen_at TEXT NOT NULL
);
CREATE TABLE training_rounds (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    model_seq INTEGER NOT NULL REFERENCES models(seq) ON DELETE CASCADE,
    base_version_seq INTEGER REFERENCES versions(seq) ON DELETE SET NULL,
    source TEXT NOT NULL,
    status TEXT NOT NULL,
    config TEXT NOT NULL,
    deadline TEXT,
    created_at TEXT NOT NULL,
    closed_at TEXT,
    result_version_seq INTEGER REFERENCES versions(seq) ON DELETE SET NULL,
    metrics TEXT,
    participants TEXT,
    provenance TEXT
);
CREATE INDEX training_rounds_by_model ON training_rounds(model_seq, seq);
CREATE INDEX training_rounds_by_status ON training_rounds(status, seq);
CREATE TABLE training_updates (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    model_seq INTEGER NOT NULL REFERENCES models(seq) ON DELETE CASCADE,
    base_version_seq INTEGER NOT NULL REFERENCES versions(seq) ON DELETE CASCADE,
    round_seq INTEGER REFERENCES training_rounds(seq) ON DELETE CASCADE,
    device_seq INTEGER NOT NULL REFERENCES devices(seq) ON DELETE CASCADE,
    update_format TEXT NOT NULL,
    encoding TEXT NOT NULL,
    digest TEXT NOT NULL,
    size INTEGER NOT NULL,
    sample_count INTEGER NOT NULL,
    metrics TEXT NOT NULL,
    status TEXT NOT NULL,
    aggregated_into INTEGER REFERENCES training_rounds(seq) ON DELETE SET NULL,
    submitted_at TEXT NOT NULL
);
CREATE INDEX training_updates_by_base ON training_updates(base_version_seq, status);
CREATE INDEX training_updates_by_round ON training_updates(round_seq, seq);
CREATE INDEX training_updates_by_digest ON training_updates(digest);
CREATE INDEX training_updates_by_device ON training_updates(device_seq, round_seq);
CREATE UNIQUE INDEX training_updates_once ON training_updates(device_seq, base_version_seq, digest);
"""

_ROUND = """
    SELECT r.*, m.id AS model_id, b.number AS base_number, b.label AS base_label,
           res.number AS result_number, res.label AS result_label,
           (SELECT count(*) FROM training_updates u WHERE u.round_seq = r.seq) AS update_count,
           (SELECT count(DISTINCT u.device_seq) FROM training_updates u WHERE u.round_seq = r.seq) AS device_count,
           (SELECT coalesce(sum(u.sample_count), 0) FROM training_updates u WHERE u.round_seq = r.seq) AS sample_total
    FROM training_rounds r JOIN models m ON m.seq = r.model_seq
    LEFT JOIN versions b ON b.seq = r.base_version_seq LEFT JOIN versions res ON res.seq = r.result_version_seq
"""
_UPDATE = """
    SELECT u.*, d.id AS device_id, d.identifier AS device_identifier, b.number AS base_number, r.id AS round_id
    FROM training_updates u JOIN devices d ON d.seq = u.device_seq JOIN versions b ON b.seq = u.base_version_seq
    LEFT JOIN training_rounds r ON r.seq = u.round_seq
"""


def _insert(table: str, row: Row) -> tuple[str, tuple[Any, ...]]:
    return f"INSERT INTO {table} ({', '.join(row)}) VALUES ({', '.join('?' for _ in row)})", tuple(row.values())


def _set(fields: Row) -> str:
    return ", ".join(f"{name} = ?" for name in fields)


class TrainingQueries:
    """Federated-learning rows; the Database supplies the connections and the write transaction."""

    transaction: Callable[[], AbstractAsyncContextManager[aiosqlite.Connection]]
    _add_version: Callable[..., Awaitable[tuple[int, int] | None]]
    _one: Callable[..., Awaitable[Row | None]]
    _all: Callable[..., Awaitable[list[Row]]]

    # devices

    async def get_device(self, device_id: str | None = None, *, identifier: str | None = None) -> Row | None:
        column, value = ("id", device_id) if device_id is not None else ("identifier", identifier)
        return await self._one(f"SELECT * FROM devices WHERE {column} = ?", (value,))

    async def register_device(self, row: Row, refresh: Row) -> Row:
        """Insert a device, or (same identifier) refresh its fields; return the stored row."""
        async with self.transaction() as conn:
            cur = await conn.execute(
                f"{_insert('devices', row)[0]} ON CONFLICT(identifier) DO UPDATE SET {_set(refresh)} RETURNING *",
                (*row.values(), *refresh.values()))
            return await cur.fetchone()  # type: ignore[return-value]

    async def update_device(self, device_seq: int, fields: Row) -> None:
        async with self.transaction() as conn:
            await conn.execute(f"UPDATE devices SET {_set(fields)} WHERE seq = ?", (*fields.values(), device_seq))

    async def list_devices(self) -> list[Row]:
        return await self._all("SELECT * FROM devices ORDER BY seq")

    # rounds

    async def insert_round(self, row: Row) -> None:
        async with self.transaction() as conn:
            await conn.execute(*_insert("training_rounds", row))

    async def get_round(self, round_id: str) -> Row | None:
        return await self._one(f"{_ROUND} WHERE r.id = ?", (round_id,))

    async def list_rounds(self, model_seq: int | None, status: str | None, limit: int = 200) -> list[Row]:
        where, params = [], []
        if model_seq is not None:
            where.append("r.model_seq = ?")
            params.append(model_seq)
        if status is not None:
            where.append("r.status = ?")
            params.append(status)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        return await self._all(f"{_ROUND} {clause} ORDER BY r.seq DESC LIMIT ?", (*params, limit))

    async def update_round(self, round_seq: int, fields: Row, *, only_status: str | None = None) -> bool:
        """Change a round's fields (when given, only while its status is `only_status`)."""
        guard, params = ("AND status = ?", (only_status,)) if only_status else ("", ())
        async with self.transaction() as conn:
            cur = await conn.execute(f"UPDATE training_rounds SET {_set(fields)} WHERE seq = ? {guard}",
                                     (*fields.values(), round_seq, *params))
            return cur.rowcount > 0

    # updates

    async def insert_update(self, row: Row, publish: Publish) -> Row:
        """Publish the update's blob and record it, atomically (a concurrent gc cannot take the blob); the same
        bytes from the same device on the same base (a client's retry) give the update already stored."""
        async with self.transaction() as conn:
            cur = await conn.execute(
                "SELECT * FROM training_updates WHERE device_seq = ? AND base_version_seq = ? AND digest = ?",
                (row["device_seq"], row["base_version_seq"], row["digest"]))
            if existing := await cur.fetchone():
                return existing  # type: ignore[return-value]
            await publish()
            await conn.execute(*_insert("training_updates", row))
            return row

    async def list_updates(self, *, round_seq: int | None = None, base_version_seq: int | None = None,
                           status: str | None = None, device_seq: int | None = None) -> list[Row]:
        where, params = [], []
        for column, value in (("u.round_seq", round_seq), ("u.base_version_seq", base_version_seq),
                              ("u.status", status), ("u.device_seq", device_seq)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        return await self._all(f"{_UPDATE} {clause} ORDER BY u.seq", params)

    async def insert_aggregate(self, model_seq: int, version: Row, artifacts: list[Row], publish: Publish,
                               round_row: Row | None, round_seq: int | None, fields: Row,
                               update_seqs: Iterable[int]) -> int | None:
        """In one write: the aggregated version (publishing its blob), its round completed (created, completed,
        when `round_seq` is None) and its updates marked aggregated. The version number, or None if the model
        is gone."""
        async with self.transaction() as conn:
            added = await self._add_version(conn, model_seq, version, {"round_id": version["round_id"]}, artifacts,
                                            publish)
            if added is None:
                return None
            number, version_seq = added
            fields = {**fields, "result_version_seq": version_seq}
            if round_seq is None:
                assert round_row is not None
                cur = await conn.execute(*_insert("training_rounds", {**round_row, **fields}))
                round_seq = cur.lastrowid
            else:
                await conn.execute(f"UPDATE training_rounds SET {_set(fields)} WHERE seq = ?",
                                   (*fields.values(), round_seq))
            await conn.executemany("UPDATE training_updates SET status = 'aggregated', aggregated_into = ?, "
                                   "round_seq = coalesce(round_seq, ?) WHERE seq = ?",
                                   [(round_seq, round_seq, s) for s in update_seqs])
            return number
