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


async def test_versions_page_newest_first_and_latest_skips_unpublished(metadata_store: MetadataStore) -> None:
    db = metadata_store
    seq = await _new_model(db)
    for status in ("published", "published", "draft"):
        await db.insert_version(seq, {**VERSION, "status": status}, {}, [], _nothing_to_publish)
    rows, total = await db.page_versions(seq, 2, 0, None)
    assert [r["number"] for r in rows] == [3, 2] and total == 3
    rows, total = await db.page_versions(seq, 10, 0, "draft")
    assert [r["number"] for r in rows] == [3] and total == 1
    latest = await db.get_version(seq)
    assert latest is not None and latest["number"] == 2
    await db.update_version(latest["seq"], {"status": "deprecated"})
    latest = await db.get_version(seq)
    assert latest is not None and latest["number"] == 1


async def test_direct_upload_states_move_once(metadata_store: MetadataStore) -> None:
    db = metadata_store
    seq = await _new_model(db)
    await db.insert_direct_upload({"storage_key": "k", "model_seq": seq, "label": "1.0", "filename": "f",
                                   "expires": 10, "state": "awaiting"})
    assert await db.move_direct_upload("k", "awaiting", "receiving")
    assert not await db.move_direct_upload("k", "awaiting", "receiving")  # a second PUT
    await db.recover_direct_uploads()
    row = await db.get_direct_upload("k")
    assert row is not None and row["state"] == "awaiting"
    assert [r["storage_key"] for r in await db.expired_direct_uploads(11)] == ["k"]
    await db.delete_direct_upload("k")
    assert await db.direct_upload_keys() == set()


async def test_federations_and_event_counters(metadata_store: MetadataStore) -> None:
    db = metadata_store
    seq = await _new_model(db)
    await db.insert_federation({"id": "f", "name": "fed", "description": None, "org_id": "o", "created_at": "t"})
    with pytest.raises(storage.Conflict):
        await db.insert_federation({"id": "g", "name": "fed", "description": None, "org_id": "o", "created_at": "t"})
    fed = await db.get_federation(name="fed")
    assert fed is not None and [f["id"] for f in await db.list_federations(None)] == ["f"]
    assert await db.attach_model(fed["seq"], seq, "t") and not await db.attach_model(fed["seq"], seq, "t")
    assert [m["id"] for m in await db.federation_models(fed["seq"])] == ["m"]
    await db.count_events({(seq, "a"): 2, (seq, "b"): 1, (seq, "c"): 1}, "t", 3)
    await db.count_events({(seq, "a"): 1, (seq, "d"): 1}, "u", 3)
    counts = {e["name"]: e["count"] for e in await db.model_events(seq)}
    assert counts == {"a": 3, "b": 1, "other": 2}
