"""PostgreSQL queries of federated learning (devices, rounds, updates); mixed into PostgresStore."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

from . import Row
from .postgres_sdk import _assignments, _changed, _insert, _translated

if TYPE_CHECKING:
    from . import Publish, Recorder

_ROUND = """
    SELECT r.*, m.id AS model_id, b.number AS base_number, b.label AS base_label,
           res.number AS result_number, res.label AS result_label,
           (SELECT count(*) FROM training_updates u WHERE u.round_seq = r.seq) AS update_count,
           (SELECT count(DISTINCT u.device_seq) FROM training_updates u WHERE u.round_seq = r.seq) AS device_count,
           (SELECT coalesce(sum(u.sample_count), 0)::bigint FROM training_updates u WHERE u.round_seq = r.seq)
               AS sample_total
    FROM training_rounds r JOIN models m ON m.seq = r.model_seq
    LEFT JOIN versions b ON b.seq = r.base_version_seq LEFT JOIN versions res ON res.seq = r.result_version_seq
"""
_UPDATE = """
    SELECT u.*, d.id AS device_id, d.identifier AS device_identifier, b.number AS base_number, r.id AS round_id
    FROM training_updates u JOIN devices d ON d.seq = u.device_seq JOIN versions b ON b.seq = u.base_version_seq
    LEFT JOIN training_rounds r ON r.seq = u.round_seq
"""


def _where(conditions: Iterable[tuple[str, Any]]) -> tuple[str, list[Any]]:
    """A WHERE clause (with $n placeholders) for the conditions whose value is not None."""
    given = [(column, value) for column, value in conditions if value is not None]
    clause = " AND ".join(f"{column} = ${i}" for i, (column, _) in enumerate(given, start=1))
    return (f"WHERE {clause}" if given else ""), [value for _, value in given]


class PostgresTrainingQueries:
    """Federated-learning rows; PostgresStore supplies the pool, the transactions and the version insert."""

    _pool: Any
    transaction: Callable[[], AbstractAsyncContextManager[Any]]
    _add_version: Callable[..., Awaitable[tuple[int, int] | None]]
    _recorder: Callable[..., Recorder]
    _one: Callable[..., Awaitable[Row | None]]
    _all: Callable[..., Awaitable[list[Row]]]

    # devices

    async def get_device(self, device_id: str | None = None, *, identifier: str | None = None) -> Row | None:
        column, value = ("id", device_id) if device_id is not None else ("identifier", identifier)
        return await self._one(f"SELECT * FROM devices WHERE {column} = $1", (value,))

    @_translated
    async def register_device(self, row: Row, refresh: Row) -> Row:
        """Insert a device, or (same identifier) refresh its fields; return the stored row."""
        sql, params = _insert("devices", row)
        stored = await self._pool.fetchrow(
            f"{sql} ON CONFLICT (identifier) DO UPDATE SET {_assignments(refresh, len(row) + 1)} RETURNING *",
            *params, *refresh.values())
        return dict(stored)

    @_translated
    async def update_device(self, device_seq: int, fields: Row) -> None:
        await self._pool.execute(f"UPDATE devices SET {_assignments(fields)} WHERE seq = ${len(fields) + 1}",
                                 *fields.values(), device_seq)

    async def list_devices(self) -> list[Row]:
        return await self._all("SELECT * FROM devices ORDER BY seq")

    # rounds

    @_translated
    async def insert_round(self, row: Row) -> None:
        sql, params = _insert("training_rounds", row)
        await self._pool.execute(sql, *params)

    async def get_round(self, round_id: str) -> Row | None:
        return await self._one(f"{_ROUND} WHERE r.id = $1", (round_id,))

    async def list_rounds(self, model_seq: int | None, status: str | None, limit: int = 200) -> list[Row]:
        clause, params = _where((("r.model_seq", model_seq), ("r.status", status)))
        return await self._all(f"{_ROUND} {clause} ORDER BY r.seq DESC LIMIT ${len(params) + 1}", (*params, limit))

    @_translated
    async def update_round(self, round_seq: int, fields: Row, *, only_status: str | None = None) -> bool:
        """Change a round's fields (when given, only while its status is `only_status`)."""
        n = len(fields)
        guard, params = (f"AND status = ${n + 2}", (only_status,)) if only_status else ("", ())
        done = await self._pool.execute(f"UPDATE training_rounds SET {_assignments(fields)} WHERE seq = ${n + 1} "
                                        f"{guard}", *fields.values(), round_seq, *params)
        return _changed(done)

    # updates

    @_translated
    async def insert_update(self, row: Row, publish: Publish) -> Row:
        """Publish the update's blob and record it, atomically (a concurrent gc cannot take the blob); the same
        bytes from the same device on the same base (a client's retry) give the update already stored."""
        async with self.transaction() as conn:
            # The device row's lock orders a device's concurrent retries, as SQLite's single writer does.
            await conn.execute("SELECT 1 FROM devices WHERE seq = $1 FOR UPDATE", row["device_seq"])
            existing = await conn.fetchrow(
                "SELECT * FROM training_updates WHERE device_seq = $1 AND base_version_seq = $2 AND digest = $3",
                row["device_seq"], row["base_version_seq"], row["digest"])
            if existing is not None:
                return dict(existing)
            await publish(self._recorder(conn))
            sql, params = _insert("training_updates", row)
            await conn.execute(sql, *params)
            return row

    async def list_updates(self, *, round_seq: int | None = None, base_version_seq: int | None = None,
                           status: str | None = None, device_seq: int | None = None) -> list[Row]:
        clause, params = _where((("u.round_seq", round_seq), ("u.base_version_seq", base_version_seq),
                                 ("u.status", status), ("u.device_seq", device_seq)))
        return await self._all(f"{_UPDATE} {clause} ORDER BY u.seq", params)

    @_translated
    async def insert_aggregate(self, model_seq: int, version: Row, artifacts: list[Row], publish: Publish,
                               round_row: Row | None, round_seq: int | None, fields: Row,
                               update_seqs: Iterable[int]) -> int | None:
        """In one transaction: the aggregated version (publishing its blob), its round completed (created,
        completed, when `round_seq` is None) and its updates marked aggregated. The version number, or None if
        the model is gone."""
        async with self.transaction() as conn:
            added = await self._add_version(conn, model_seq, version, {"round_id": version["round_id"]}, artifacts,
                                            publish)
            if added is None:
                return None
            number, version_seq = added
            fields = {**fields, "result_version_seq": version_seq}
            if round_seq is None:
                assert round_row is not None
                sql, params = _insert("training_rounds", {**round_row, **fields}, " RETURNING seq")
                round_seq = await conn.fetchval(sql, *params)
            else:
                await conn.execute(f"UPDATE training_rounds SET {_assignments(fields)} WHERE seq = "
                                   f"${len(fields) + 1}", *fields.values(), round_seq)
            await conn.executemany("UPDATE training_updates SET status = 'aggregated', aggregated_into = $1, "
                                   "round_seq = coalesce(round_seq, $1) WHERE seq = $2",
                                   [(round_seq, s) for s in update_seqs])
            return number
