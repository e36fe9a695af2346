"""MetadataStore through its interface only: every backend (the `metadata_store` fixture's params) runs these."""

from __future__ import annotations

import pytest

from octomil_lite import storage
from octomil_lite.storage import MetadataStore

VERSION = {"format": "onnx", "kind": "onnx", "digest": "0" * 64, "size": 1, "description": None, "uploaded_at": "t"}


async def _nothing_to_publish() -> None:
    pass


async def _new_model(store: MetadataStore) -> int:
    await store.insert_model({"id": "m", "created_at": "t"})
    model = await store.get_model("m")
    assert model is not None
    return int(model["seq"])


async def test_version_numbers_never_reuse_after_the_model_row_counter(metadata_store: MetadataStore) -> None:
    db = metadata_store
    seq = await _new_model(db)
    published = []

    async def publish() -> None:
        published.append(1)

    assert [await db.insert_version(seq, VERSION, {}, [], publish) for _ in range(3)] == [1, 2, 3]
    assert await db.insert_version(999, VERSION, {}, [], publish) is None
    assert len(published) == 3


async def test_a_duplicate_model_name_is_a_storage_conflict(metadata_store: MetadataStore) -> None:
    await metadata_store.insert_model({"id": "a", "name": "same", "created_at": "t"})
    with pytest.raises(storage.Conflict):
        await metadata_store.insert_model({"id": "b", "name": "same", "created_at": "t"})
    rows, total = await metadata_store.list_models(10, 0, {})
    assert total == 1 and [r["id"] for r in rows] == ["a"]


async def test_a_duplicate_version_label_is_a_storage_conflict(metadata_store: MetadataStore) -> None:
    seq = await _new_model(metadata_store)
    labelled = {**VERSION, "label": "prod"}
    assert await metadata_store.insert_version(seq, labelled, {}, [], _nothing_to_publish) == 1
    with pytest.raises(storage.Conflict):
        await metadata_store.insert_version(seq, labelled, {}, [], _nothing_to_publish)
    assert [v["number"] for v in await metadata_store.list_versions(seq)] == [1]


async def test_an_active_key_name_is_unique_until_revoked(metadata_store: MetadataStore) -> None:
    key = {"name": "ci", "key_hash": "h1", "prefix": "p", "scope": "read", "created_at": "t"}
    await metadata_store.insert_key(key)
    with pytest.raises(storage.Conflict):
        await metadata_store.insert_key({**key, "key_hash": "h2"})
    assert await metadata_store.revoke_key("ci", "t2")
    await metadata_store.insert_key({**key, "key_hash": "h2"})
    assert await metadata_store.count_active_keys() == 1
    assert (await metadata_store.find_key("h2") or {}).get("name") == "ci"
    assert await metadata_store.find_key("h1") is None


async def test_a_claimed_job_is_requeued_after_a_restart(metadata_store: MetadataStore) -> None:
    seq = await _new_model(metadata_store)
    pending = [{"format": "onnx", "status": "pending", "updated_at": "t"}]
    source = {**VERSION, "kind": "pickle", "format": "sklearn"}
    await metadata_store.insert_version(seq, source, {}, pending, _nothing_to_publish)
    job = await metadata_store.claim_job("t1")
    assert job is not None and job["target"] == "onnx" and job["kind"] == "pickle"
    assert await metadata_store.claim_job("t1") is None
    assert await metadata_store.requeue_running() == 1
    again = await metadata_store.claim_job("t2")
    assert again is not None and again["seq"] == job["seq"]
    assert await metadata_store.finish_job(job["seq"], {"status": "failed", "reason": "x", "updated_at": "t3"})
