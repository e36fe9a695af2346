"""Several `octomil-lite serve` processes on one PostgreSQL database and one bucket behave as one registry."""

from __future__ import annotations

import asyncio
import hashlib
import os
import pickle
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import Server, bearer, make_key, storage_urls


@pytest.fixture
def shared(request: pytest.FixtureRequest) -> dict[str, str]:
    """The environment naming one fresh PostgreSQL database and bucket prefix."""
    urls = storage_urls(request, "postgres+s3")
    return {"OCTOMIL_LITE_DATABASE": urls["database"], "OCTOMIL_LITE_BLOBS": urls["blobs"]}


def cli(home: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "octomil_lite.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "OCTOMIL_LITE_HOME": str(home), **env}, timeout=180, check=False)


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def test_32_uploads_over_two_processes_get_distinct_consecutive_numbers(tmp_path: Path,
                                                                        shared: dict[str, str]) -> None:
    servers = [Server(tmp_path / "a", env=shared), Server(tmp_path / "b", env=shared)]
    try:
        key = make_key(tmp_path / "a", env=shared)
        model = httpx.post(f"{servers[0].url}/api/v1/models", json={"name": "shared"}, headers=bearer(key)).json()
        payloads = [b"\x80\x04K" + bytes([i]) + b"." for i in range(32)]

        def upload(i: int) -> dict[str, Any]:
            resp = httpx.post(f"{servers[i % 2].url}/api/v1/models/{model['id']}/versions/upload",
                              headers=bearer(key), files={"file": ("m.pkl", payloads[i])},
                              data={"format": "sklearn"}, timeout=120)
            assert resp.status_code == 201, resp.text
            return resp.json()  # type: ignore[no-any-return]

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(upload, range(32)))
        assert sorted(a["version"] for a in answers) == list(range(1, 33))
        detail = httpx.get(f"{servers[1].url}/api/v1/models/{model['id']}", headers=bearer(key)).json()
        by_number = {v["version"]: v["model_hash"] for v in detail["versions"]}
        assert by_number == {a["version"]: a["model_hash"] for a in answers}
        for answer in answers[:4]:
            got = httpx.get(f"{servers[0].url}/api/v1/models/{model['id']}/versions/{answer['version']}/download",
                            headers=bearer(key))
            assert f"sha256:{hashlib.sha256(got.content).hexdigest()}" == answer["model_hash"]
    finally:
        for server in servers:
            server.stop()


def test_a_version_uploaded_through_one_process_downloads_through_another(tmp_path: Path,
                                                                           shared: dict[str, str]) -> None:
    a, b = Server(tmp_path / "a", env=shared), Server(tmp_path / "b", env=shared)
    try:
        key = make_key(tmp_path / "a", "boss", "admin", env=shared)
        payload = b"\x80\x04" + os.urandom(6 * 1024 * 1024 + 123)  # more than one multipart part
        digest = hashlib.sha256(payload).hexdigest()
        model = httpx.post(f"{a.url}/api/v1/models", json={}, headers=bearer(key)).json()
        up = httpx.post(f"{a.url}/api/v1/models/{model['id']}/versions/upload", headers=bearer(key),
                        files={"file": ("m.pkl", payload)}, data={"format": "sklearn"}, timeout=120)
        assert up.status_code == 201 and up.json()["model_hash"] == f"sha256:{digest}"
        url = f"{b.url}/api/v1/models/{model['id']}/versions/1/download"
        whole = httpx.get(url, headers=bearer(key), timeout=60)
        assert whole.status_code == 200 and whole.content == payload
        assert whole.headers["content-length"] == str(len(payload))
        assert whole.headers["x-model-hash"] == f"sha256:{digest}" and whole.headers["etag"] == f'"{digest}"'
        part = httpx.get(url, headers={**bearer(key), "Range": "bytes=5000000-5000099"})
        assert part.status_code == 206 and part.content == payload[5000000:5000100]
        assert part.headers["content-range"] == f"bytes 5000000-5000099/{len(payload)}"
        tail = httpx.get(url, headers={**bearer(key), "Range": "bytes=-10"})
        assert tail.status_code == 206 and tail.content == payload[-10:]
        head = httpx.head(url, headers=bearer(key))
        assert head.status_code == 200 and head.headers["content-length"] == str(len(payload)) and not head.content
        assert httpx.get(url, headers={**bearer(key), "If-None-Match": f'"{digest}"'}).status_code == 304
        assert httpx.get(url, headers={**bearer(key), "Range": f"bytes={len(payload)}-"}).status_code == 416

        # A link signed by one process works on the other: the secret is in the database.
        signed = httpx.get(f"{a.url}/api/v1/models/{model['id']}/versions/1/download-url", headers=bearer(key))
        link = signed.json()["url"].replace(a.url, b.url)
        assert httpx.get(link, timeout=60).content == payload

        # A key revoked anywhere is refused everywhere, at once.
        other = make_key(tmp_path / "a", "temp", "read", env=shared)
        assert httpx.get(f"{b.url}/api/v1/models", headers=bearer(other)).status_code == 200
        assert cli(tmp_path / "a", shared, "keys", "revoke", "temp").returncode == 0
        for server in (a, b):
            assert httpx.get(f"{server.url}/api/v1/models", headers=bearer(other)).status_code == 401
    finally:
        a.stop()
        b.stop()


