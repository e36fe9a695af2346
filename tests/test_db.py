"""The SQLite file: WAL mode, versioned schema, migrations applied once."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from octomil_lite.db import MIGRATIONS, Database, migrate


async def test_database_is_wal_with_versioned_schema(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite3"
    db = await Database.open(path)
    await db.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    conn.close()
    migrate(path)
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite3"
    migrate(path)
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(RuntimeError, match="newer"):
        migrate(path)


async def test_version_numbers_never_reuse_after_the_model_row_counter(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "r.sqlite3")
    await db.insert_model({"id": "m", "created_at": "t"})
    model = await db.get_model("m")
    assert model is not None
    row = {"format": "onnx", "kind": "onnx", "digest": "0" * 64, "size": 1, "description": None, "uploaded_at": "t"}
    published = []

    async def publish(record: object) -> None:
        published.append(record)

    assert [await db.insert_version(model["seq"], row, {}, [], publish) for _ in range(3)] == [1, 2, 3]
    assert await db.insert_version(999, row, {}, [], publish) is None
    assert len(published) == 3
    await db.close()
