"""BlobStore through its interface only: every backend (the `blob_store` fixture's params) runs these."""

from __future__ import annotations

import hashlib
import os

from conftest import put_blob as put

from octomil_lite.storage import BlobStore


async def test_bytes_come_back_by_digest_and_rehash_to_it(blob_store: BlobStore) -> None:
    data = os.urandom(5 * 1024 * 1024 + 3)
    digest = await put(blob_store, data, chunk=65536)
    assert digest == hashlib.sha256(data).hexdigest()
    fd = blob_store.open(digest)
    try:
        assert os.read(fd, len(data) + 1) == data
    finally:
        os.close(fd)
    assert blob_store.rehash(digest) == (digest, len(data))
    assert blob_store.delete(digest) == len(data)
    assert list(blob_store.digests()) == []


async def test_identical_bytes_are_stored_once(blob_store: BlobStore) -> None:
    assert await put(blob_store, b"same") == await put(blob_store, b"same")
    assert list(blob_store.digests()) == [hashlib.sha256(b"same").hexdigest()]
    assert list(blob_store.tmp.iterdir()) == []


async def test_discard_leaves_nothing(blob_store: BlobStore) -> None:
    staged = blob_store.stage()
    await staged.write(b"x" * 5_000_000)
    await staged.discard()
    assert list(blob_store.tmp.iterdir()) == [] and list(blob_store.digests()) == []


def test_sweep_tmp_removes_leftovers(blob_store: BlobStore) -> None:
    (blob_store.tmp / "upload-1").write_bytes(b"partial")
    (blob_store.tmp / "sandbox-x").mkdir()
    count, _ = blob_store.sweep_tmp()
    assert count == 2
    assert list(blob_store.tmp.iterdir()) == []
