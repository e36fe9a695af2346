"""The three-step upload of newer Octomil SDKs (v4.2.0+), as plain HTTP exactly as they send it, to a real server.

upload-url (form: version, filename, content_type) -> PUT the raw bytes to upload_url with no key ->
confirm-upload (form: version, storage_key, file_size, description).
"""

from __future__ import annotations

import hashlib
import io
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Api, Server, bearer, make_key


def _upload_url(client: httpx.Client, base: str, model_id: str, version: str, filename: str) -> httpx.Response:
    return client.post(f"{base}/models/{model_id}/versions/upload-url",
                       data={"version": version, "filename": filename, "content_type": "application/octet-stream"})


def _confirm(client: httpx.Client, base: str, model_id: str, version: str, storage_key: str, size: int,
             description: str = "") -> httpx.Response:
    return client.post(f"{base}/models/{model_id}/versions/confirm-upload",
                       data={"version": version, "storage_key": storage_key, "file_size": str(size),
                             "description": description})


def _put(url: str, data: bytes) -> httpx.Response:
    # The SDK streams an open file with no key: `client.put(presigned_url, content=f, headers=...)`.
    with httpx.Client(timeout=60) as bare:
        return bare.put(url, content=io.BytesIO(data), headers={"Content-Type": "application/octet-stream"})


@pytest.fixture
def setup(tmp_path: Path) -> Any:
    server = Server(tmp_path / "data", "--max-upload-size", "100000")
    key = make_key(server.data_dir)
    client = httpx.Client(headers=bearer(key), timeout=60)
    base = f"{server.url}/api/v1"
    # Newer SDKs send org_id as a query parameter on POST /models.
    model = client.post(f"{base}/models", params={"org_id": "default"},
                        json={"name": "Direct", "framework": "sklearn", "use_case": "x", "description": ""}).json()
    yield server, client, base, model
    client.close()
    server.stop()


def _leftovers(server: Server) -> list[str]:
    found = [p.name for d in ("uploads", "tmp") for p in (server.data_dir / d).iterdir()]
    return found


def test_three_steps_make_the_same_version_as_a_multipart_upload(setup: Any, onnx_bytes: bytes) -> None:
    server, client, base, model = setup
    got = _upload_url(client, base, model["id"], "1.0.0", "model.onnx")
    assert got.status_code == 200, got.text
    body = got.json()
    assert body["upload_url"].startswith(server.url + "/signed/") and body["storage_key"].startswith("upload-")
    put = _put(body["upload_url"], onnx_bytes)
    assert put.status_code == 200, put.text
    assert put.json()["model_hash"] == "sha256:" + hashlib.sha256(onnx_bytes).hexdigest()
    confirmed = _confirm(client, base, model["id"], "1.0.0", body["storage_key"], len(onnx_bytes), "direct")
    assert confirmed.status_code == 201, confirmed.text
    version = confirmed.json()
    multipart = client.post(f"{base}/models/{model['id']}/versions/upload", data={"version": "1.0.1"},
                            files={"file": ("model.onnx", onnx_bytes)}).json()
    assert set(version) == set(multipart)
    for field in ("format", "model_path", "model_size_bytes", "model_hash", "formats", "status"):
        assert version[field] == multipart[field], field
    assert version["label"] == "1.0.0" and version["description"] == "direct" and version["status"] == "published"
    detail = client.get(f"{base}/models/{model['id']}/versions/1.0.0").json()
    assert detail["formats"]["onnx"]["signature"]["inputs"], detail  # checked (in a child) like any ONNX upload
    download = client.get(f"{base}/models/{model['id']}/versions/1.0.0/download")
    assert download.content == onnx_bytes
    # the name matches case-insensitively
    assert client.post(f"{base}/models", json={"name": "direct"}).json()["id"] == model["id"]
    assert _leftovers(server) == []


def test_pickles_are_converted_like_multipart_uploads(setup: Any, sklearn_pickle: bytes) -> None:
    server, client, base, model = setup
    body = _upload_url(client, base, model["id"], "1.0.0", "m.pkl").json()
    assert _put(body["upload_url"], sklearn_pickle).status_code == 200
    confirmed = client.post(f"{base}/models/{model['id']}/versions/confirm-upload", data={
        "version": "1.0.0", "storage_key": body["storage_key"], "file_size": str(len(sklearn_pickle)),
        "formats": "onnx"})
    assert confirmed.status_code == 201, confirmed.text
    assert confirmed.json()["format"] == "sklearn" and confirmed.json()["formats"]["onnx"] == "pending"


