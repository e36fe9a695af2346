"""API keys: bearer auth on every /api/v1 route, scopes, revocation, hashing at rest, rate limit."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from conftest import Api, bearer, on_app_loop
from litestar.testing import AsyncTestClient

from octomil_lite.auth import RateLimiter, hash_key
from octomil_lite.config import Config
from octomil_lite.server.app import create_app

ROUTES = [
    ("GET", "/api/v1/models"),
    ("POST", "/api/v1/models"),
    ("GET", "/api/v1/models/{id}"),
    ("POST", "/api/v1/models/{id}/versions/upload"),
    ("GET", "/api/v1/models/{id}/versions/1/download"),
]


async def test_every_api_route_needs_a_key(api: Api) -> None:
    model = await api.create_model()
    for method, path in ROUTES:
        url = path.format(id=model["id"])
        for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": "Bearer oml_wrong"},
                        {"Authorization": f"Basic {api.keys['admin']}"}, {"Authorization": api.keys["admin"]},
                        {"Authorization": "Bearer " + "x" * 5000}):
            resp = await api.client.request(method, url, headers=headers)
            assert resp.status_code == 401, (method, url, headers)
            assert resp.json()["error"] == "unauthorized"


async def test_read_key_can_read_but_not_write(api: Api, sklearn_pickle: bytes) -> None:
    model = await api.create_model()
    await api.upload(model["id"], sklearn_pickle, "m.pkl")
    read = bearer(api.keys["read"])
    assert (await api.client.get("/api/v1/models", headers=read)).status_code == 200
    assert (await api.client.get(f"/api/v1/models/{model['id']}", headers=read)).status_code == 200
    assert (await api.client.get(f"/api/v1/models/{model['id']}/versions/1/download", headers=read)).status_code == 200
    resp = await api.client.post("/api/v1/models", json={}, headers=read)
    assert resp.status_code == 403 and resp.json()["error"] == "forbidden"
    resp = await api.client.post(f"/api/v1/models/{model['id']}/versions/upload", headers=read,
                                 files={"file": ("m.pkl", sklearn_pickle)})
    assert resp.status_code == 403 and resp.json()["error"] == "forbidden"


async def test_write_key_can_create_and_upload(api: Api, sklearn_pickle: bytes) -> None:
    write = bearer(api.keys["write"])
    model = (await api.client.post("/api/v1/models", json={}, headers=write)).json()
    resp = await api.client.post(f"/api/v1/models/{model['id']}/versions/upload", headers=write,
                                 files={"file": ("m.pkl", sklearn_pickle)})
    assert resp.status_code == 201


async def test_revoked_key_is_refused(api: Api) -> None:
    key = await api.on_app(api.registry.create_key, "temp", "admin")
    assert (await api.client.get("/api/v1/models", headers=bearer(key))).status_code == 200
    await api.on_app(api.registry.revoke_key, "temp")
    assert (await api.client.get("/api/v1/models", headers=bearer(key))).status_code == 401


async def test_keys_exist_only_as_hashes_at_rest(api: Api) -> None:
    data_dir = api.registry.config.data_dir
    for key in api.keys.values():
        needle = key.encode()
        for path in Path(data_dir).rglob("*"):
            if path.is_file():
                assert needle not in path.read_bytes(), path
        with sqlite3.connect(data_dir / "registry.sqlite3") as conn:
            stored = {row[0] for row in conn.execute("SELECT key_hash FROM api_keys")}
        assert hash_key(key) in stored


async def test_rate_limit_answers_429_with_integer_retry_after(tmp_path: Path) -> None:
    config = Config(data_dir=tmp_path / "d", rate_limit=5)
    async with AsyncTestClient(app=create_app(config)) as client:
        key = await on_app_loop(client, client.app.state.registry.create_key, "k", "read")
        codes = [(await client.get("/api/v1/models", headers=bearer(key))) for _ in range(8)]
        assert [r.status_code for r in codes[:5]] == [200] * 5
        limited = codes[5]
        assert limited.status_code == 429 and limited.json()["error"] == "rate_limited"
        assert limited.headers["retry-after"].isdigit() and int(limited.headers["retry-after"]) >= 1
        bad = [(await client.get("/api/v1/models", headers=bearer("oml_guess"))).status_code for _ in range(8)]
        assert bad[:5] == [401] * 5 and 429 in bad[5:]


def test_rate_limiter_refills_over_time() -> None:
    limiter = RateLimiter(60)
    for _ in range(60):
        assert limiter.hit("a") is None
    assert limiter.hit("a") == 1
    assert limiter.hit("b") is None
    assert RateLimiter(0).hit("a") is None
