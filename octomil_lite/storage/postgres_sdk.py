"""PostgreSQL SQL of the Octomil SDK surface (versions pages, three-step uploads, federations, usage counters),
mixed into PostgresStore; with the query helpers the PostgreSQL modules share."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, TypeVar

from . import Conflict, Row, StorageError

_MODEL_COLUMNS = """
    m.seq, m.id, m.name, m.use_case, m.framework, m.framework_version, m.description, m.is_baseline, m.round_id,
    m.accuracy, m.loss, m.created_at, m.architecture, v.digest AS digest, v.size AS size
"""
_LATEST_JOIN = """
    LEFT JOIN versions v ON v.seq = (SELECT seq FROM versions WHERE model_seq = m.seq ORDER BY number DESC LIMIT 1)
"""
_NOW = "extract(epoch from clock_timestamp())"
# SQLite's COLLATE NOCASE folds ASCII letters only; lower() would fold every script.
_ASCII_FOLD = "translate({}, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz')"


def _insert(table: str, row: Row, returning: str = "") -> tuple[str, list[Any]]:
    placeholders = ", ".join(f"${i}" for i in range(1, len(row) + 1))
    sql = f"INSERT INTO {table} ({', '.join(row)}) VALUES ({placeholders}){returning}"
    return sql, list(row.values())


def _assignments(fields: Row, start: int = 1) -> str:
    return ", ".join(f"{name} = ${i}" for i, name in enumerate(fields, start=start))


def _changed(status: str) -> bool:
    """Whether an asyncpg command tag ("UPDATE 3", "INSERT 0 1", "DELETE 0") counts any row."""
    return status.split()[-1] != "0"


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _translated(method: F) -> F:
    """asyncpg's unique violations leave this module as the storage Conflict the registry knows."""

    @functools.wraps(method)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        import asyncpg

        try:
            return await method(*args, **kwargs)
        except asyncpg.UniqueViolationError as exc:
            raise Conflict("The change clashes with a stored name, label or key; nothing was written.") from exc
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StorageError(f"The PostgreSQL database failed: {str(exc)[:300]}") from exc

    return wrapper  # type: ignore[return-value]


