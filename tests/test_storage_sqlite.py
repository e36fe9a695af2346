"""What only the SQLite metadata store has: the file in WAL mode, a versioned schema, migrations applied once."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from octomil_lite.storage.sqlite import MIGRATIONS, SQLiteStore, migrate


async def test_database_is_wal_with_versioned_schema(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite3"
    db = await SQLiteStore.open(path)
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

