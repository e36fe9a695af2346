"""BlobStore on its own: staging, dedupe, atomic commit, digest-only paths, symlinks, sweeping."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from octomil_lite.blobstore import BlobStore


async def put(store: BlobStore, data: bytes, chunk: int = 1000) -> str:
    staged = store.stage()
    for i in range(0, len(data), chunk):
        await staged.write(data[i : i + chunk])
    await staged.finish()
    return await store.commit(staged)


async def test_put_stores_bytes_under_their_digest_read_only(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    data = os.urandom(9 * 1024 * 1024 + 7)
    digest = await put(store, data, chunk=65536)
    assert digest == hashlib.sha256(data).hexdigest()
    path = tmp_path / "blobs" / "sha256" / digest[:2] / digest
    assert path.read_bytes() == data and not path.stat().st_mode & 0o222
    assert store.uri(digest) == path.resolve().as_uri()
    assert list(store.tmp.iterdir()) == []


async def test_identical_bytes_are_stored_once(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    assert await put(store, b"same") == await put(store, b"same")
    assert list(store.digests()) == [hashlib.sha256(b"same").hexdigest()]
    assert list(store.tmp.iterdir()) == []


async def test_discard_leaves_nothing(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    staged = store.stage()
    await staged.write(b"x" * 5_000_000)
    await staged.discard()
    assert list(store.tmp.iterdir()) == [] and list(store.digests()) == []


def test_paths_are_only_built_from_digests(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    for bad in ("../../etc/passwd", "/etc/passwd", "A" * 64, "ab", "0" * 63 + "/"):
        with pytest.raises(ValueError):
            store.path(bad)


async def test_planted_symlink_is_never_followed(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    secret = tmp_path / "secret"
    secret.write_bytes(b"secret")
    digest = hashlib.sha256(b"payload").hexdigest()
    store.path(digest).parent.mkdir(parents=True)
    store.path(digest).symlink_to(secret)
    with pytest.raises(OSError):
        store.open(digest)
    assert not store.exists(digest)
    assert await put(store, b"payload") == digest
    assert not store.path(digest).is_symlink() and store.path(digest).read_bytes() == b"payload"
    assert secret.read_bytes() == b"secret"


def test_sweep_tmp_removes_leftovers(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    (store.tmp / "upload-1").write_bytes(b"partial")
    (store.tmp / "sandbox-x").mkdir()
    count, _ = store.sweep_tmp()
    assert count == 2
    assert list(store.tmp.iterdir()) == []
