"""PostgreSQL metadata (the `scale` extra): the SQLite store's schema and queries, shared by many processes."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

from . import EXPORTED_TABLES, REFERENCED, STORED_REFERENCES, Publish, Recorder, Row, StorageError
from .postgres_schema import MIGRATIONS
from .postgres_sdk import (
    _LATEST_JOIN,
    _MODEL_COLUMNS,
    _NOW,
    PostgresSdkTables,
    _assignments,
    _insert,
    _translated,
)
from .postgres_training import PostgresTrainingQueries

# Serialises schema upgrades of concurrently starting servers.
_MIGRATION_LOCK = 0x6F6D6C


# The next claimable job (pending, or running under a lease that ran out), from the uploading key whose last claim
# is oldest or who has none, oldest first within a key; `claimed` numbers the claims in order (one sequence).
_CLAIM_NEXT = f"""
    UPDATE artifacts SET status = 'running', updated_at = $1, lease_owner = $2, lease_expires = {_NOW} + $3,
        claimed = nextval('artifact_claims')
    WHERE seq = (
        SELECT a.seq FROM artifacts a JOIN versions v ON v.seq = a.version_seq
        WHERE a.status = 'pending' OR (a.status = 'running' AND (a.lease_expires IS NULL OR a.lease_expires < {_NOW}))
        ORDER BY (SELECT MAX(b.claimed) FROM artifacts b JOIN versions w ON w.seq = b.version_seq
                  WHERE w.uploaded_by IS NOT DISTINCT FROM v.uploaded_by) ASC NULLS FIRST, a.seq
        LIMIT 1 FOR UPDATE OF a SKIP LOCKED)
    RETURNING seq
