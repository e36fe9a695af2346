"""Security: no valid key, no access -- on every route and method, whatever the Authorization header looks like.

MLflow shipped unauthenticated upload and artifact routes (e.g. CVE-2023-6831's neighbours, and the many
"missing authorization" reports against its server); here the route table itself is enumerated, so a route
added later without protection fails this file.
"""

from __future__ import annotations

import hmac
import inspect
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
from conftest import Api, Server, bearer
from litestar.routes import HTTPRoute

from octomil_lite.auth import SCOPES, hash_key
from octomil_lite.registry import Registry

ALL_METHODS = ("GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE", "TRACE")
# Routes that answer without a key: none of them holds registry data (checked below); the signed download checks
# its own HMAC signature instead.
PUBLIC = {"/health", "/", "/static/{file_path:path}", "/schema", "/schema/swagger", "/schema/openapi.yml",
          "/schema/openapi.yaml", "/schema/openapi.json", "/schema/{path:str}", "/schema/oauth2-redirect.html",
          "/signed/models/{model_id:str}/versions/{version:str}/download"}
SCOPE_RANK = {scope: rank for rank, scope in enumerate(SCOPES)}  # read < device < write < admin
MALFORMED = [
    {},
    {"Authorization": ""},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer "},
    {"Authorization": "Bearer oml_"},
    {"Authorization": "Bearer oml_wrong"},
    {"Authorization": "Bearer " + "x" * 5000},
    {"Authorization": "Bearer oml_" + "A" * 10000},
    {"Authorization": "Token {key}"},
    {"Authorization": "Basic {key}"},
    {"Authorization": "{key}"},
    {"Authorization": "Bearer {key} extra"},
    {"Authorization": "Bearer {key}x"},
    {"Authorization": "Bearer {key_prefix}"},
    {"Authorization": "Bearer {key_upper}"},
    {"Authorization": "Bearer\t{key}"},
    {"Authorization": "Bearer,{key}"},
    {"Authorization": "Bearer {hash}"},
    {"Authorization": "Bearer " + "\u00e9\u00e8".encode().decode("latin-1")},
    {"X-Api-Key": "{key}"},
    {"Api-Key": "{key}"},
    {"Cookie": "key={key}; Authorization=Bearer%20{key}"},
]


def api_routes(api: Api) -> list[tuple[str, HTTPRoute]]:
    return [(r.path, r) for r in api.client.app.routes if isinstance(r, HTTPRoute)]


def fill(path: str, model_id: str) -> str:
    return path.replace("{model_id:str}", model_id).replace("{version:str}", "1")


def headers_for(template: dict[str, str], key: str) -> dict[str, bytes]:
    values = {"key": key, "key_prefix": key[:-1], "key_upper": key.upper(), "hash": hash_key(key)}
    return {name: value.format(**values).encode("latin-1") for name, value in template.items()}


async def _model_with_version(api: Api, sklearn_pickle: bytes) -> dict[str, Any]:
    model = await api.create_model(description="PRIVATE-DESCRIPTION-31337")
    await api.upload(model["id"], sklearn_pickle, "m.pkl")
    return model


def test_public_routes_are_exactly_the_allowlist(api: Api) -> None:
    """Every route outside /api/ is on the allowlist; every /api/ route needs a key (the tests below)."""
    paths = {path for path, _ in api_routes(api)}
    outside = {p for p in paths if not p.startswith("/api/")}
    assert outside == PUBLIC, "a route outside /api/ answers without a key; add it here only if it holds no data"
    assert any(p.startswith("/api/") for p in paths)


async def test_every_api_route_and_method_is_401_without_a_valid_key(api: Api, sklearn_pickle: bytes) -> None:
    """All methods, the route's own and any other (so even 404/405 are not told to a stranger)."""
    model = await _model_with_version(api, sklearn_pickle)
    checked = 0
    for path, route in api_routes(api):
        if path in PUBLIC:
            continue
        url = fill(path, model["id"])
        for method in sorted(set(ALL_METHODS) | route.methods):
            for template in MALFORMED:
                resp = await api.client.request(method, url, headers=headers_for(template, api.keys["admin"]))
                assert resp.status_code == 401, (method, url, template, resp.text)
                assert resp.headers["www-authenticate"] == "Bearer"
                if method != "HEAD":
                    assert resp.json()["error"] == "unauthorized"
                    assert "PRIVATE" not in resp.text and model["id"] not in resp.text
                checked += 1
    assert checked > 300
    # and nothing changed: the model and its version are still there
    detail = (await api.client.get(f"/api/v1/models/{model['id']}", headers=api.headers)).json()
    assert [v["version"] for v in detail["versions"]] == [1]