def test_confirm_without_put_wrong_size_reuse_and_tampering_are_clear_4xx(setup: Any, onnx_bytes: bytes) -> None:
    server, client, base, model = setup
    body = _upload_url(client, base, model["id"], "1.0.0", "model.onnx").json()
    early = _confirm(client, base, model["id"], "1.0.0", body["storage_key"], len(onnx_bytes))
    assert early.status_code == 400 and "PUT" in early.json()["message"]
    tampered = body["upload_url"].replace("signature=", "signature=0")
    assert _put(tampered, onnx_bytes).status_code == 403
    other = client.post(f"{base}/models", json={"name": "other"}).json()
    assert _put(body["upload_url"].replace(model["id"], other["id"]), onnx_bytes).status_code == 403
    assert _put(body["upload_url"], onnx_bytes).status_code == 200
    reused = _put(body["upload_url"], onnx_bytes)
    assert reused.status_code == 409 and reused.json()["error"] == "conflict"
    wrong = _confirm(client, base, model["id"], "1.0.0", body["storage_key"], len(onnx_bytes) + 1)
    assert wrong.status_code == 400 and "file_size" in wrong.json()["message"]
    again = _confirm(client, base, model["id"], "1.0.0", body["storage_key"], len(onnx_bytes))
    assert again.status_code == 404  # a confirm is single-use: the bytes were dropped
    assert client.get(f"{base}/models/{model['id']}/versions").json()["total"] == 0
    assert _leftovers(server) == []
    for bad in ({"version": "", "filename": "m"}, {"version": "latest", "filename": "m"}):
        assert client.post(f"{base}/models/{model['id']}/versions/upload-url", data=bad).status_code == 400
    assert _confirm(client, base, model["id"], "1.0.0", "upload-" + "0" * 32, 1).status_code == 404
    assert _confirm(client, base, model["id"], "1.0.0", "../../etc", 1).status_code == 404
    assert _confirm(client, base, model["id"], "1.0.0", body["storage_key"], -1).status_code in (400, 404)


def test_invalid_onnx_and_too_large_leave_nothing(setup: Any, onnx_bytes: bytes) -> None:
    server, client, base, model = setup
    body = _upload_url(client, base, model["id"], "1.0.0", "model.onnx").json()
    assert _put(body["upload_url"], b"\x08\x07" + b"\xff" * 100).status_code == 200
    bad = client.post(f"{base}/models/{model['id']}/versions/confirm-upload",
                      data={"version": "1.0.0", "storage_key": body["storage_key"], "format": "onnx"})
    assert bad.status_code == 400, bad.text
    body = _upload_url(client, base, model["id"], "1.0.0", "big.onnx").json()
    big = _put(body["upload_url"], b"\0" * 100001)
    assert big.status_code == 413 and big.json()["error"] == "payload_too_large"

    def chunked() -> Any:  # no Content-Length: the limit is enforced while streaming
        for _ in range(30):
            yield b"\0" * 5000

    with httpx.Client(timeout=60) as bare:
        streamed = bare.put(body["upload_url"], content=chunked())
    assert streamed.status_code == 413
    assert _put(body["upload_url"], onnx_bytes).status_code == 200  # a failed PUT stored nothing; the URL still works
    assert _confirm(client, base, model["id"], "1.0.0", body["storage_key"], len(onnx_bytes)).status_code == 201
    assert client.get(f"{base}/models/{model['id']}/versions").json()["total"] == 1
    assert _leftovers(server) == []


async def test_expired_upload_urls_are_refused_and_swept(api: Api, onnx_bytes: bytes) -> None:
    model = await api.create_model()
    resp = await api.client.post(f"/api/v1/models/{model['id']}/versions/upload-url",
                                 data={"version": "1.0.0", "filename": "m.onnx"}, headers=api.headers)
    storage_key = resp.json()["storage_key"]

    async def expire() -> None:
        async with api.registry.db.transaction() as conn:
            await conn.execute("UPDATE direct_uploads SET expires = ?", (int(time.time()) - 10,))

    await api.on_app(expire)
    put = await api.client.put(resp.json()["upload_url"].replace("http://testserver.local", ""), content=onnx_bytes)
    assert put.status_code == 403
    confirm = await api.client.post(f"/api/v1/models/{model['id']}/versions/confirm-upload",
                                    data={"storage_key": storage_key, "file_size": "1"}, headers=api.headers)
    assert confirm.status_code == 400 and "expired" in confirm.json()["message"]
    assert await api.on_app(api.registry.db.get_direct_upload, storage_key) is None


def test_a_put_cut_short_by_a_restart_can_be_sent_again(setup: Any, onnx_bytes: bytes) -> None:
    server, client, base, model = setup
    body = _upload_url(client, base, model["id"], "1.0.0", "model.onnx").json()
    server.stop()
    with sqlite3.connect(server.data_dir / "registry.sqlite3") as db:  # as a server killed mid-PUT leaves it
        db.execute("UPDATE direct_uploads SET state = 'receiving'")
    again = Server(server.data_dir)
    try:
        url = body["upload_url"].replace(server.url, again.url)
        assert _put(url, onnx_bytes).status_code == 200
        with httpx.Client(headers=client.headers, timeout=60) as c:
            done = _confirm(c, f"{again.url}/api/v1", model["id"], "1.0.0", body["storage_key"], len(onnx_bytes))
        assert done.status_code == 201, done.text
    finally:
        again.stop()
