"""The SQLite schema as numbered migrations (PRAGMA user_version counts those applied); append, never edit."""

from __future__ import annotations

from .training import TRAINING_TABLES

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
    """
    ALTER TABLE artifacts ADD COLUMN lease_owner TEXT;
    ALTER TABLE artifacts ADD COLUMN lease_expires REAL;
    CREATE TABLE objects (
        digest TEXT PRIMARY KEY,
        key TEXT NOT NULL UNIQUE,
        size INTEGER NOT NULL,
        touched_at REAL NOT NULL
    );
    CREATE TABLE pending_objects (
        key TEXT PRIMARY KEY,
        created_at REAL NOT NULL
    );
    """,
    TRAINING_TABLES,  # 3: federated learning (storage/training.py)
    # 4: Octomil SDK surface (issue 16): version lifecycle and metrics, architecture, three-step uploads,
    # federations, usage counters. Existing versions were downloadable, so they are published.
    """
    ALTER TABLE versions ADD COLUMN status TEXT NOT NULL DEFAULT 'published';
    ALTER TABLE versions ADD COLUMN metrics TEXT;
    CREATE INDEX versions_by_status ON versions(model_seq, status, number);
    ALTER TABLE models ADD COLUMN architecture TEXT;
    CREATE TABLE direct_uploads (
        storage_key TEXT PRIMARY KEY,
        model_seq INTEGER NOT NULL REFERENCES models(seq) ON DELETE CASCADE,
        label TEXT NOT NULL,
        filename TEXT NOT NULL,
        expires INTEGER NOT NULL,
        state TEXT NOT NULL,
        digest TEXT,
        size INTEGER
    );
    CREATE TABLE federations (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL UNIQUE,
        description TEXT,
        org_id TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE TABLE federation_models (
        federation_seq INTEGER NOT NULL REFERENCES federations(seq) ON DELETE CASCADE,
        model_seq INTEGER NOT NULL REFERENCES models(seq) ON DELETE CASCADE,
        added_at TEXT NOT NULL,
        PRIMARY KEY (federation_seq, model_seq)
    );
    CREATE TABLE model_events (
        model_seq INTEGER NOT NULL REFERENCES models(seq) ON DELETE CASCADE,
        name TEXT NOT NULL,
        count INTEGER NOT NULL,
        last_at TEXT NOT NULL,
        PRIMARY KEY (model_seq, name)
    );
    """,
    # 5: fair conversion scheduling (issue 12): who uploaded a version, and the order in which jobs were claimed
    """
    ALTER TABLE versions ADD COLUMN uploaded_by TEXT;
    ALTER TABLE artifacts ADD COLUMN claimed INTEGER;
    CREATE INDEX versions_by_uploader ON versions(uploaded_by);
    """,
]