"""


def _recorder(conn: Any) -> Recorder:
    async def record(digest: str, key: str, size: int) -> str:
        """Map digest -> key in this transaction; the key already mapped wins (publish once)."""
        if await conn.fetchval("DELETE FROM pending_objects WHERE key = $1 RETURNING key", key) is None:
            raise StorageError("The upload took longer than the gc grace period and was reclaimed; upload again.")
        return str(await conn.fetchval(
            f"INSERT INTO objects (digest, key, size, touched_at) VALUES ($1, $2, $3, {_NOW}) "
            "ON CONFLICT (digest) DO UPDATE SET touched_at = EXCLUDED.touched_at RETURNING key", digest, key, size))

    return record


class PostgresStore(PostgresTrainingQueries, PostgresSdkTables):
    """The registry's metadata store on PostgreSQL: a connection pool; row locks order concurrent writers."""

    _recorder = staticmethod(_recorder)

    def __init__(self, pool: Any):
        self._pool = pool

    @classmethod
    async def open(cls, url: str) -> PostgresStore:
        import asyncpg

        try:
            # JIT compiled these small queries on every run (a get took 4 ms instead of 0.45): off.
            pool = await asyncpg.create_pool(url, min_size=1, max_size=10, command_timeout=60,
                                             server_settings={"jit": "off"})
        except (OSError, asyncpg.PostgresError) as exc:
            raise StorageError(f"Cannot connect to the PostgreSQL database: {exc}") from None
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (applied INTEGER NOT NULL)")
            current = await conn.fetchval("SELECT applied FROM schema_version")
            if current is None:
                await conn.execute("INSERT INTO schema_version VALUES (0)")
                current = 0
            if current > len(MIGRATIONS):
                raise StorageError(f"The database was written by a newer octomil-lite (schema {current}); "
                                   "upgrade octomil-lite.")
            for number, script in enumerate(MIGRATIONS[current:], start=current + 1):
                await conn.execute(script)
                await conn.execute("UPDATE schema_version SET applied = $1", number)
        return cls(pool)

    async def close(self) -> None:
        await self._pool.close()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Any]:
        async with self._pool.acquire() as conn, conn.transaction():
            yield conn

    async def _one(self, sql: str, params: Iterable[Any] = ()) -> Row | None:
        row = await self._pool.fetchrow(sql, *params)
        return dict(row) if row is not None else None

    async def _all(self, sql: str, params: Iterable[Any] = ()) -> list[Row]:
        return [dict(r) for r in await self._pool.fetch(sql, *params)]

    # models

    @_translated
    async def insert_model(self, row: Row) -> None:
        sql, params = _insert("models", row)
        await self._pool.execute(sql, *params)

    async def get_model(self, model_id: str | None = None, *, name: str | None = None) -> Row | None:
        column, value = ("m.id", model_id) if model_id is not None else ("m.name", name)
        return await self._one(f"SELECT {_MODEL_COLUMNS} FROM models m {_LATEST_JOIN} WHERE {column} = $1", (value,))

    async def list_models(self, limit: int, offset: int, filters: Row) -> tuple[list[Row], int]:
        where = [f"m.{column} = ${i}" for i, column in enumerate(filters, start=1)]
        params = [int(v) if isinstance(v, bool) else v for v in filters.values()]
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        n = len(params)
        rows = await self._all(
            f"SELECT {_MODEL_COLUMNS} FROM (SELECT * FROM models m {clause} ORDER BY m.seq DESC "
            f"LIMIT ${n + 1} OFFSET ${n + 2}) m {_LATEST_JOIN} ORDER BY m.seq DESC", (*params, limit, offset))
        total = await self._pool.fetchval(f"SELECT count(*) FROM models m {clause}", *params)
        return rows, int(total)

    @_translated
    async def update_model(self, model_seq: int, fields: Row) -> None:
        if fields:
            await self._pool.execute(f"UPDATE models SET {_assignments(fields)} WHERE seq = ${len(fields) + 1}",
                                     *fields.values(), model_seq)

    async def delete_model(self, model_seq: int) -> bool:
        return await self._pool.execute("DELETE FROM models WHERE seq = $1", model_seq) != "DELETE 0"

    # versions

    async def list_versions(self, model_seq: int) -> list[Row]:
        return await self._all("SELECT * FROM versions WHERE model_seq = $1 ORDER BY number", (model_seq,))

    async def get_version(self, model_seq: int, *, number: int | None = None, label: str | None = None) -> Row | None:
        if number is not None:
            return await self._one("SELECT * FROM versions WHERE model_seq = $1 AND number = $2", (model_seq, number))
        if label is not None:
            return await self._one("SELECT * FROM versions WHERE model_seq = $1 AND label = $2", (model_seq, label))
        return await self._one("SELECT * FROM versions WHERE model_seq = $1 AND status = 'published' "
                               "ORDER BY number DESC LIMIT 1", (model_seq,))

    @_translated
    async def update_version(self, version_seq: int, fields: Row) -> None:
        await self._pool.execute(f"UPDATE versions SET {_assignments(fields)} WHERE seq = ${len(fields) + 1}",
                                 *fields.values(), version_seq)

    @_translated
    async def insert_version(self, model_seq: int, row: Row, model_fields: Row, artifacts: list[Row],
                             publish: Publish) -> int | None:
        """Number, publish and insert in one transaction: the model row's lock orders concurrent uploads."""
        async with self.transaction() as conn:
            added = await self._add_version(conn, model_seq, row, model_fields, artifacts, publish)
            return added[0] if added else None

    @staticmethod
    async def _add_version(conn: Any, model_seq: int, row: Row, model_fields: Row, artifacts: list[Row],
                           publish: Publish) -> tuple[int, int] | None:
        """Inside a transaction: the model's next version (number, row seq), or None if the model is gone."""
        number = await conn.fetchval(
            "UPDATE models SET next_version = next_version + 1 WHERE seq = $1 RETURNING next_version - 1", model_seq)
        if number is None:
            return None
        await publish(_recorder(conn))
        sql, params = _insert("versions", {"model_seq": model_seq, "number": number, **row}, " RETURNING seq")
        version_seq = await conn.fetchval(sql, *params)
        if model_fields:
            await conn.execute(f"UPDATE models SET {_assignments(model_fields)} WHERE seq = ${len(model_fields) + 1}",
                               *model_fields.values(), model_seq)
        for artifact in artifacts:
            sql, params = _insert("artifacts", {"version_seq": version_seq, **artifact})
            await conn.execute(sql, *params)
        return int(number), int(version_seq)

    async def delete_version(self, version_seq: int) -> bool:
        return await self._pool.execute("DELETE FROM versions WHERE seq = $1", version_seq) != "DELETE 0"

    # artifacts and their conversion jobs

    async def list_artifacts(self, version_seq: int) -> list[Row]:
        return await self._all("SELECT * FROM artifacts WHERE version_seq = $1 ORDER BY seq", (version_seq,))

    async def get_artifact(self, version_seq: int, fmt: str) -> Row | None:
        return await self._one("SELECT * FROM artifacts WHERE version_seq = $1 AND format = $2", (version_seq, fmt))

    async def request_artifact(self, version_seq: int, fmt: str, when: str) -> Row:
        await self._pool.execute("INSERT INTO artifacts (version_seq, format, status, updated_at) "
                                 "VALUES ($1, $2, 'pending', $3) ON CONFLICT DO NOTHING", version_seq, fmt, when)
        found = await self.get_artifact(version_seq, fmt)
        assert found is not None
        return found

    async def claim_job(self, when: str, owner: str, lease: float) -> Row | None:
        """Lease the next job, round-robin by uploading key; SKIP LOCKED gives each job to one claimer."""
        async with self.transaction() as conn:
            seq = await conn.fetchval(_CLAIM_NEXT, when, owner, lease)
            if seq is None:
                return None
            row = await conn.fetchrow(
                "SELECT a.seq, a.format AS target, v.kind, v.format, v.digest, v.input_shape, v.seq AS version_seq "
                "FROM artifacts a JOIN versions v ON v.seq = a.version_seq WHERE a.seq = $1", seq)
            return dict(row)

    async def lease_owners(self) -> set[str]:
        return {r["lease_owner"] for r in await self._all(
            "SELECT DISTINCT lease_owner FROM artifacts WHERE status = 'running' AND lease_owner IS NOT NULL")}

    async def expire_leases(self, owners: list[str]) -> int:
        """End the leases of processes known to be dead, so their jobs are taken over now."""
        done = await self._pool.execute("UPDATE artifacts SET lease_expires = 0 WHERE status = 'running' "
                                        "AND lease_owner = ANY($1::text[])", owners)
        return int(done.split()[-1])

    async def renew_lease(self, artifact_seq: int, owner: str, lease: float) -> bool:
        """Extend a running job's lease; False if another process has taken the job over."""
        done = await self._pool.execute(
            f"UPDATE artifacts SET lease_expires = {_NOW} + $3 WHERE seq = $1 AND lease_owner = $2 "
            "AND status = 'running'", artifact_seq, owner, lease)
        return bool(done != "UPDATE 0")

    async def finish_job(self, artifact_seq: int, owner: str, fields: Row, publish: Publish | None = None) -> bool:
        """Record a job's outcome if this process still holds its lease (publishing its blob in the same commit)."""
        async with self.transaction() as conn:
            held = await conn.fetchval("SELECT seq FROM artifacts WHERE seq = $1 AND lease_owner = $2 "
                                       "AND status = 'running' FOR UPDATE", artifact_seq, owner)
            if held is None:
                return False
            if publish is not None:
                await publish(_recorder(conn))
            await conn.execute(f"UPDATE artifacts SET {_assignments(fields)}, lease_owner = NULL, "
                               f"lease_expires = NULL WHERE seq = ${len(fields) + 1}", *fields.values(), artifact_seq)
            return True

    # blob objects (an S3 store's digest -> object key map)

    async def add_pending_object(self, key: str) -> None:
        await self._pool.execute(f"INSERT INTO pending_objects (key, created_at) VALUES ($1, {_NOW})", key)

    async def drop_pending_object(self, key: str) -> None:
        await self._pool.execute("DELETE FROM pending_objects WHERE key = $1", key)

    async def object_key(self, digest: str) -> Row | None:
        return await self._one("SELECT key, size FROM objects WHERE digest = $1", (digest,))

    async def object_rows(self) -> list[Row]:
        return await self._all("SELECT digest, key, size FROM objects ORDER BY digest")

    async def pending_keys(self) -> set[str]:
        return {r["key"] for r in await self._all("SELECT key FROM pending_objects")}

    async def reap_objects(self, cutoff_age: float) -> list[str]:
        """Forget unreferenced objects and in-flight uploads untouched for `cutoff_age` s; return their keys.

        A committing upload holds its objects row (upserted with a fresh touched_at) or its pending row
        locked until commit, so this DELETE either waits and then skips it, or wins and the upload fails.
        """
        async with self.transaction() as conn:
            gone = await conn.fetch(
                f"DELETE FROM objects WHERE touched_at < {_NOW} - $1 AND digest NOT IN ({REFERENCED}) "
                "RETURNING key", cutoff_age)
            stale = await conn.fetch(f"DELETE FROM pending_objects WHERE created_at < {_NOW} - $1 RETURNING key",
                                     cutoff_age)
        return [r["key"] for r in gone] + [r["key"] for r in stale]

    # storage accounting (gc, verify)

    async def referenced_digests(self) -> set[str]:
        return {r["digest"] for r in await self._all(REFERENCED)}

    async def delete_unreferenced(self, candidates: set[str], delete: Any) -> tuple[int, int]:
        """A local blob directory with PostgreSQL metadata: delete candidates still unused, under a table lock."""
        async with self.transaction() as conn:
            await conn.execute("LOCK TABLE versions, artifacts, training_updates IN SHARE MODE")
            referenced = {r["digest"] for r in await conn.fetch(REFERENCED)}
            doomed = candidates - referenced
            return len(doomed), sum(delete(digest) for digest in doomed)

    async def stored_references(self) -> list[Row]:
        return await self._all(STORED_REFERENCES)

    async def integrity_check(self) -> str:
        missing = await self._pool.fetchval(
            "SELECT count(*) FROM versions v WHERE NOT EXISTS (SELECT 1 FROM models m WHERE m.seq = v.model_seq)")
        return "ok" if missing == 0 else f"{missing} version row(s) without a model"

    # the download-link secret, one for every process

    async def export_rows(self) -> dict[str, list[Row]]:
        """Every row of the registry's tables, for `migrate`."""
        # Column 1 is seq, or the first half of the key of a table without one.
        return {table: await self._all(f"SELECT * FROM {table} ORDER BY 1, 2") for table in EXPORTED_TABLES}

    async def publish_blob(self, publish: Publish) -> None:
        """Publish a blob with no row of its own yet (`migrate` copies bytes before the rows naming them)."""
        async with self.transaction() as conn:
            await publish(_recorder(conn))

    @_translated
    async def import_rows(self, tables: dict[str, list[Row]], secret: bytes) -> dict[str, int]:
        """Copy another registry's rows, ids and numbers kept, in one transaction; rows already here are kept."""
        added = {}
        async with self.transaction() as conn:
            for table, rows in tables.items():
                added[table] = 0
                for row in rows:
                    if table == "artifacts" and row["status"] == "running":
                        row = {**row, "status": "pending"}  # its process is not coming: convert it again here
                    row = {k: v for k, v in row.items() if k not in ("lease_owner", "lease_expires")}
                    sql, params = _insert(table, row)
                    sql = sql.replace(") VALUES (", ") OVERRIDING SYSTEM VALUE VALUES (") + " ON CONFLICT DO NOTHING"
                    added[table] += await conn.execute(sql, *params) != "INSERT 0 0"
                if rows and "seq" in rows[0]:
                    await conn.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'seq'), "
                                       f"GREATEST((SELECT max(seq) FROM {table}), 1))")
            await conn.execute("INSERT INTO settings (name, value) VALUES ('link_secret', $1) "
                               "ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value", secret)
        return added

    async def link_secret(self) -> bytes:
        # Read on every use (one indexed row) so a rotation by any process takes effect everywhere at once.
        value = await self._pool.fetchval("SELECT value FROM settings WHERE name = 'link_secret'")
        if value is None:
            await self._pool.execute("INSERT INTO settings (name, value) VALUES ('link_secret', $1) "
                                     "ON CONFLICT DO NOTHING", secrets.token_bytes(32))
            value = await self._pool.fetchval("SELECT value FROM settings WHERE name = 'link_secret'")
        return bytes(value)

    async def rotate_link_secret(self) -> None:
        await self._pool.execute("INSERT INTO settings (name, value) VALUES ('link_secret', $1) "
                                 "ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value", secrets.token_bytes(32))

    # api keys

    @_translated
    async def insert_key(self, row: Row) -> None:
        sql, params = _insert("api_keys", row)
        await self._pool.execute(sql, *params)

    async def find_key(self, key_hash: str) -> Row | None:
        return await self._one("SELECT * FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL", (key_hash,))

    async def list_keys(self) -> list[Row]:
        return await self._all("SELECT name, prefix, scope, created_at, revoked_at FROM api_keys ORDER BY seq")

    async def revoke_key(self, name: str, when: str) -> bool:
        done = await self._pool.execute("UPDATE api_keys SET revoked_at = $1 WHERE name = $2 AND revoked_at IS NULL",
                                        when, name)
        return bool(done != "UPDATE 0")

    async def count_active_keys(self) -> int:
        return int(await self._pool.fetchval("SELECT count(*) FROM api_keys WHERE revoked_at IS NULL"))