async def test_unknown_api_paths_are_401_too(api: Api) -> None:
    for path in ("/api", "/api/", "/api/v1", "/api/v1/nothing", "/api/v2/models", "/api/v1/models/x/y/z/w",
                 "/api/v1/models/../../health", "/api/v1/keys", "/api/v1/admin"):
        for method in ("GET", "HEAD", "OPTIONS", "POST", "DELETE"):
            resp = await api.client.request(method, path)
            assert resp.status_code == 401, (method, path, resp.status_code)


async def test_revoked_key_is_refused_everywhere(api: Api, sklearn_pickle: bytes) -> None:
    model = await _model_with_version(api, sklearn_pickle)
    key = await api.on_app(api.registry.create_key, "soon-revoked", "admin")
    url = f"/api/v1/models/{model['id']}"
    assert (await api.client.get(url, headers=bearer(key))).status_code == 200
    await api.on_app(api.registry.revoke_key, "soon-revoked")
    for path, route in api_routes(api):
        if path in PUBLIC:
            continue
        for method in route.methods:
            resp = await api.client.request(method, fill(path, model["id"]), headers=bearer(key))
            assert resp.status_code == 401, (method, path)
    # a new key under the same name is a different key: the old one stays dead
    fresh = await api.on_app(api.registry.create_key, "soon-revoked", "admin")
    assert fresh != key
    assert (await api.client.get(url, headers=bearer(key))).status_code == 401
    assert (await api.client.get(url, headers=bearer(fresh))).status_code == 200


async def test_keys_of_a_lower_scope_are_403_and_change_nothing(api: Api, sklearn_pickle: bytes) -> None:
    model = await _model_with_version(api, sklearn_pickle)
    refused = 0
    for path, route in api_routes(api):
        if path in PUBLIC:
            continue
        for handler in route.route_handlers:
            needed = handler.opt.get("scope")
            if needed is None:
                continue  # Litestar's automatic OPTIONS handler
            for granted, rank in SCOPE_RANK.items():
                if rank >= SCOPE_RANK[needed] or granted not in api.keys:
                    continue
                for method in handler.http_methods:
                    kwargs: dict[str, Any] = {}
                    if method in ("POST", "PATCH"):
                        kwargs = {"json": {"description": "changed"}}
                    if path.endswith("/upload"):
                        kwargs = {"files": {"file": ("m.pkl", sklearn_pickle)}}
                    resp = await api.client.request(method, fill(path, model["id"]),
                                                    headers=bearer(api.keys[granted]), **kwargs)
                    assert resp.status_code == 403, (granted, method, path, resp.text)
                    assert resp.json()["error"] == "forbidden"
                    refused += 1
    assert refused >= 5  # create, patch, delete model, delete version, upload
    detail = (await api.client.get(f"/api/v1/models/{model['id']}", headers=api.headers)).json()
    assert detail["description"] == "PRIVATE-DESCRIPTION-31337" and len(detail["versions"]) == 1
    listed = (await api.client.get("/api/v1/models", headers=api.headers)).json()
    assert listed["total"] == 1


async def test_public_routes_hold_no_registry_data(api: Api, sklearn_pickle: bytes) -> None:
    model = await _model_with_version(api, sklearn_pickle)
    detail = (await api.client.get(f"/api/v1/models/{model['id']}", headers=api.headers)).json()
    secrets_ = [model["id"], "PRIVATE-DESCRIPTION-31337", detail["model_hash"].removeprefix("sha256:"),
                *api.keys.values(), str(api.registry.config.data_dir)]
    for path in ("/health", "/", "/schema", "/schema/swagger", "/schema/openapi.json", "/schema/openapi.yaml",
                 "/static/index.html", "/schema/oauth2-redirect.html"):
        resp = await api.client.get(path)
        assert resp.status_code < 500, path
        for secret in secrets_:
            assert secret not in resp.text, (path, secret)