def slow_forest() -> bytes:
    from sklearn.ensemble import RandomForestClassifier

    rng = np.random.RandomState(0)
    x = rng.rand(400, 8)
    return pickle.dumps(RandomForestClassifier(n_estimators=150, random_state=0).fit(x, (x[:, 0] > 0.5).astype(int)))


def test_a_conversion_whose_process_is_killed_is_taken_over_by_another(tmp_path: Path,
                                                                        shared: dict[str, str]) -> None:
    lease = ("--conversion-lease", "3")
    a = Server(tmp_path / "a", *lease, env=shared)
    b = None
    try:
        key = make_key(tmp_path / "a", env=shared)
        model = httpx.post(f"{a.url}/api/v1/models", json={}, headers=bearer(key)).json()
        up = httpx.post(f"{a.url}/api/v1/models/{model['id']}/versions/upload", headers=bearer(key),
                        files={"file": ("forest.pkl", slow_forest())}, data={"format": "sklearn"}, timeout=120)
        assert up.status_code == 201 and up.json()["formats"]["onnx"] == "pending"
        detail_url = f"/api/v1/models/{model['id']}/versions/1"
        deadline = time.monotonic() + 60
        while httpx.get(a.url + detail_url, headers=bearer(key)).json()["formats"]["onnx"]["status"] != "running":
            assert time.monotonic() < deadline, "the conversion never started"
            time.sleep(0.02)
        doomed = [a.proc.pid, *children(a.proc.pid)]
        for pid in doomed:
            os.kill(pid, signal.SIGKILL)
        a.proc.wait()
        b = Server(tmp_path / "b", *lease, env=shared)
        deadline = time.monotonic() + 120
        while (status := httpx.get(b.url + detail_url, headers=bearer(key)).json()["formats"]["onnx"])["status"] \
                in ("pending", "running"):
            assert time.monotonic() < deadline, "the other process never finished the job"
            time.sleep(0.2)
        assert status["status"] == "ready", status
        onnx = httpx.get(f"{b.url}{detail_url}/download", params={"format": "onnx"}, headers=bearer(key), timeout=60)
        assert onnx.status_code == 200 and onnx.headers["x-model-hash"] == status["model_hash"]
        import onnxruntime as ort

        session = ort.InferenceSession(onnx.content, providers=["CPUExecutionProvider"])
        x = np.random.RandomState(1).rand(3, 8).astype(np.float32)
        assert session.run(None, {session.get_inputs()[0].name: x})[0].shape == (3,)
    finally:
        a.stop()
        if b is not None:
            b.stop()


async def _abandoned_multipart(blobs_url: str, env: dict[str, str]) -> str:
    """A multipart upload that is started, given one part, and dropped (as by a killed process)."""
    import obstore

    from octomil_lite.storage.s3 import S3BlobStore

    store = S3BlobStore(blobs_url, None, Path("/tmp"))
    writer = obstore.open_writer_async(store.store, store.object_path("objects/abandoned"), buffer_size=5 * 2**20)
    await writer.write(os.urandom(6 * 2**20))
    await writer.flush()
    return store.object_path("objects/abandoned")


