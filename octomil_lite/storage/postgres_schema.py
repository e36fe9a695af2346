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
    # 2: federated learning (storage/postgres_training.py), SQLite's migration 3.
    """
    CREATE TABLE devices (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
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
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        model_seq BIGINT NOT NULL REFERENCES models(seq) ON DELETE CASCADE,
        base_version_seq BIGINT REFERENCES versions(seq) ON DELETE SET NULL,
        source TEXT NOT NULL,
        status TEXT NOT NULL,
        config TEXT NOT NULL,
        deadline TEXT,
        created_at TEXT NOT NULL,
        closed_at TEXT,
        result_version_seq BIGINT REFERENCES versions(seq) ON DELETE SET NULL,
        metrics TEXT,
        participants TEXT,
        provenance TEXT
    );
    CREATE INDEX training_rounds_by_model ON training_rounds(model_seq, seq);
    CREATE INDEX training_rounds_by_status ON training_rounds(status, seq);
    CREATE TABLE training_updates (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        model_seq BIGINT NOT NULL REFERENCES models(seq) ON DELETE CASCADE,
        base_version_seq BIGINT NOT NULL REFERENCES versions(seq) ON DELETE CASCADE,
        round_seq BIGINT REFERENCES training_rounds(seq) ON DELETE CASCADE,
        device_seq BIGINT NOT NULL REFERENCES devices(seq) ON DELETE CASCADE,
        update_format TEXT NOT NULL,
        encoding TEXT NOT NULL,
        digest TEXT NOT NULL,
        size BIGINT NOT NULL,
        sample_count BIGINT NOT NULL,
        metrics TEXT NOT NULL,
        status TEXT NOT NULL,
        aggregated_into BIGINT REFERENCES training_rounds(seq) ON DELETE SET NULL,
        submitted_at TEXT NOT NULL
    );
    CREATE INDEX training_updates_by_base ON training_updates(base_version_seq, status);
    CREATE INDEX training_updates_by_round ON training_updates(round_seq, seq);
    CREATE INDEX training_updates_by_digest ON training_updates(digest);
    CREATE INDEX training_updates_by_device ON training_updates(device_seq, round_seq);
    CREATE UNIQUE INDEX training_updates_once ON training_updates(device_seq, base_version_seq, digest);
    """,
    # 3: Octomil SDK surface (issue 16), SQLite's migration 4; existing versions were downloadable: published.
    """
    ALTER TABLE versions ADD COLUMN status TEXT NOT NULL DEFAULT 'published';
    ALTER TABLE versions ADD COLUMN metrics TEXT;
    CREATE INDEX versions_by_status ON versions(model_seq, status, number);
    ALTER TABLE models ADD COLUMN architecture TEXT;
    CREATE TABLE direct_uploads (
        storage_key TEXT PRIMARY KEY,
        model_seq BIGINT NOT NULL REFERENCES models(seq) ON DELETE CASCADE,
        label TEXT NOT NULL,
        filename TEXT NOT NULL,
        expires BIGINT NOT NULL,
        state TEXT NOT NULL,
        digest TEXT,
        size BIGINT
    );
    CREATE TABLE federations (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL UNIQUE,
        description TEXT,
        org_id TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE TABLE federation_models (
        federation_seq BIGINT NOT NULL REFERENCES federations(seq) ON DELETE CASCADE,
        model_seq BIGINT NOT NULL REFERENCES models(seq) ON DELETE CASCADE,
        added_at TEXT NOT NULL,
        PRIMARY KEY (federation_seq, model_seq)
    );
    CREATE TABLE model_events (
        model_seq BIGINT NOT NULL REFERENCES models(seq) ON DELETE CASCADE,
        name TEXT NOT NULL,
        count BIGINT NOT NULL,
        last_at TEXT NOT NULL,
        PRIMARY KEY (model_seq, name)
    );
    """,
    # 4: fair conversion scheduling (issue 12), SQLite's migration 5: who uploaded a version, the claim order
    """
    ALTER TABLE versions ADD COLUMN uploaded_by TEXT;
    ALTER TABLE artifacts ADD COLUMN claimed BIGINT;
    CREATE SEQUENCE artifact_claims;
    CREATE INDEX versions_by_uploader ON versions(uploaded_by);
    """,
]
