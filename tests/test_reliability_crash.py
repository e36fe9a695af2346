"""Reliability: `kill -9` at any moment loses nothing that was acknowledged and leaves nothing inconsistent.

Invariants checked after every crash and restart: every acknowledged (201) version downloads with its hash; no row
points at a missing blob; every file at a final blob path hashes to its name (no partial file); temp files are
swept; `octomil-lite verify` exits 0. Real `octomil-lite serve` subprocesses, real SIGKILL.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from conftest import Server, bearer, make_key


def cli(home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "octomil_lite.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "OCTOMIL_LITE_HOME": str(home)}, timeout=timeout)


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (conversion and check children), found through /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill9(server: Server, with_children: bool = True) -> None:
    """SIGKILL the server -- and, like a power cut, the sandboxed children it started (so none outlives the test)."""
    children = descendants(server.proc.pid) if with_children else []
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def verify_clean(home: Path) -> str:
    out = cli(home, "verify")
    assert out.returncode == 0, f"verify found problems:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def assert_store_consistent(home: Path) -> None:
    """Every file at a final path is complete (hashes to its name) and read-only; no upload is left in tmp/."""
    for path in (home / "blobs" / "sha256").rglob("*"):
        if path.is_file():
            assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name, f"partial or corrupt blob {path}"
            assert path.parent.name == path.name[:2]
    leftovers = [p.name for p in (home / "tmp").iterdir() if p.name.startswith("upload-")]
    assert leftovers == [], leftovers


def assert_downloads(client: httpx.Client, acked: list[tuple[str, int, str]]) -> None:
    for model_id, version, expected in acked:
        resp = client.get(f"/api/v1/models/{model_id}/versions/{version}/download")
        assert resp.status_code == 200, (model_id, version, resp.text[:200])
        assert "sha256:" + hashlib.sha256(resp.content).hexdigest() == expected == resp.headers["x-model-hash"]


def payload(i: int, size: int = 4096) -> bytes:
    """Distinct, pickle-looking bytes (the conversion that follows fails fast and harmlessly)."""
    return b"\x80\x04\x95" + hashlib.sha256(str(i).encode()).digest() * (size // 32)


def _upload(client: httpx.Client, model_id: str, data: bytes) -> httpx.Response:
    return client.post(f"/api/v1/models/{model_id}/versions/upload", files={"file": ("m.pkl", data)},
                       data={"format": "sklearn"})


def _wait_for(predicate: Any, timeout: float = 30, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_kill_during_an_upload_loses_nothing_acknowledged(tmp_path: Path) -> None:
    home = tmp_path / "data"
    server = Server(home)
    try:
        key = make_key(home)
        with httpx.Client(base_url=server.url, headers=bearer(key), timeout=30) as client:
            model = client.post("/api/v1/models", json={}).json()
            acked = []
            for i in range(2):
                resp = _upload(client, model["id"], payload(i))
                assert resp.status_code == 201
                acked.append((model["id"], resp.json()["version"], resp.json()["model_hash"]))
        # a big upload, half sent: the server has written part of it to tmp/ when it dies
        boundary = "crashboundary"
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.pkl\"\r\n\r\n"
                ).encode() + b"\x80\x04\x95"
        total = len(head) + 32 * 1024 * 1024
        conn = socket.create_connection(("127.0.0.1", server.port))
        conn.sendall((f"POST /api/v1/models/{model['id']}/versions/upload HTTP/1.1\r\nHost: x\r\n"
                      f"Authorization: Bearer {key}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
                      f"Content-Length: {total + 100}\r\n\r\n").encode() + head)
        chunk = os.urandom(1024 * 1024)
        for _ in range(10):
            conn.sendall(chunk)

        def partial() -> bool:
            return any(p.name.startswith("upload-") and p.stat().st_size > 0 for p in (home / "tmp").iterdir())

        _wait_for(partial, what="a partial upload in tmp/")
        kill9(server)
        conn.close()
    finally:
        server.stop()
    assert any(p.name.startswith("upload-") for p in (home / "tmp").iterdir())  # the crash did leave one
    server = Server(home)
    try:
        assert not any(p.name.startswith("upload-") for p in (home / "tmp").iterdir())  # swept at start
        with httpx.Client(base_url=server.url, headers=bearer(key), timeout=30) as client:
            assert_downloads(client, acked)
            versions = client.get(f"/api/v1/models/{model['id']}").json()["versions"]
            assert [v["version"] for v in versions] == [1, 2]
            # and the registry carries on: the next upload is version 3
            assert _upload(client, model["id"], payload(99)).json()["version"] == 3
        assert_store_consistent(home)
        verify_clean(home)
    finally:
        server.stop()


def test_kill_during_a_conversion_resumes_it_after_restart(tmp_path: Path, sklearn_pickle: bytes) -> None:
    home = tmp_path / "data"
    server = Server(home)
    try:
        key = make_key(home)
        with httpx.Client(base_url=server.url, headers=bearer(key), timeout=30) as client:
            model = client.post("/api/v1/models", json={"framework": "sklearn"}).json()
            body = _upload(client, model["id"], sklearn_pickle).json()
            detail = f"/api/v1/models/{model['id']}/versions/1"

            def running() -> bool:
                status = client.get(detail).json()["formats"]["onnx"]["status"]
                assert status in ("pending", "running"), status  # the kill must land mid-conversion
                return status == "running" and bool(descendants(server.proc.pid))

            _wait_for(running, what="the conversion to start")
            kill9(server)
    finally:
        server.stop()
    server = Server(home)
    try:
        with httpx.Client(base_url=server.url, headers=bearer(key), timeout=30) as client:
            assert_downloads(client, [(model["id"], 1, body["model_hash"])])

            def converted() -> dict[str, Any] | None:
                onnx = client.get(detail).json()["formats"]["onnx"]
                assert onnx["status"] in ("pending", "running", "ready"), onnx
                return onnx if onnx["status"] == "ready" else None

            onnx = _wait_for(converted, timeout=120, what="the resumed conversion")
            resp = client.get(f"/api/v1/models/{model['id']}/versions/1/download?format=onnx")
            assert resp.status_code == 200
            served = "sha256:" + hashlib.sha256(resp.content).hexdigest()
            assert resp.headers["x-model-hash"] == onnx["model_hash"] == served
        assert_store_consistent(home)
        verify_clean(home)
    finally:
        server.stop()


def test_state_left_between_blob_write_and_commit_is_cleaned_up(tmp_path: Path, sklearn_pickle: bytes) -> None:
    """A crash after os.replace() into the store but before the SQLite COMMIT leaves an unreferenced blob at its
    final path, plus temp files. A kill cannot be timed into that window, so the state is made by hand."""
    home = tmp_path / "data"
    server = Server(home)
    try:
        key = make_key(home)
        with httpx.Client(base_url=server.url, headers=bearer(key), timeout=30) as client:
            model = client.post("/api/v1/models", json={}).json()
            first = _upload(client, model["id"], payload(1)).json()
    finally:
        server.stop()
    orphan = payload(2)
    digest = hashlib.sha256(orphan).hexdigest()
    final = home / "blobs" / "sha256" / digest[:2] / digest
    final.parent.mkdir(exist_ok=True)
    final.write_bytes(orphan)
    final.chmod(0o444)
    (home / "tmp" / "upload-1-2-deadbeef").write_bytes(orphan[:1000])  # an upload cut short
    (home / "tmp" / "upload-3-4-cafebabe.folded.onnx").write_bytes(b"\x08\x07")
    (home / "tmp" / "convert-x1y2z3").mkdir()
    (home / "tmp" / "convert-x1y2z3" / "model.onnx").write_bytes(b"half")
    (home / "tmp" / "sandbox-q9").mkdir()
    # verify, before any restart: the orphan and the temp files are reported, but they are no problem
    out = verify_clean(home)
    assert "1 unreferenced blob" in out, out
    server = Server(home)
    try:
        left = {p.name for p in (home / "tmp").iterdir()}  # swept at start (a new conversion may have begun since)
        assert not left & {"upload-1-2-deadbeef", "upload-3-4-cafebabe.folded.onnx", "convert-x1y2z3", "sandbox-q9"}
        with httpx.Client(base_url=server.url, headers=bearer(key), timeout=30) as client:
            assert_downloads(client, [(model["id"], 1, first["model_hash"])])
            versions = client.get(f"/api/v1/models/{model['id']}").json()["versions"]
            assert [v["version"] for v in versions] == [1]  # the uncommitted upload never happened
        verify_clean(home)
        gc = cli(home, "gc", "--grace", "0")
        assert gc.returncode == 0, gc.stderr
        assert not final.exists()
        with httpx.Client(base_url=server.url, headers=bearer(key), timeout=30) as client:
            # the same bytes uploaded for real now: stored again, downloadable
            again = _upload(client, model["id"], orphan)
            assert again.status_code == 201 and again.json()["version"] == 2
            assert_downloads(client, [(model["id"], 2, "sha256:" + digest)])
        assert final.read_bytes() == orphan
        assert_store_consistent(home)
        out = verify_clean(home)
        assert "0 unreferenced blob" in out, out
    finally:
        server.stop()


def test_verify_is_not_vacuous_it_reports_a_torn_or_missing_blob(tmp_path: Path) -> None:
    """The checks above rely on verify; here it must fail on a blob that a crash-unsafe store would leave."""
    home = tmp_path / "data"
    server = Server(home)
    try:
        key = make_key(home)
        with httpx.Client(base_url=server.url, headers=bearer(key), timeout=30) as client:
            model = client.post("/api/v1/models", json={}).json()
            digests = [_upload(client, model["id"], payload(i)).json()["model_hash"][7:] for i in (1, 2)]
    finally:
        server.stop()
    torn = home / "blobs" / "sha256" / digests[0][:2] / digests[0]
    torn.chmod(0o644)
    torn.write_bytes(torn.read_bytes()[:100])  # a partial file at a final path
    missing = home / "blobs" / "sha256" / digests[1][:2] / digests[1]
    missing.unlink()
    out = cli(home, "verify")
    assert out.returncode != 0
    assert digests[0] in out.stdout and digests[1] in out.stdout, out.stdout


def test_repeated_kill_9_during_a_stream_of_uploads(tmp_path: Path) -> None:
    """Three clients upload (small and multi-megabyte bodies) while the server is SIGKILLed again and again."""
    home = tmp_path / "data"
    key = make_key(home)
    model_id = ""
    acked: list[tuple[str, int, str]] = []
    lock = threading.Lock()
    counter = iter(range(10**6))

    def uploader(url: str, stop: threading.Event) -> None:
        with httpx.Client(base_url=url, headers=bearer(key), timeout=30) as client:
            while not stop.is_set():
                with lock:
                    i = next(counter)
                data = payload(i, size=4096 if i % 4 else 3 * 1024 * 1024)
                try:
                    resp = _upload(client, model_id, data)
                except httpx.HTTPError:
                    return  # the server died under us: this one was never acknowledged
                assert resp.status_code == 201, resp.text
                with lock:
                    acked.append((model_id, resp.json()["version"], resp.json()["model_hash"]))

    mid_upload = 0
    for round_ in range(4):
        server = Server(home)
        try:
            if not model_id:
                with httpx.Client(base_url=server.url, headers=bearer(key)) as client:
                    model_id = client.post("/api/v1/models", json={}).json()["id"]
            stop = threading.Event()
            threads = [threading.Thread(target=uploader, args=(server.url, stop)) for _ in range(3)]
            for t in threads:
                t.start()
            time.sleep(0.5 + 0.2 * round_)
            kill9(server)
            mid_upload += any(p.name.startswith("upload-") for p in (home / "tmp").iterdir())
            stop.set()
            for t in threads:
                t.join(30)
                assert not t.is_alive()
        finally:
            server.stop()
        assert_store_consistent_after_crash(home)
    assert len(acked) >= 10, "the clients barely uploaded anything; the test proves little"
    assert mid_upload >= 1, "no kill landed while an upload was being written"
    server = Server(home)
    try:
        assert not any(p.name.startswith("upload-") for p in (home / "tmp").iterdir())
        with httpx.Client(base_url=server.url, headers=bearer(key), timeout=60) as client:
            assert_downloads(client, acked)
            numbers = [v["version"] for v in client.get(f"/api/v1/models/{model_id}").json()["versions"]]
            assert numbers == list(range(1, len(numbers) + 1)), "version numbers skipped or repeated"
            assert {v for _, v, _ in acked} <= set(numbers) and len({v for _, v, _ in acked}) == len(acked)
    finally:
        server.stop()
    assert_store_consistent(home)
    verify_clean(home)


def assert_store_consistent_after_crash(home: Path) -> None:
    """Right after a SIGKILL (before any restart): final paths hold only complete blobs; tmp/ may hold leftovers."""
    for path in (home / "blobs" / "sha256").rglob("*"):
        if path.is_file():
            assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name, f"partial blob at {path}"
