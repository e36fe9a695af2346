"""The `octomil-lite keys` commands, on a real data directory chosen by OCTOMIL_LITE_HOME."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import httpx
from conftest import Server, bearer


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "octomil_lite.cli", *args], capture_output=True, text=True,
                          env={"OCTOMIL_LITE_HOME": str(home), "PATH": "/usr/bin:/bin"}, timeout=60)


def test_keys_create_prints_only_the_key_and_list_never_shows_it(tmp_path: Path) -> None:
    home = tmp_path / "home"
    made = cli(home, "keys", "create", "--name", "ci", "--scope", "read")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert made.stdout == key + "\n" and key.startswith("oml_") and len(key) > 40
    listed = cli(home, "keys", "list")
    assert listed.returncode == 0 and "ci" in listed.stdout and "read" in listed.stdout
    assert key not in listed.stdout
    assert (home / "registry.sqlite3").exists()


def test_keys_create_defaults_to_write_and_refuses_duplicate_names(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert cli(home, "keys", "create", "--name", "a").returncode == 0
    assert "write" in cli(home, "keys", "list").stdout
    dup = cli(home, "keys", "create", "--name", "a")
    assert dup.returncode != 0 and "already exists" in dup.stderr and "Traceback" not in dup.stderr
    bad = cli(home, "keys", "create", "--name", "a", "--scope", "root")
    assert bad.returncode != 0


def test_keys_revoke_takes_effect_on_a_running_server(tmp_path: Path) -> None:
    home = tmp_path / "data"
    server = Server(home)
    try:
        key = cli(home, "keys", "create", "--name", "temp").stdout.strip()
        assert httpx.get(f"{server.url}/api/v1/models", headers=bearer(key)).status_code == 200
        revoked = cli(home, "keys", "revoke", "temp")
        assert revoked.returncode == 0
        assert httpx.get(f"{server.url}/api/v1/models", headers=bearer(key)).status_code == 401
        assert cli(home, "keys", "revoke", "temp").returncode != 0
        assert "temp" in cli(home, "keys", "list").stdout
    finally:
        server.stop()


def test_serve_on_an_empty_registry_prints_one_admin_key_once(tmp_path: Path) -> None:
    home = tmp_path / "data"
    server = Server(home)
    try:
        out = server.output()
        keys = [w for w in out.split() if w.startswith("oml_")]
        assert keys and "curl" in out
        resp = httpx.post(f"{server.url}/api/v1/models", json={}, headers=bearer(keys[0]))
        assert resp.status_code == 201
    finally:
        server.stop()
    again = Server(home)
    try:
        assert "oml_" not in again.output()
    finally:
        again.stop()


def test_serve_on_a_busy_port_fails_in_one_line_and_creates_no_key(tmp_path: Path) -> None:
    home = tmp_path / "data"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        out = cli(home, "serve", "--port", port)
    assert out.returncode != 0 and "oml_" not in out.stdout + out.stderr and "curl" not in out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and port in lines[0] and "--port" in lines[0] and "Traceback" not in out.stderr
    listed = cli(home, "keys", "list")
    assert listed.returncode == 0 and listed.stdout.strip().splitlines()[1:] == []
    server = Server(home)  # the next start, on a free port, is a first start: it shows the first key
    try:
        assert "oml_" in server.output()
    finally:
        server.stop()


def test_first_start_banner_points_at_the_web_page_and_the_api_docs(server: Server) -> None:
    out = server.output()
    assert f"http://localhost:{server.port}/ " in out and f"http://localhost:{server.port}/schema" in out
    assert httpx.get(f"{server.url}/").status_code == 200
    assert httpx.get(f"{server.url}/schema").status_code == 200