class PostgresSdkTables:
    """Methods of PostgresStore over the SDK surface's tables (and the versions page)."""

    _pool: Any
    if TYPE_CHECKING:
        def transaction(self) -> AbstractAsyncContextManager[Any]: ...
        async def _one(self, sql: str, params: Iterable[Any] = ()) -> Row | None: ...
        async def _all(self, sql: str, params: Iterable[Any] = ()) -> list[Row]: ...

    async def page_versions(self, model_seq: int, limit: int, offset: int, status: str | None) -> tuple[list[Row], int]:
        """A page of a model's versions, newest first, with the count of all that match `status` (None: all)."""
        clause, params = ("AND status = $2", (model_seq, status)) if status else ("", (model_seq,))
        n = len(params)
        rows = await self._all(f"SELECT * FROM versions WHERE model_seq = $1 {clause} ORDER BY number DESC "
                               f"LIMIT ${n + 1} OFFSET ${n + 2}", (*params, limit, offset))
        total = await self._pool.fetchval(f"SELECT count(*) FROM versions WHERE model_seq = $1 {clause}", *params)
        return rows, int(total)

    async def find_model_nocase(self, name: str) -> Row | None:
        """The model named exactly `name`, else the oldest whose name equals it ignoring ASCII case (newer SDKs
        match names that way)."""
        return await self._one(f"SELECT {_MODEL_COLUMNS} FROM models m {_LATEST_JOIN} "
                               f"WHERE {_ASCII_FOLD.format('m.name')} = {_ASCII_FOLD.format('$1')} "
                               "ORDER BY m.name = $1 DESC, m.seq LIMIT 1", (name,))

    # three-step (direct) uploads: upload-url, PUT, confirm-upload

    @_translated
    async def insert_direct_upload(self, row: Row) -> None:
        sql, params = _insert("direct_uploads", row)
        await self._pool.execute(sql, *params)

    async def get_direct_upload(self, storage_key: str) -> Row | None:
        return await self._one("SELECT * FROM direct_uploads WHERE storage_key = $1", (storage_key,))

    @_translated
    async def move_direct_upload(self, storage_key: str, before: str, after: str, fields: Row | None = None) -> bool:
        """Compare-and-set a direct upload's state (one PUT, one confirm); False if it was not in `before`."""
        fields = {"state": after, **(fields or {})}
        n = len(fields)
        done = await self._pool.execute(f"UPDATE direct_uploads SET {_assignments(fields)} "
                                        f"WHERE storage_key = ${n + 1} AND state = ${n + 2}",
                                        *fields.values(), storage_key, before)
        return _changed(done)

    async def delete_direct_upload(self, storage_key: str) -> None:
        await self._pool.execute("DELETE FROM direct_uploads WHERE storage_key = $1", storage_key)

    async def recover_direct_uploads(self) -> None:
        """After a restart: a PUT cut short stored nothing (its URL works again); a confirm cut short lost its
        staged bytes with tmp/ (the upload is gone)."""
        async with self.transaction() as conn:
            await conn.execute("UPDATE direct_uploads SET state = 'awaiting' WHERE state = 'receiving'")
            await conn.execute("DELETE FROM direct_uploads WHERE state = 'confirming'")

    async def expired_direct_uploads(self, before: int) -> list[Row]:
        return await self._all("SELECT * FROM direct_uploads WHERE expires < $1", (before,))

    async def direct_upload_keys(self) -> set[str]:
        return {r["storage_key"] for r in await self._all("SELECT storage_key FROM direct_uploads")}

    # federations (one registry is one organisation)

    @_translated
    async def insert_federation(self, row: Row) -> None:
        sql, params = _insert("federations", row)
        await self._pool.execute(sql, *params)

    async def get_federation(self, federation_id: str | None = None, *, name: str | None = None) -> Row | None:
        column, value = ("id", federation_id) if federation_id is not None else ("name", name)
        return await self._one(f"SELECT * FROM federations WHERE {column} = $1", (value,))

    async def list_federations(self, name: str | None) -> list[Row]:
        if name is not None:
            return await self._all("SELECT * FROM federations WHERE name = $1 ORDER BY seq", (name,))
        return await self._all("SELECT * FROM federations ORDER BY seq")

    @_translated
    async def attach_model(self, federation_seq: int, model_seq: int, when: str) -> bool:
        """Add a model to a federation; False if it already was in it."""
        done = await self._pool.execute("INSERT INTO federation_models VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                                        federation_seq, model_seq, when)
        return _changed(done)

    async def federation_models(self, federation_seq: int) -> list[Row]:
        return await self._all(f"SELECT {_MODEL_COLUMNS} FROM federation_models f JOIN models m ON m.seq = f.model_seq "
                               f"{_LATEST_JOIN} WHERE f.federation_seq = $1 ORDER BY f.added_at, m.seq",
                               (federation_seq,))

    # usage counters from inference and telemetry events

    @_translated
    async def count_events(self, counts: dict[tuple[int, str], int], when: str, max_names: int) -> None:
        """Add to each (model, event name) counter; a model's names past `max_names` count as 'other'."""
        async with self.transaction() as conn:
            for model_seq in sorted({seq for seq, _ in counts}):
                # The model row's lock makes the cap hold across concurrent writers (SQLite has one writer).
                await conn.execute("SELECT 1 FROM models WHERE seq = $1 FOR UPDATE", model_seq)
            for (model_seq, name), n in counts.items():
                seen = await conn.fetchrow("SELECT count(*) AS n, count(*) FILTER (WHERE name = $1) AS known "
                                           "FROM model_events WHERE model_seq = $2", name, model_seq)
                if not seen["known"] and seen["n"] >= max_names - 1 and name != "other":
                    name = "other"
                await conn.execute("INSERT INTO model_events VALUES ($1, $2, $3, $4) ON CONFLICT (model_seq, name) "
                                   "DO UPDATE SET count = model_events.count + EXCLUDED.count, "
                                   "last_at = EXCLUDED.last_at", model_seq, name, n, when)

    async def model_events(self, model_seq: int) -> list[Row]:
        return await self._all("SELECT name, count, last_at FROM model_events WHERE model_seq = $1 ORDER BY name",
                               (model_seq,))
