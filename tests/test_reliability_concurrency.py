"""Reliability under concurrency: parallel uploads, identical uploads, and `gc` racing uploads (real server)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from pathlib import Path

import httpx
from conftest import Server, bearer, make_key
from test_reliability_crash import assert_downloads, assert_store_consistent, cli, payload, verify_clean


def blob_files(home: Path) -> list[Path]:
    return [p for p in (home / "blobs" / "sha256").rglob("*") if p.is_file()]


async def _upload_all(url: str, key: str, model_id: str, bodies: list[bytes]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(base_url=url, headers=bearer(key), timeout=120, limits=limits) as client:
        return await asyncio.gather(*(client.post(f"/api/v1/models/{model_id}/versions/upload",
                                                  files={"file": (f"m{i}.pkl", body)}, data={"format": "sklearn"})
                                      for i, body in enumerate(bodies)))


def test_parallel_uploads_to_one_model_get_distinct_consecutive_versions(tmp_path: Path) -> None:
    home = tmp_path / "data"
    server = Server(home)
    try:
        key = make_key(home)
        with httpx.Client(base_url=server.url, headers=bearer(key), timeout=60) as client:
            model_id = client.post("/api/v1/models", json={}).json()["id"]
        bodies = [payload(i, size=4096 * (1 + i % 5)) for i in range(32)]
        # the CLI writes to the same database meanwhile (another process holding SQLite's write lock)
        writers = threading.Thread(target=lambda: [make_key(home, f"side{i}", "read") for i in range(4)])
        writers.start()
        responses = asyncio.run(_upload_all(server.url, key, model_id, bodies))
        writers.join()
        refused = [r.text for r in responses if r.status_code != 201]
        assert refused == []
        numbers = sorted(r.json()["version"] for r in responses)
        assert numbers == list(range(1, len(bodies) + 1))
        for body, resp in zip(bodies, responses):
            assert resp.json()["model_hash"] == "sha256:" + hashlib.sha256(body).hexdigest()
        with httpx.Client(base_url=server.url, headers=bearer(key), timeout=60) as client:
            assert_downloads(client, [(model_id, r.json()["version"], r.json()["model_hash"]) for r in responses])
            listed = client.get(f"/api/v1/models/{model_id}").json()["versions"]
            assert [v["version"] for v in listed] == list(range(1, len(bodies) + 1))
        assert "database is locked" not in server.output()
    finally:
        server.stop()
    assert_store_consistent(home)
    verify_clean(home)


def test_identical_concurrent_uploads_store_one_blob(tmp_path: Path) -> None:
    home = tmp_path / "data"
    server = Server(home)
    try:
        key = make_key(home)
        with httpx.Client(base_url=server.url, headers=bearer(key), timeout=60) as client:
            models = [client.post("/api/v1/models", json={}).json()["id"] for _ in range(2)]
        body = payload(7, size=2 * 1024 * 1024)

        async def both() -> list[httpx.Response]:
            runs = await asyncio.gather(*(_upload_all(server.url, key, m, [body] * 12) for m in models))
            return [r for run in runs for r in run]

        responses = asyncio.run(both())
        assert [r.status_code for r in responses] == [201] * 24
        assert {r.json()["model_hash"] for r in responses} == {"sha256:" + hashlib.sha256(body).hexdigest()}
        assert len({r.json()["model_path"] for r in responses}) == 1
        assert [p.name for p in blob_files(home)] == [hashlib.sha256(body).hexdigest()]
        assert not any(p.name.startswith("upload-") for p in (home / "tmp").iterdir())
    finally:
        server.stop()
    verify_clean(home)


def test_gc_running_during_uploads_never_deletes_a_blob_a_version_references(tmp_path: Path) -> None:
    """The dangerous case: bytes whose blob gc sees as garbage (its version was deleted, its mtime is old) being
    uploaded again while gc runs. Each round races gc (another process) against uploads of those bytes."""
    home = tmp_path / "data"
    server = Server(home)
    stop = threading.Event()
    gc_runs: list[int] = []

    def collector() -> None:
        while not stop.is_set():
            out = cli(home, "gc", "--grace", "1")
            gc_runs.append(out.returncode)
            assert out.returncode == 0, out.stderr

    try:
        key = make_key(home)
        acked = []
        with httpx.Client(base_url=server.url, headers=bearer(key), timeout=60) as client:
            model_id = client.post("/api/v1/models", json={}).json()["id"]
            thread = threading.Thread(target=collector)
            thread.start()
            try:
                for round_ in range(6):
                    garbage = payload(1000 + round_, size=256 * 1024)
                    digest = hashlib.sha256(garbage).hexdigest()
                    first = client.post(f"/api/v1/models/{model_id}/versions/upload",
                                        files={"file": ("g.pkl", garbage)}, data={"format": "sklearn"}).json()
                    assert client.delete(f"/api/v1/models/{model_id}/versions/{first['version']}").status_code == 204
                    blob = home / "blobs" / "sha256" / digest[:2] / digest
                    if blob.exists():
                        os.utime(blob, (time.time() - 3600, time.time() - 3600))
                    bodies = [garbage] * 8 + [payload(2000 + 10 * round_ + i) for i in range(4)]
                    responses = asyncio.run(_upload_all(server.url, key, model_id, bodies))
                    assert [r.status_code for r in responses] == [201] * len(bodies), \
                        [r.text for r in responses if r.status_code != 201]
                    acked += [(model_id, r.json()["version"], r.json()["model_hash"]) for r in responses]
                    assert blob.exists(), "gc deleted a blob that a version references"
            finally:
                stop.set()
                thread.join(60)
            assert len(gc_runs) >= 2, "gc barely ran; the race was not exercised"
            gc = cli(home, "gc", "--grace", "0")
            assert gc.returncode == 0
            assert_downloads(client, acked)
    finally:
        stop.set()
        server.stop()
    assert_store_consistent(home)
    verify_clean(home)
