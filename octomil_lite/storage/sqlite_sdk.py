"""SQL of the Octomil SDK surface (versions pages, three-step uploads, federations, usage counters), mixed into
SQLiteStore; with the query helpers both share."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

from . import Row

if TYPE_CHECKING:
    import aiosqlite

_MODEL_COLUMNS = """
    m.seq, m.id, m.name, m.use_case, m.framework, m.framework_version, m.description, m.is_baseline, m.round_id,
    m.accuracy, m.loss, m.created_at, m.architecture, v.digest AS digest, v.size AS size
"""
_LATEST_JOIN = """
    LEFT JOIN versions v ON v.seq = (SELECT seq FROM versions WHERE model_seq = m.seq ORDER BY number DESC LIMIT 1)
"""


def _insert(table: str, row: Row) -> tuple[str, tuple[Any, ...]]:
    return f"INSERT INTO {table} ({', '.join(row)}) VALUES ({', '.join('?' for _ in row)})", tuple(row.values())


def _assignments(fields: Row) -> str:
    return ", ".join(f"{name} = ?" for name in fields)


class SdkTables:
    """Methods of SQLiteStore over the tables of migration 2 (and the versions page)."""

    if TYPE_CHECKING:
        def transaction(self) -> AbstractAsyncContextManager[aiosqlite.Connection]: ...
        async def _one(self, sql: str, params: Iterable[Any] = ()) -> Row | None: ...
        async def _all(self, sql: str, params: Iterable[Any] = ()) -> list[Row]: ...

    async def page_versions(self, model_seq: int, limit: int, offset: int, status: str | None) -> tuple[list[Row], int]:
        """A page of a model's versions, newest first, with the count of all that match `status` (None: all)."""
        clause, params = ("AND status = ?", (model_seq, status)) if status else ("", (model_seq,))
        rows = await self._all(f"SELECT * FROM versions WHERE model_seq = ? {clause} ORDER BY number DESC "
                               "LIMIT ? OFFSET ?", (*params, limit, offset))
        total = await self._one(f"SELECT count(*) AS n FROM versions WHERE model_seq = ? {clause}", params)
        return rows, total["n"] if total else 0


    async def find_model_nocase(self, name: str) -> Row | None:
        """The model named exactly `name`, else the oldest whose name equals it ignoring ASCII case (newer SDKs
        match names that way)."""
        return await self._one(f"SELECT {_MODEL_COLUMNS} FROM models m {_LATEST_JOIN} WHERE m.name = ? COLLATE NOCASE "
                               "ORDER BY m.name = ? DESC, m.seq LIMIT 1", (name, name))


    # three-step (direct) uploads: upload-url, PUT, confirm-upload

    async def insert_direct_upload(self, row: Row) -> None:
        async with self.transaction() as conn:
            await conn.execute(*_insert("direct_uploads", row))

    async def get_direct_upload(self, storage_key: str) -> Row | None:
        return await self._one("SELECT * FROM direct_uploads WHERE storage_key = ?", (storage_key,))

    async def move_direct_upload(self, storage_key: str, before: str, after: str, fields: Row | None = None) -> bool:
        """Compare-and-set a direct upload's state (one PUT, one confirm); False if it was not in `before`."""
        fields = {"state": after, **(fields or {})}
        async with self.transaction() as conn:
            cur = await conn.execute(f"UPDATE direct_uploads SET {_assignments(fields)} "
                                     "WHERE storage_key = ? AND state = ?", (*fields.values(), storage_key, before))
            return cur.rowcount > 0

    async def delete_direct_upload(self, storage_key: str) -> None:
        async with self.transaction() as conn:
            await conn.execute("DELETE FROM direct_uploads WHERE storage_key = ?", (storage_key,))

    async def recover_direct_uploads(self) -> None:
        """After a restart: a PUT cut short stored nothing (its URL works again); a confirm cut short lost its
        staged bytes with tmp/ (the upload is gone)."""
        async with self.transaction() as conn:
            await conn.execute("UPDATE direct_uploads SET state = 'awaiting' WHERE state = 'receiving'")
            await conn.execute("DELETE FROM direct_uploads WHERE state = 'confirming'")

    async def expired_direct_uploads(self, before: int) -> list[Row]:
        return await self._all("SELECT * FROM direct_uploads WHERE expires < ?", (before,))

    async def direct_upload_keys(self) -> set[str]:
        return {r["storage_key"] for r in await self._all("SELECT storage_key FROM direct_uploads")}

    # federations (one registry is one organisation)

    async def insert_federation(self, row: Row) -> None:
        async with self.transaction() as conn:
            await conn.execute(*_insert("federations", row))

    async def get_federation(self, federation_id: str | None = None, *, name: str | None = None) -> Row | None:
        column, value = ("id", federation_id) if federation_id is not None else ("name", name)
        return await self._one(f"SELECT * FROM federations WHERE {column} = ?", (value,))

    async def list_federations(self, name: str | None) -> list[Row]:
        if name is not None:
            return await self._all("SELECT * FROM federations WHERE name = ? ORDER BY seq", (name,))
        return await self._all("SELECT * FROM federations ORDER BY seq")

    async def attach_model(self, federation_seq: int, model_seq: int, when: str) -> bool:
        """Add a model to a federation; False if it already was in it."""
        async with self.transaction() as conn:
            cur = await conn.execute("INSERT OR IGNORE INTO federation_models VALUES (?, ?, ?)",
                                     (federation_seq, model_seq, when))
            return cur.rowcount > 0

    async def federation_models(self, federation_seq: int) -> list[Row]:
        return await self._all(f"SELECT {_MODEL_COLUMNS} FROM federation_models f JOIN models m ON m.seq = f.model_seq "
                               f"{_LATEST_JOIN} WHERE f.federation_seq = ? ORDER BY f.added_at, m.seq",
                               (federation_seq,))

    # usage counters from inference and telemetry events

    async def count_events(self, counts: dict[tuple[int, str], int], when: str, max_names: int) -> None:
        """Add to each (model, event name) counter; a model's names past `max_names` count as 'other'."""
        async with self.transaction() as conn:
            for (model_seq, name), n in counts.items():
                cur = await conn.execute("SELECT count(*) AS n, sum(name = ?) AS known FROM model_events "
                                         "WHERE model_seq = ?", (name, model_seq))
                seen = await cur.fetchone()
                if not seen["known"] and seen["n"] >= max_names - 1 and name != "other":  # type: ignore[index]
                    name = "other"
                await conn.execute("INSERT INTO model_events VALUES (?, ?, ?, ?) ON CONFLICT (model_seq, name) "
                                   "DO UPDATE SET count = count + excluded.count, last_at = excluded.last_at",
                                   (model_seq, name, n, when))

    async def model_events(self, model_seq: int) -> list[Row]:
        return await self._all("SELECT name, count, last_at FROM model_events WHERE model_seq = ? ORDER BY name",
                               (model_seq,))
