"""SQLite queries of bundles (export, import: transfer.py); mixed into SQLiteStore."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING

from . import Publish, Resolve, Row

if TYPE_CHECKING:
    import aiosqlite


class TransferQueries:
    """Rows in and out of bundles; the Database supplies the connections and the write transaction."""

    transaction: Callable[[], AbstractAsyncContextManager[aiosqlite.Connection]]
    _all: Callable[..., Awaitable[list[Row]]]

    async def bundle_rows(self, model_ids: list[str] | None, formats: list[str]) -> tuple[list[Row], list[Row],
                                                                                         list[Row]]:
        """(models, versions, ready artifacts in `formats`) of the given models, or of every model when None."""
        where, params = ("", ()) if model_ids is None else ("WHERE id IN (SELECT value FROM json_each(?))",
                                                             (json.dumps(model_ids),))
        models = await self._all(f"SELECT * FROM models {where} ORDER BY seq", params)
        seqs = json.dumps([m["seq"] for m in models])
        versions = await self._all("SELECT * FROM versions WHERE model_seq IN (SELECT value FROM json_each(?)) "
                                   "ORDER BY model_seq, number", (seqs,))
        artifacts = await self._all(
            "SELECT a.* FROM artifacts a JOIN versions v ON v.seq = a.version_seq "
            "WHERE v.model_seq IN (SELECT value FROM json_each(?)) AND a.status = 'ready' "
            "AND a.format IN (SELECT value FROM json_each(?)) ORDER BY a.seq", (seqs, json.dumps(formats)))
        return models, versions, artifacts

    async def import_models(self, models: list[Row], resolve: Resolve,
                            publish: Publish | None) -> tuple[list[str], dict[str, int]]:
        """One transaction: read what is here, let `resolve` decide, then (no clash, not a check) publish and write."""
        async with self.transaction() as conn:
            ids = json.dumps([m["id"] for m in models])
            cur = await conn.execute("SELECT seq, id, next_version FROM models WHERE id IN "
                                     "(SELECT value FROM json_each(?))", (ids,))
            existing = {r["id"]: r for r in await cur.fetchall()}  # type: ignore[index]
            cur = await conn.execute("SELECT id, name FROM models WHERE name IN (SELECT value FROM json_each(?))",
                                     (json.dumps([m["name"] for m in models if m["name"] is not None]),))
            names = {r["name"]: r["id"] for r in await cur.fetchall()}  # type: ignore[index]
            cur = await conn.execute(
                "SELECT m.id AS model_id, v.number, v.label, v.digest FROM versions v JOIN models m "
                "ON m.seq = v.model_seq WHERE m.id IN (SELECT value FROM json_each(?))", (ids,))
            versions: dict[str, list[Row]] = {}
            for r in await cur.fetchall():
                versions.setdefault(r["model_id"], []).append(r)  # type: ignore[index,call-overload]
            clashes, plan = resolve({"models": existing, "names": names, "versions": versions})
            if clashes or publish is None:
                return clashes, {}
            await publish(self._recorder(conn))
            await conn.executemany(
                "INSERT INTO models (id, name, use_case, framework, framework_version, description, is_baseline, "
                "round_id, accuracy, loss, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(m["id"], m["name"], m["use_case"], m["framework"], m["framework_version"], m["description"],
                  m["is_baseline"], m["round_id"], m["accuracy"], m["loss"], m["created_at"]) for m in plan["models"]])
            await conn.executemany("UPDATE models SET next_version = max(next_version, ?) WHERE id = ?",
                                   [(n, model_id) for model_id, n in plan["next_numbers"].items()])
            await conn.executemany(
                "INSERT INTO versions (model_seq, number, label, format, kind, digest, size, description, round_id, "
                "accuracy, loss, input_shape, uploaded_at) SELECT seq, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ? "
                "FROM models WHERE id = ?",
                [(v["number"], v["label"], v["format"], v["kind"], v["digest"], v["size"], v["description"],
                  v["round_id"], v["accuracy"], v["loss"], v["input_shape"], v["uploaded_at"], model_id)
                 for model_id, v in plan["versions"]])
            cur = await conn.executemany(
                "INSERT OR IGNORE INTO artifacts (version_seq, format, status, digest, size, parity, signature, "
                "converter, updated_at) SELECT v.seq, ?, 'ready', ?, ?, ?, ?, ?, ? FROM versions v "
                "JOIN models m ON m.seq = v.model_seq WHERE m.id = ? AND v.number = ?",
                [(a["format"], a["digest"], a["size"], a["parity"], a["signature"], a["converter"], a["updated_at"],
                  model_id, number) for model_id, number, a in plan["artifacts"]])
            return [], {"models": len(plan["models"]), "versions": len(plan["versions"]),
                        "versions_present": plan["present"], "artifacts": max(cur.rowcount, 0)}
