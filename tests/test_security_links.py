"""Signed download links: expiry is capped when signing and when serving; `secret rotate` voids every link."""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import Api, Server, bearer, make_key

from octomil_lite.config import Config


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return Config(data_dir=tmp_path / "data", rate_limit=0, conversion_workers=0, max_link_age=600)


async def test_a_link_longer_than_the_cap_is_a_400_and_the_cap_itself_is_fine(api: Api, sklearn_pickle: bytes) -> None:
    model = await api.create_model(name="capped")
    await api.upload(model["id"], sklearn_pickle, "m.pkl")
    base = f"/api/v1/models/{model['id']}/versions/1/download-url"
    over = await api.client.get(base, params={"expires_in": 601}, headers=api.headers)
    assert over.status_code == 400 and over.json()["error"] == "bad_request"
    assert "at most 600 seconds" in over.json()["message"]
    ok = await api.client.get(base, params={"expires_in": 600}, headers=api.headers)
    assert ok.status_code == 200, ok.text
    url = httpx.URL(ok.json()["url"])
    assert 590 <= int(url.params["expires"]) - time.time() <= 600
    assert (await api.client.get(url.raw_path.decode())).content == sklearn_pickle


async def test_a_ten_year_link_minted_with_the_secret_is_refused(api: Api, sklearn_pickle: bytes) -> None:
    model = await api.create_model(name="minted")
    await api.upload(model["id"], sklearn_pickle, "m.pkl")
    # What an attacker holding a stolen secret.key would forge.
    secret = (api.registry.config.data_dir / "secret.key").read_bytes()
    expires = int(time.time()) + 10 * 365 * 86400
    signature = hmac.new(secret, f"{model['id']}\n1\noriginal\n{expires}".encode(), hashlib.sha256).hexdigest()
    resp = await api.client.get(f"/signed/models/{model['id']}/versions/1/download",
                                params={"format": "original", "expires": expires, "signature": signature})
    assert resp.status_code == 403 and "limit on links" in resp.json()["message"]
    assert resp.content != sklearn_pickle


def _rotate(home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "octomil_lite.cli", "secret", "rotate", "--data-dir", str(home)],
                          capture_output=True, text=True, timeout=120)


def test_secret_rotate_voids_every_link_on_a_running_server(tmp_path: Path, sklearn_pickle: bytes) -> None:
    home = tmp_path / "data"
    key = make_key(home)
    srv = Server(home, "--max-link-age", "2h")
    try:
        model = httpx.post(f"{srv.url}/api/v1/models", json={"name": "rotated"}, headers=bearer(key)).json()
        up = httpx.post(f"{srv.url}/api/v1/models/{model['id']}/versions/upload", headers=bearer(key),
                        files={"file": ("m.pkl", sklearn_pickle)}, data={"format": "sklearn"})
        assert up.status_code == 201, up.text
        link_api = f"{srv.url}/api/v1/models/{model['id']}/versions/1/download-url"
        assert httpx.get(link_api, params={"expires_in": 7201}, headers=bearer(key)).status_code == 400
        links = [httpx.get(link_api, params={"expires_in": ttl}, headers=bearer(key)).json()["url"]
                 for ttl in (60, 7200)]
        assert all(httpx.get(u).content == sklearn_pickle for u in links)
        old_secret = (home / "secret.key").read_bytes()

        done = _rotate(home)
        assert done.returncode == 0, done.stderr
        new_secret = (home / "secret.key").read_bytes()
        assert len(new_secret) == 32 and new_secret != old_secret
        assert stat.S_IMODE(os.stat(home / "secret.key").st_mode) == 0o600
        assert not [p for p in os.listdir(home) if p.endswith(".tmp")]
        for url in links:
            resp = httpx.get(url)
            assert resp.status_code == 403 and resp.content != sklearn_pickle, resp.text
        fresh = httpx.get(link_api, headers=bearer(key)).json()["url"]
        assert httpx.get(fresh).content == sklearn_pickle
    finally:
        srv.stop()


def test_secret_rotate_needs_an_existing_data_directory(tmp_path: Path) -> None:
    done = _rotate(tmp_path / "nowhere")
    assert done.returncode != 0 and "no data directory" in done.stderr
    assert not (tmp_path / "nowhere").exists()
