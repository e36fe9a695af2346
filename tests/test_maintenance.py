"""`octomil-lite gc` and `octomil-lite verify` on a real data directory."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from conftest import Server, bearer


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "octomil_lite.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "OCTOMIL_LITE_HOME": str(home)}, timeout=120, check=False)


def _populate(home: Path) -> tuple[str, list[str]]:
    """A model with three versions (two sharing bytes); returns its id and the blob digests."""
    server = Server(home)
    try:
        key = cli(home, "keys", "create", "--name", "m").stdout.strip()
        with httpx.Client(base_url=server.url, headers=bearer(key), timeout=30) as client:
            model = client.post("/api/v1/models", json={}).json()
            digests = []
            for payload in (b"\x80\x04K\x01.", b"\x80\x04K\x02.", b"\x80\x04K\x01."):
                resp = client.post(f"/api/v1/models/{model['id']}/versions/upload", files={"file": ("m.pkl", payload)},
                                   data={"format": "sklearn"})
                digests.append(resp.json()["model_hash"].removeprefix("sha256:"))
            assert client.delete(f"/api/v1/models/{model['id']}/versions/2").status_code == 204
    finally:
        server.stop()
    return model["id"], digests


def _age(path: Path, seconds: float) -> None:
    old = time.time() - seconds
    os.utime(path, (old, old), follow_symlinks=False)


def test_gc_deletes_only_old_unreferenced_blobs_and_temp_files(tmp_path: Path) -> None:
    home = tmp_path / "data"
    _, digests = _populate(home)
    kept, dropped = (home / "blobs/sha256" / d[:2] / d for d in digests[:2])
    (home / "tmp" / "upload-stale").write_bytes(b"x" * 100)
    fresh = cli(home, "gc")
    assert fresh.returncode == 0 and "deleted 0 unreferenced blob(s)" in fresh.stdout and dropped.exists()
    _age(dropped, 7200)
    _age(home / "tmp" / "upload-stale", 7200)
    dry = cli(home, "gc", "--dry-run")
    assert "would delete 1 unreferenced blob(s)" in dry.stdout and dropped.exists()
    done = cli(home, "gc")
    assert "deleted 1 unreferenced blob(s)" in done.stdout and "1 temp file(s)" in done.stdout
    assert not dropped.exists() and kept.exists() and not (home / "tmp" / "upload-stale").exists()
    assert cli(home, "verify").returncode == 0


def test_verify_reports_clean_then_finds_corruption_and_missing_blobs(tmp_path: Path) -> None:
    home = tmp_path / "data"
    _, digests = _populate(home)
    clean = cli(home, "verify")
    assert clean.returncode == 0, clean.stdout
    assert "0 problem(s)" in clean.stdout and "1 unreferenced blob(s)" in clean.stdout
    blob = home / "blobs/sha256" / digests[0][:2] / digests[0]
    blob.chmod(0o644)
    blob.write_bytes(b"tampered")
    broken = cli(home, "verify")
    assert broken.returncode == 1 and f"blob {digests[0]} is corrupt" in broken.stdout
    blob.unlink()
    missing = cli(home, "verify")
    assert missing.returncode == 1 and f"points at missing blob {digests[0]}" in missing.stdout


def test_gc_says_what_the_grace_period_holds_back_and_grace_0_reclaims_it(tmp_path: Path) -> None:
    home = tmp_path / "data"
    _, digests = _populate(home)
    dropped = home / "blobs/sha256" / digests[1][:2] / digests[1]
    held = cli(home, "gc")
    assert held.returncode == 0 and "deleted 0 unreferenced blob(s)" in held.stdout
    assert "kept 1 unreferenced blob(s), 5 B" in held.stdout and "3600 s grace" in held.stdout
    assert "gc --grace 0" in held.stdout and dropped.exists()
    now = cli(home, "gc", "--grace", "0")
    assert "deleted 1 unreferenced blob(s), 5 B" in now.stdout and "kept" not in now.stdout
    assert not dropped.exists() and cli(home, "verify").returncode == 0
