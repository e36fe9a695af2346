"""A real `octomil-lite serve`: large streaming upload and byte-identical download over HTTP."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
from conftest import Server, bearer, make_key


def test_large_upload_streams_and_downloads_byte_identical(server: Server, tmp_path: Path) -> None:
    key = make_key(server.data_dir)
    path = tmp_path / "big.pkl"
    with open(path, "wb") as f:
        f.write(b"\x80\x04\x95")
        for _ in range(24):
            f.write(os.urandom(1024 * 1024))
    expected = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    with httpx.Client(base_url=server.url, headers=bearer(key), timeout=60) as client:
        model = client.post("/api/v1/models", json={"framework": "sklearn"}).json()
        with open(path, "rb") as f:
            resp = client.post(f"/api/v1/models/{model['id']}/versions/upload", files={"file": ("big.pkl", f)},
                               data={"format": "sklearn"})
        assert resp.status_code == 201, resp.text
        assert resp.json()["model_hash"] == expected and resp.json()["model_size_bytes"] == path.stat().st_size
        digest = hashlib.sha256()
        with client.stream("GET", f"/api/v1/models/{model['id']}/versions/1/download") as dl:
            assert dl.status_code == 200
            assert dl.headers["x-model-hash"] == expected
            assert dl.headers["content-length"] == str(path.stat().st_size)
            assert dl.headers["content-disposition"] == 'attachment; filename="model_v1.pkl"'
            for chunk in dl.iter_bytes():
                digest.update(chunk)
        assert "sha256:" + digest.hexdigest() == expected


def test_chunked_upload_over_the_limit_is_413_and_leaves_nothing(tmp_path: Path) -> None:
    server = Server(tmp_path / "data", "--max-upload-size", "1M")
    try:
        key = make_key(server.data_dir)
        with httpx.Client(base_url=server.url, headers=bearer(key), timeout=60) as client:
            model = client.post("/api/v1/models", json={}).json()

            def body() -> Iterator[bytes]:
                yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="m.pkl"\r\n\r\n\x80\x04'
                for _ in range(64):
                    yield b"\0" * (64 * 1024)
                yield b"\r\n--b--\r\n"

            resp = client.post(f"/api/v1/models/{model['id']}/versions/upload", content=body(),
                               headers={"content-type": "multipart/form-data; boundary=b"})
            assert resp.status_code == 413 and resp.json()["error"] == "payload_too_large"
            assert "limit of 1.0 MiB" in resp.json()["message"]
            assert client.get(f"/api/v1/models/{model['id']}").json()["versions"] == []
        assert list((server.data_dir / "tmp").iterdir()) == []
        assert [p for p in (server.data_dir / "blobs").rglob("*") if p.is_file()] == []
    finally:
        server.stop()