def test_gc_reclaims_unreferenced_objects_and_aborts_stale_multipart_uploads(tmp_path: Path,
                                                                             shared: dict[str, str]) -> None:
    server = Server(tmp_path / "a", env=shared)
    try:
        key = make_key(tmp_path / "a", env=shared)
        model = httpx.post(f"{server.url}/api/v1/models", json={}, headers=bearer(key)).json()
        for payload in (b"\x80\x04K\x01.", b"\x80\x04K\x02."):
            assert httpx.post(f"{server.url}/api/v1/models/{model['id']}/versions/upload", headers=bearer(key),
                              files={"file": ("m.pkl", payload)}, data={"format": "sklearn"}).status_code == 201
        assert httpx.delete(f"{server.url}/api/v1/models/{model['id']}/versions/2",
                            headers=bearer(key)).status_code == 204
    finally:
        server.stop()
    asyncio.run(_abandoned_multipart(shared["OCTOMIL_LITE_BLOBS"], shared))
    home = tmp_path / "a"
    kept = cli(home, shared, "gc")  # the default grace protects everything just written
    assert kept.returncode == 0 and "deleted 0 unreferenced" in kept.stdout, kept.stdout + kept.stderr
    done = cli(home, shared, "gc", "--grace", "0")
    assert done.returncode == 0 and "deleted 1 unreferenced blob(s)" in done.stdout, done.stdout + done.stderr
    assert "1 temp file(s)" in done.stdout  # the abandoned multipart upload, aborted
    again = cli(home, shared, "gc", "--grace", "0")
    assert "deleted 0 unreferenced blob(s)" in again.stdout and "0 temp file(s)" in again.stdout
    checked = cli(home, shared, "verify")
    assert checked.returncode == 0 and "checked 1 blob(s)" in checked.stdout, checked.stdout


def test_verify_rehashes_every_object_in_the_bucket(tmp_path: Path, shared: dict[str, str]) -> None:
    server = Server(tmp_path / "a", env=shared)
    try:
        key = make_key(tmp_path / "a", env=shared)
        model = httpx.post(f"{server.url}/api/v1/models", json={}, headers=bearer(key)).json()
        body = httpx.post(f"{server.url}/api/v1/models/{model['id']}/versions/upload", headers=bearer(key),
                          files={"file": ("m.pkl", b"\x80\x04K\x07.")}, data={"format": "sklearn"}).json()
    finally:
        server.stop()
    assert cli(tmp_path / "a", shared, "verify").returncode == 0

    async def corrupt() -> None:
        import obstore

        from octomil_lite.config import Config
        from octomil_lite.storage import open_metadata
        from octomil_lite.storage.s3 import S3BlobStore

        db = await open_metadata(Config(data_dir=tmp_path / "a", database=shared["OCTOMIL_LITE_DATABASE"]))
        row = await db.object_key(body["model_hash"].removeprefix("sha256:"))
        store = S3BlobStore(shared["OCTOMIL_LITE_BLOBS"], db, tmp_path / "t")
        await obstore.put_async(store.store, store.object_path(row["key"]), b"\x80\x04K\x08.")
        await db.close()

    asyncio.run(corrupt())
    out = cli(tmp_path / "a", shared, "verify")
    assert out.returncode == 1 and "is corrupt" in out.stdout, out.stdout + out.stderr


def test_migrate_copies_a_single_machine_registry_and_resumes(tmp_path: Path, shared: dict[str, str]) -> None:
    home = tmp_path / "single"
    old = Server(home)
    try:
        key = make_key(home, "ci", "write")
        model = httpx.post(f"{old.url}/api/v1/models", json={"name": "m", "framework": "sklearn"},
                           headers=bearer(key)).json()
        payloads = [b"\x80\x04" + os.urandom(3 * 2**20), b"\x80\x04K\x02."]
        for i, payload in enumerate(payloads):
            assert httpx.post(f"{old.url}/api/v1/models/{model['id']}/versions/upload", headers=bearer(key),
                              files={"file": ("m.pkl", payload)}, timeout=60,
                              data={"format": "sklearn", "version": f"1.{i}", "accuracy": "0.9"}).status_code == 201
        link = httpx.get(f"{old.url}/api/v1/models/{model['id']}/versions/1.0/download-url",
                         headers=bearer(key)).json()["url"]
        before = httpx.get(f"{old.url}/api/v1/models/{model['id']}", headers=bearer(key)).json()
    finally:
        old.stop()
    sqlite_bytes = (home / "registry.sqlite3").read_bytes()
    target = ["migrate", "--to-database", shared["OCTOMIL_LITE_DATABASE"], "--to-blobs", shared["OCTOMIL_LITE_BLOBS"]]
    first = cli(home, {}, *target)
    assert first.returncode == 0 and "blobs_copied 2" in first.stdout, first.stdout + first.stderr
    again = cli(home, {}, *target)  # an interrupted or repeated run copies only what is missing
    assert again.returncode == 0 and "blobs_copied 0, blobs_present 2" in again.stdout, again.stdout + again.stderr
    assert (home / "registry.sqlite3").read_bytes() == sqlite_bytes
    new = Server(tmp_path / "scaled", env=shared)
    try:
        after = httpx.get(f"{new.url}/api/v1/models/{model['id']}", headers=bearer(key)).json()
        assert {k: v for k, v in after.items() if k != "model_path"} == \
            {k: v for k, v in before.items() if k != "model_path"}
        got = httpx.get(link.replace(old.url, new.url), timeout=60)  # the link secret came along
        assert got.status_code == 200 and got.content == payloads[0]
        up = httpx.post(f"{new.url}/api/v1/models/{model['id']}/versions/upload", headers=bearer(key),
                        files={"file": ("m.pkl", b"\x80\x04K\x03.")}, data={"format": "sklearn"})
        assert up.status_code == 201 and up.json()["version"] == 3  # numbering continues
    finally:
        new.stop()
    assert cli(tmp_path / "scaled", shared, "verify").returncode == 0


