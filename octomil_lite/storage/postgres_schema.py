"""The PostgreSQL schema: the SQLite one in PostgreSQL types, as numbered migrations; append, never edit."""

from __future__ import annotations

# Numbered like the SQLite migrations; schema_version holds how many are applied.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE models (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        name TEXT,
        use_case TEXT,
        framework TEXT,
        framework_version TEXT,
        description TEXT,
        is_baseline INTEGER NOT NULL DEFAULT 0,
        round_id TEXT,
        accuracy DOUBLE PRECISION,
        loss DOUBLE PRECISION,
        created_at TEXT NOT NULL,
        next_version INTEGER NOT NULL DEFAULT 1
    );
    CREATE UNIQUE INDEX models_by_name ON models(name) WHERE name IS NOT NULL;
    CREATE INDEX models_by_framework ON models(framework, seq);
    CREATE INDEX models_by_baseline ON models(is_baseline, seq);
    CREATE INDEX models_by_use_case ON models(use_case, seq);
    CREATE TABLE versions (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        model_seq BIGINT NOT NULL REFERENCES models(seq) ON DELETE CASCADE,
        number INTEGER NOT NULL,
        label TEXT,
        format TEXT NOT NULL,
        kind TEXT NOT NULL,
        digest TEXT NOT NULL,
        size BIGINT NOT NULL,
        description TEXT,
        round_id TEXT,
        accuracy DOUBLE PRECISION,
        loss DOUBLE PRECISION,
        input_shape TEXT,
        uploaded_at TEXT NOT NULL,
        UNIQUE (model_seq, number)
    );
    CREATE UNIQUE INDEX versions_by_label ON versions(model_seq, label) WHERE label IS NOT NULL;
    CREATE INDEX versions_by_digest ON versions(digest);
    CREATE TABLE artifacts (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        version_seq BIGINT NOT NULL REFERENCES versions(seq) ON DELETE CASCADE,
        format TEXT NOT NULL,
        status TEXT NOT NULL,
        reason TEXT,
        digest TEXT,
        size BIGINT,
        parity TEXT,
        signature TEXT,
        converter TEXT,
        updated_at TEXT NOT NULL,
        lease_owner TEXT,
        lease_expires DOUBLE PRECISION,
        UNIQUE (version_seq, format)
    );
    CREATE INDEX artifacts_by_status ON artifacts(status, seq);
    CREATE INDEX artifacts_by_digest ON artifacts(digest);
    CREATE TABLE api_keys (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        name TEXT NOT NULL,
        key_hash TEXT NOT NULL UNIQUE,
        prefix TEXT NOT NULL,
        scope TEXT NOT NULL,
        created_at TEXT NOT NULL,
        revoked_at TEXT
    );
    CREATE UNIQUE INDEX api_keys_active_name ON api_keys(name) WHERE revoked_at IS NULL;
    CREATE TABLE objects (
        digest TEXT PRIMARY KEY,
        key TEXT NOT NULL UNIQUE,
        size BIGINT NOT NULL,
        touched_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE pending_objects (
        key TEXT PRIMARY KEY,
        created_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE settings (
        name TEXT PRIMARY KEY,
        value BYTEA NOT NULL
    );
    """,
]
