"""MetadataStore through its interface only: every backend (the `metadata_store` fixture's params) runs these."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from octomil_lite import storage
from octomil_lite.storage import MetadataStore

VERSION = {"format": "onnx", "kind": "onnx", "digest": "0" * 64, "size": 1, "description": None, "uploaded_at": "t"}


async def _nothing_to_publish(record: storage.Recorder) -> None:
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

    async def publish(record: storage.Recorder) -> None:
        published.append(record)

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


async def test_a_claimed_job_is_leased_to_one_owner_and_taken_over_when_the_lease_runs_out(
        metadata_store: MetadataStore) -> None:
    import asyncio

    seq = await _new_model(metadata_store)
    pending = [{"format": "onnx", "status": "pending", "updated_at": "t"}]
    source = {**VERSION, "kind": "pickle", "format": "sklearn"}
    await metadata_store.insert_version(seq, source, {}, pending, _nothing_to_publish)
    job = await metadata_store.claim_job("t1", "a", 0.5)
    assert job is not None and job["target"] == "onnx" and job["kind"] == "pickle"
    assert await metadata_store.claim_job("t1", "b", 0.5) is None  # leased to a
    assert await metadata_store.renew_lease(job["seq"], "a", 0.5)
    await asyncio.sleep(0.7)  # a stopped renewing (its process died)
    again = await metadata_store.claim_job("t2", "b", 30)
    assert again is not None and again["seq"] == job["seq"]
    assert not await metadata_store.renew_lease(job["seq"], "a", 30)
    assert not await metadata_store.finish_job(job["seq"], "a", {"status": "failed", "reason": "x", "updated_at": "t"})
    assert await metadata_store.finish_job(job["seq"], "b", {"status": "failed", "reason": "x", "updated_at": "t3"})
    assert (await metadata_store.get_artifact(again["version_seq"], "onnx") or {})["status"] == "failed"


async def test_concurrent_claimers_each_get_distinct_jobs(metadata_store: MetadataStore) -> None:
    import asyncio

    seq = await _new_model(metadata_store)
    source = {**VERSION, "kind": "pickle", "format": "sklearn"}
    for i in range(12):
        await metadata_store.insert_version(seq, {**source, "digest": f"{i:064x}"}, {},
                                            [{"format": "onnx", "status": "pending", "updated_at": "t"}],
                                            _nothing_to_publish)
    claims = await asyncio.gather(*(metadata_store.claim_job("t", f"w{i}", 60) for i in range(16)))
    seqs = [c["seq"] for c in claims if c is not None]
    assert len(seqs) == 12 and len(set(seqs)) == 12


async def test_a_digest_maps_to_the_first_object_published(metadata_store: MetadataStore) -> None:
    """Publish once: a second upload of the same bytes learns the key already in force."""
    seq = await _new_model(metadata_store)
    keys = []
    for key in ("objects/first", "objects/second"):
        await metadata_store.add_pending_object(key)

        async def publish(record: storage.Recorder, key: str = key) -> None:
            keys.append(await record("a" * 64, key, 5))

        await metadata_store.insert_version(seq, {**VERSION, "digest": "a" * 64}, {}, [], publish)
    assert keys == ["objects/first", "objects/first"]
    assert await metadata_store.pending_keys() == set()
    assert (await metadata_store.object_key("a" * 64) or {})["key"] == "objects/first"
    assert await metadata_store.reap_objects(0) == []  # still referenced by both versions


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


async def test_names_match_ignoring_ascii_case_only_exact_first(metadata_store: MetadataStore) -> None:
    db = metadata_store
    for model_id, name in (("a", "Mnist"), ("b", "mnist"), ("c", "ÉTÉ")):
        await db.insert_model({"id": model_id, "name": name, "created_at": "t"})
    assert (await db.find_model_nocase("mnist") or {})["id"] == "b"
    assert (await db.find_model_nocase("MNIST") or {})["id"] == "a"  # no exact match: the oldest
    assert (await db.find_model_nocase("éTÉ")) is None  # NOCASE folds ASCII letters only


DEVICE = {"id": "d1", "identifier": "laptop", "key_name": "k", "metadata": "{}", "capabilities": "{}",
          "status": "active", "registered_at": "t", "last_seen_at": "t"}


async def test_training_rows_devices_rounds_updates_and_their_blobs(metadata_store: MetadataStore) -> None:
    db = metadata_store
    seq = await _new_model(db)
    await db.insert_version(seq, VERSION, {}, [], _nothing_to_publish)
    base = await db.get_version(seq)
    assert base is not None
    device = await db.register_device(DEVICE, {"last_seen_at": "u"})
    again = await db.register_device({**DEVICE, "id": "d2"}, {"last_seen_at": "v"})
    assert again["seq"] == device["seq"] and again["id"] == "d1" and again["last_seen_at"] == "v"
    await db.insert_round({"id": "r", "model_seq": seq, "base_version_seq": base["seq"], "source": "api",
                           "status": "open", "config": "{}", "created_at": "t"})
    round_row = await db.get_round("r")
    assert round_row is not None
    update = {"id": "u1", "model_seq": seq, "base_version_seq": base["seq"], "round_seq": round_row["seq"],
              "device_seq": device["seq"], "update_format": "npz", "encoding": "weights", "digest": "b" * 64,
              "size": 7, "sample_count": 5, "metrics": "{}", "status": "pending", "submitted_at": "t"}
    published = []

    async def publish(record: storage.Recorder) -> None:
        published.append(record)

    await db.insert_update(update, publish)
    retried = await db.insert_update({**update, "id": "u2"}, publish)
    assert retried["id"] == "u1" and len(published) == 1  # a client's retry stores nothing new
    assert "b" * 64 in await db.referenced_digests()  # gc keeps update blobs
    assert any(r["digest"] == "b" * 64 for r in await db.stored_references())
    counted = await db.get_round("r")
    assert counted is not None and (counted["update_count"], counted["device_count"], counted["sample_total"]) == (
        1, 1, 5)
    assert [r["id"] for r in await db.list_rounds(seq, "open")] == ["r"]
    assert await db.update_round(round_row["seq"], {"status": "aggregating"}, only_status="open")
    assert not await db.update_round(round_row["seq"], {"status": "aggregating"}, only_status="open")
    [stored] = await db.list_updates(round_seq=round_row["seq"], status="pending")
    number = await db.insert_aggregate(seq, {**VERSION, "digest": "c" * 64, "round_id": "r"}, [], _nothing_to_publish,
                                       None, round_row["seq"], {"status": "completed"}, [stored["seq"]])
    assert number == 2
    done = await db.get_round("r")
    assert done is not None and done["status"] == "completed" and done["result_number"] == 2
    assert [u["status"] for u in await db.list_updates(device_seq=device["seq"])] == ["aggregated"]
    assert await db.insert_aggregate(999, {**VERSION, "round_id": "x"}, [], _nothing_to_publish, None,
                                     round_row["seq"], {}, []) is None


async def test_migrate_rows_carry_every_table_into_postgres(tmp_path: Path, postgres: Any) -> None:
    """export_rows -> import_rows (what `migrate` does) keeps ids, training rows, federations and counters."""
    from octomil_lite.storage.postgres import PostgresStore
    from octomil_lite.storage.sqlite import SQLiteStore

    src = await SQLiteStore.open(tmp_path / "registry.sqlite3")
    dst = await PostgresStore.open(await asyncio.to_thread(postgres.new_database))
    try:
        seq = await _new_model(src)
        await src.insert_version(seq, {**VERSION, "metrics": '{"auc": 0.5}'}, {}, [], _nothing_to_publish)
        base = await src.get_version(seq)
        assert base is not None
        device = await src.register_device(DEVICE, {"last_seen_at": "t"})
        await src.insert_round({"id": "r", "model_seq": seq, "base_version_seq": base["seq"], "source": "api",
                                "status": "open", "config": "{}", "created_at": "t"})
        await src.insert_update({"id": "u", "model_seq": seq, "base_version_seq": base["seq"], "round_seq": 1,
                                 "device_seq": device["seq"], "update_format": "npz", "encoding": "weights",
                                 "digest": "b" * 64, "size": 7, "sample_count": 5, "metrics": "{}",
                                 "status": "pending", "submitted_at": "t"}, _nothing_to_publish)
        await src.insert_federation({"id": "f", "name": "fed", "description": None, "org_id": "o", "created_at": "t"})
        await src.attach_model(1, seq, "t")
        await src.count_events({(seq, "a"): 2}, "t", 10)
        rows = await src.export_rows()
        added = await dst.import_rows(rows, b"s" * 32)
        assert added == {table: len(found) for table, found in rows.items()}
        assert await dst.export_rows() == rows
        assert await dst.import_rows(rows, b"s" * 32) == dict.fromkeys(rows, 0)  # a repeated run adds nothing
        assert "b" * 64 in await dst.referenced_digests()
        await dst.insert_federation({"id": "g", "name": "g", "description": None, "org_id": "o", "created_at": "t"})
        assert (await dst.get_federation("g") or {})["seq"] == 2  # identities continue after the copied rows
    finally:
        await src.close()
        await dst.close()
