"""`octomil-lite gc` and `octomil-lite verify` on a real registry, on every storage backend."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
import pytest
from conftest import Server, bearer, blob_location, corrupt_blob, remove_blob, storage_env, stored_blobs

from octomil_lite.config import Config
from octomil_lite.registry import Registry

pytestmark = pytest.mark.backends
T = TypeVar("T")
# A short grace period, so that "untouched for longer than the grace period" takes a short wait on every backend
# (an object's date in a bucket cannot be set back the way a file's mtime can).
GRACE = 2


def cli(config: Config, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "octomil_lite.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **storage_env(config)}, timeout=120, check=False)


def on_stores(config: Config, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run `fn(registry, *args)` on the registry's own stores, opened beside the CLI (no server is running)."""
    async def run() -> T:
        registry = await Registry.open(config)
        try:
            return await fn(registry, *args)
        finally:
            await registry.close()

    return asyncio.run(run())


async def leave_upload(registry: Registry, name: str) -> None:
    """What an upload cut short leaves: a temp file (directory store), an unfinished multipart upload (bucket)."""
    blobs: Any = registry.blobs
    if hasattr(blobs, "root"):
        (blobs.tmp / name).write_bytes(b"x" * 100)
        return
    import obstore

    writer = obstore.open_writer_async(blobs.store, blobs.object_path(f"objects/{name}"), buffer_size=5 * 2**20)
    await writer.write(os.urandom(6 * 2**20))  # more than one part: the multipart upload has begun
    await writer.flush()


async def left_uploads(registry: Registry) -> list[str]:
    """The names of what `leave_upload` left that is still there."""
    blobs: Any = registry.blobs
    if hasattr(blobs, "root"):
        return sorted(p.name for p in blobs.tmp.iterdir())
    from octomil_lite.storage.aws import BucketApi

    uploads = await BucketApi(blobs.settings, blobs.bucket).multipart_uploads(blobs.object_path("objects/"))
    return sorted(key.rsplit("/", 1)[-1] for key, _, _ in uploads)


def _populate(config: Config) -> tuple[str, list[str]]:
    """A model with three versions (two sharing bytes); returns its id and the blob digests."""
    server = Server(config.data_dir, env=storage_env(config))
    try:
        key = cli(config, "keys", "create", "--name", "m").stdout.strip()
        with httpx.Client(base_url=server.url, headers=bearer(key), timeout=30) as client:
            model = client.post("/api/v1/models", json={}).json()
            digests = []
            for payload in (b"\x80\x04K\x01.", b"\x80\x04K\x02.", b"\x80\x04K\x01."):
                resp = client.post(f"/api/v1/models/{model['id']}/versions/upload", files={"file": ("m.pkl", payload)},
                                   data={"format": "sklearn"})
                digests.append(resp.json()["model_hash"].removeprefix("sha256:"))
            assert client.delete(f"/api/v1/models/{model['id']}/versions/2").status_code == 204
    finally:
        server.stop()
    return model["id"], digests


def test_gc_deletes_only_old_unreferenced_blobs_and_temp_files(config: Config) -> None:
    _, digests = _populate(config)
    kept, dropped = (on_stores(config, blob_location, d) for d in digests[:2])
    on_stores(config, leave_upload, "upload-stale")
    written = time.time()
    fresh = cli(config, "gc")
    assert fresh.returncode == 0 and "deleted 0 unreferenced blob(s)" in fresh.stdout, fresh.stdout + fresh.stderr
    assert dropped in on_stores(config, stored_blobs) and on_stores(config, left_uploads) == ["upload-stale"]
    # Let it all age past a short grace period (whole seconds: a bucket dates its objects to the second).
    time.sleep(max(0.0, written + GRACE + 1.1 - time.time()))
    dry = cli(config, "gc", "--dry-run", "--grace", str(GRACE))
    assert "would delete 1 unreferenced blob(s)" in dry.stdout, dry.stdout + dry.stderr
    assert dropped in on_stores(config, stored_blobs) and on_stores(config, left_uploads) == ["upload-stale"]
    done = cli(config, "gc", "--grace", str(GRACE))
    assert "deleted 1 unreferenced blob(s)" in done.stdout and "1 temp file(s)" in done.stdout, done.stdout
    stored = on_stores(config, stored_blobs)
    assert dropped not in stored and kept in stored and on_stores(config, left_uploads) == []
    assert cli(config, "verify").returncode == 0


def test_verify_reports_clean_then_finds_corruption_and_missing_blobs(config: Config) -> None:
    _, digests = _populate(config)
    clean = cli(config, "verify")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "0 problem(s)" in clean.stdout and "1 unreferenced blob(s)" in clean.stdout
    on_stores(config, corrupt_blob, digests[0], b"tampered")
    broken = cli(config, "verify")
    assert broken.returncode == 1 and f"blob {digests[0]} is corrupt" in broken.stdout, broken.stdout
    on_stores(config, remove_blob, digests[0])
    missing = cli(config, "verify")
    assert missing.returncode == 1 and f"points at missing blob {digests[0]}" in missing.stdout, missing.stdout


def test_gc_says_what_the_grace_period_holds_back_and_grace_0_reclaims_it(config: Config) -> None:
    _, digests = _populate(config)
    dropped = on_stores(config, blob_location, digests[1])
    held = cli(config, "gc")
    assert held.returncode == 0 and "deleted 0 unreferenced blob(s)" in held.stdout, held.stdout + held.stderr
    assert "kept 1 unreferenced blob(s), 5 B" in held.stdout and "3600 s grace" in held.stdout
    assert "gc --grace 0" in held.stdout and dropped in on_stores(config, stored_blobs)
    now = cli(config, "gc", "--grace", "0")
    assert "deleted 1 unreferenced blob(s), 5 B" in now.stdout and "kept" not in now.stdout, now.stdout
    assert dropped not in on_stores(config, stored_blobs) and cli(config, "verify").returncode == 0
