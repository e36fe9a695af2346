"""What only the local blob store has: its on-disk layout, read-only files, digest-only paths, symlinks."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from conftest import put_blob as put

from octomil_lite.storage.local import LocalBlobStore


async def test_put_stores_bytes_under_their_digest_read_only(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    data = os.urandom(9 * 1024 * 1024 + 7)
    digest = await put(store, data, chunk=65536)
    assert digest == hashlib.sha256(data).hexdigest()
    path = tmp_path / "blobs" / "sha256" / digest[:2] / digest
    assert path.read_bytes() == data and not path.stat().st_mode & 0o222
    assert store.uri(digest) == path.resolve().as_uri()
    assert list(store.tmp.iterdir()) == []


def test_paths_are_only_built_from_digests(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    for bad in ("../../etc/passwd", "/etc/passwd", "A" * 64, "ab", "0" * 63 + "/"):
        with pytest.raises(ValueError):
            store.path(bad)


async def test_planted_symlink_is_never_followed(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
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