def test_presigned_downloads_hand_out_the_buckets_own_url(tmp_path: Path, shared: dict[str, str]) -> None:
    server = Server(tmp_path / "a", "--presigned-downloads", env=shared)
    try:
        key = make_key(tmp_path / "a", env=shared)
        model = httpx.post(f"{server.url}/api/v1/models", json={}, headers=bearer(key)).json()
        payload = b"\x80\x04" + os.urandom(70000)
        assert httpx.post(f"{server.url}/api/v1/models/{model['id']}/versions/upload", headers=bearer(key),
                          files={"file": ("m.pkl", payload)}, data={"format": "sklearn"}).status_code == 201
        signed = httpx.get(f"{server.url}/api/v1/models/{model['id']}/versions/1/download-url",
                           headers=bearer(key), params={"expires_in": 60}).json()
        assert signed["url"].startswith(os.environ["AWS_ENDPOINT_URL"]) and "X-Amz-Signature" in signed["url"]
        got = httpx.get(signed["url"], timeout=60)
        assert got.status_code == 200 and got.content == payload
        assert httpx.get(signed["url"].replace("X-Amz-Signature=", "X-Amz-Signature=0")).status_code == 403
    finally:
        server.stop()


async def test_gc_never_takes_an_object_a_committing_upload_needs(tmp_path: Path, shared: dict[str, str]) -> None:
    """In flight within the grace period: kept. Reaped by gc (grace 0): the commit fails, no row names it."""
    from octomil_lite import storage
    from octomil_lite.config import Config

    config = Config(data_dir=tmp_path / "d", database=shared["OCTOMIL_LITE_DATABASE"],
                    blobs=shared["OCTOMIL_LITE_BLOBS"])
    db, blobs = await storage.open_stores(config)
    try:
        await db.insert_model({"id": "m", "created_at": "t"})
        seq = (await db.get_model("m"))["seq"]  # type: ignore[index]

        async def staged_upload(data: bytes) -> Any:
            staged = blobs.stage()
            await staged.write(data)
            await staged.finish()
            return staged

        def version(staged: Any) -> dict[str, Any]:
            return {"format": "sklearn", "kind": "pickle", "digest": staged.digest, "size": staged.size,
                    "uploaded_at": "t"}

        kept = await staged_upload(b"\x80\x04K\x01.")
        assert (await blobs.gc(db, 3600, False))["blobs"] == 0  # another process's gc, mid-upload
        assert await db.insert_version(seq, version(kept), {}, [],
                                       lambda record: blobs.commit(kept, record)) == 1
        await kept.discard()
        reaped = await staged_upload(b"\x80\x04K\x02.")
        assert (await blobs.gc(db, 0, False))["blobs"] == 1  # an impatient gc takes the in-flight object
        with pytest.raises(storage.StorageError, match="gc grace"):
            await db.insert_version(seq, version(reaped), {}, [], lambda record: blobs.commit(reaped, record))
        await reaped.discard()
        assert [v["number"] for v in await db.list_versions(seq)] == [1]
        problems, counts = await blobs.verify(db)
        assert problems == [] and counts["blobs"] == 1
    finally:
        await db.close()