async def test_signed_download_refuses_tampered_expired_and_foreign_links(api: Api, sklearn_pickle: bytes) -> None:
    model = await _model_with_version(api, sklearn_pickle)
    await api.upload(model["id"], sklearn_pickle + b"2", "m.pkl")
    resp = await api.client.get(f"/api/v1/models/{model['id']}/versions/1/download-url", headers=api.headers)
    assert resp.status_code == 200, resp.text
    url = httpx.URL(resp.json()["url"])
    good = await api.client.get(url.raw_path.decode())
    assert good.status_code == 200 and good.content == sklearn_pickle
    query = dict(url.params)
    base = url.path
    sig = query["signature"]
    flipped = ("0" if sig[0] != "0" else "1") + sig[1:]
    variants = [
        (base, {**query, "signature": flipped}),
        (base, {**query, "signature": ""}),
        (base, {**query, "signature": sig.upper()}),
        (base, {**query, "signature": sig[:-1]}),
        (base, {**query, "signature": "x" * 20000}),
        (base, {k: v for k, v in query.items() if k != "signature"}),
        (base, {**query, "expires": str(int(query["expires"]) + 1)}),
        (base, {**query, "expires": "1"}),
        (base, {**query, "expires": "9" * 400}),
        (base, {**query, "expires": "-1"}),
        (base, {**query, "format": "onnx"}),
        (base.replace("/versions/1/", "/versions/2/"), query),
        (base.replace("/versions/1/", "/versions/latest/"), query),
        (base.replace(model["id"], model["id"].upper()), query),
    ]
    for path, params in variants:
        resp = await api.client.get(path, params=params)
        assert resp.status_code in (400, 403, 404), (path, params, resp.status_code)
        assert resp.content != sklearn_pickle and resp.content != sklearn_pickle + b"2"
    # a signed link is no key: it opens nothing under /api/
    resp = await api.client.get(f"/api/v1/models/{model['id']}", params=query)
    assert resp.status_code == 401


def test_keys_are_compared_in_constant_time_and_looked_up_by_hash() -> None:
    """The presented key is hashed before any lookup and the stored hash compared with hmac.compare_digest.

    (A wall-clock test cannot see a string comparison's nanoseconds behind a database round trip, so this
    checks the code path instead.)
    """
    source = inspect.getsource(Registry.authenticate)
    assert "hash_key(key)" in source and "compare_digest" in source
    assert re.search(r"==\s*key\b|key\s*==", source) is None
    assert hmac.compare_digest(hash_key("oml_a"), hash_key("oml_a"))


async def test_stored_hash_is_what_authenticates_not_the_key(api: Api) -> None:
    """A key exists at rest only as its sha256: the same hash row authenticates the key and only that key."""
    key = api.keys["read"]
    db_path = api.registry.config.data_dir / "registry.sqlite3"
    with sqlite3.connect(db_path) as conn:
        rows = conn.execute("SELECT key_hash, prefix FROM api_keys WHERE name = 'test-read'").fetchall()
    assert rows == [(hash_key(key), key[:8])]
    assert await api.on_app(api.registry.authenticate, hash_key(key)) is None
    assert (await api.on_app(api.registry.authenticate, key)) is not None


def _grep(root: Path, needles: list[bytes]) -> list[tuple[Path, bytes]]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [(path, n) for n in needles if n in data]
    return found


def test_keys_never_reach_the_data_directory_or_the_log(tmp_path: Path, sklearn_pickle: bytes) -> None:
    """A real server with access and debug logs: after traffic with keys (good, bad, revoked), the data directory
    (database, WAL, blobs, temp) holds no key, and the log shows only the first-run admin key, once."""
    home = tmp_path / "data"
    env = {**os.environ, "OCTOMIL_LITE_HOME": str(home)}
    server = Server(home, "--access-log", "--log-level", "debug")
    try:
        banner = re.search(r"oml_[A-Za-z0-9_-]+", server.output())
        assert banner, server.output()
        admin = banner.group(0)
        made = [subprocess.run([sys.executable, "-m", "octomil_lite.cli", "keys", "create", "--name", f"k{i}",
                                "--scope", scope], env=env, capture_output=True, text=True, check=True).stdout.strip()
                for i, scope in enumerate(("read", "write"))]
        with httpx.Client(base_url=server.url, timeout=30) as client:
            model = client.post("/api/v1/models", json={}, headers=bearer(made[1])).json()
            assert client.post(f"/api/v1/models/{model['id']}/versions/upload", headers=bearer(made[1]),
                               files={"file": ("m.pkl", sklearn_pickle)}).status_code == 201
            for key in (admin, *made, made[0] + "x", "oml_" + made[1][4:][::-1]):
                client.get("/api/v1/models", headers=bearer(key))
                client.get(f"/api/v1/models/{model['id']}/versions/1/download", headers=bearer(key))
            subprocess.run([sys.executable, "-m", "octomil_lite.cli", "keys", "revoke", "k0"], env=env, check=True,
                           capture_output=True)
            assert client.get("/api/v1/models", headers=bearer(made[0])).status_code == 401
    finally:
        server.stop()
    keys = [admin, *made]
    assert _grep(home, [k.encode() for k in keys] + [k[4:].encode() for k in keys]) == []
    log = server.output()
    assert log.count(admin) == 2  # the banner and its ready-to-paste curl line
    assert all(k not in log for k in made)
