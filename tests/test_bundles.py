"""Bundles: export and import between real registries (CLI on data directories, HTTP between real servers), and
refusal of bundles that are tampered with, truncated, hostile or clashing, with nothing half-imported."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sqlite3
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Server, bearer, make_key

from octomil_lite import transfer
from octomil_lite.bundles import BLOB_PREFIX, MANIFEST
from octomil_lite.config import Config
from octomil_lite.errors import BadRequest, Conflict
from octomil_lite.registry import Registry


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "octomil_lite.cli", *args, "--data-dir", str(home)],
                          capture_output=True, text=True, timeout=120)


class Source:
    def __init__(self, server: Server, key: str, model_ids: list[str]):
        self.server, self.key, self.model_ids = server, key, model_ids


def _wait_onnx(client: httpx.Client, model_id: str, version: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        resp = client.get(f"/api/v1/models/{model_id}/versions/{version}/download", params={"format": "onnx"})
        if resp.status_code == 200:
            return
        assert resp.status_code == 404 and "Retry-After" in resp.headers, resp.text
        time.sleep(0.2)
    raise AssertionError("the ONNX conversion did not finish")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory, sklearn_pickle: bytes, onnx_bytes: bytes) -> Iterator[Source]:
    """A real server with two models: sklearn (two labelled versions, one converted to ONNX) and an ONNX upload."""
    home = tmp_path_factory.mktemp("source") / "data"
    key = make_key(home, "src", "admin")
    server = Server(home)
    try:
        with httpx.Client(base_url=server.url, headers=bearer(key), timeout=60) as client:
            iris = client.post("/api/v1/models", json={"name": "iris", "framework": "sklearn", "use_case": "tabular",
                                                       "description": "irises"}).json()["id"]
            for label, extra in (("1.0.0", {"accuracy": "0.91", "loss": "0.2", "round_id": "r-1"}),
                                 ("1.1.0", {"description": "retrained", "accuracy": "0.93"})):
                resp = client.post(f"/api/v1/models/{iris}/versions/upload", files={"file": ("m.pkl", sklearn_pickle)},
                                   data={"version": label, "input_shape": "1,4", **extra})
                assert resp.status_code == 201, resp.text
            _wait_onnx(client, iris, 1)
            _wait_onnx(client, iris, 2)  # every conversion done: the snapshots compared must not move
            plain = client.post("/api/v1/models", json={"name": "linear"}).json()["id"]
            resp = client.post(f"/api/v1/models/{plain}/versions/upload", files={"file": ("m.onnx", onnx_bytes)})
            assert resp.status_code == 201, resp.text
        yield Source(server, key, [iris, plain])
    finally:
        server.stop()


def snapshot(url: str, key: str, model_ids: list[str]) -> dict[str, Any]:
    """Everything a client sees of the models: metadata, versions, ready formats and the sha256 of their bytes."""
    seen: dict[str, Any] = {}
    with httpx.Client(base_url=url, headers=bearer(key), timeout=60) as client:
        for model_id in model_ids:
            model = client.get(f"/api/v1/models/{model_id}").json()
            model.pop("model_path")
            seen[model_id] = model
            for v in model["versions"]:
                detail = client.get(f"/api/v1/models/{model_id}/versions/{v['version']}").json()
                detail.pop("model_path")
                ready = {f: s for f, s in detail.pop("formats").items() if s["status"] == "ready"}
                for fmt in ready:
                    body = client.get(f"/api/v1/models/{model_id}/versions/{v['version']}/download",
                                      params={"format": fmt}).content
                    ready[fmt]["downloaded"] = hashlib.sha256(body).hexdigest()
                seen[f"{model_id}/{v['version']}"] = {**detail, "ready": ready}
    return seen


def test_cli_round_trip_between_two_data_directories(source: Source, tmp_path: Path) -> None:
    bundle = tmp_path / "models.tar"
    out = cli(source.server.data_dir, "export", "--all", "-o", str(bundle))
    assert out.returncode == 0, out.stderr
    assert not bundle.with_name("models.tar.partial").exists()
    with tarfile.open(bundle) as tar:
        names = tar.getnames()
        manifest = json.load(tar.extractfile(MANIFEST))  # type: ignore[arg-type]
    assert names[0] == MANIFEST and all(n.startswith(BLOB_PREFIX) for n in names[1:])
    assert manifest["format_version"] == 1 and len(manifest["models"]) == 2
    assert {f["sha256"] for f in manifest["files"]} == {n.removeprefix(BLOB_PREFIX) for n in names[1:]}
    iris = next(m for m in manifest["models"] if m["name"] == "iris")
    assert [v["label"] for v in iris["versions"]] == ["1.0.0", "1.1.0"]
    assert iris["versions"][0]["round_id"] == "r-1" and iris["versions"][0]["artifacts"][0]["format"] == "onnx"

    target = tmp_path / "target"
    out = cli(target, "import", str(bundle))
    assert out.returncode == 0, out.stderr
    assert "2 new model(s), 3 version(s)" in out.stderr
    assert cli(target, "verify").returncode == 0
    key = make_key(target, "t", "read")
    server = Server(target)
    try:
        assert snapshot(server.url, key, source.model_ids) == snapshot(source.server.url, source.key,
                                                                        source.model_ids)
    finally:
        server.stop()

    only_original = tmp_path / "original.tar"
    assert cli(source.server.data_dir, "export", "iris", "--formats", "original", "-o",
               str(only_original)).returncode == 0
    with tarfile.open(only_original) as tar:
        manifest = json.load(tar.extractfile(MANIFEST))  # type: ignore[arg-type]
    assert [v["artifacts"] for v in manifest["models"][0]["versions"]] == [[], []]
    bad = cli(source.server.data_dir, "export", "iris", "--formats", "pdf", "-o", str(tmp_path / "x.tar"))
    assert bad.returncode != 0 and "pdf" in bad.stderr and not (tmp_path / "x.tar").exists()


def test_http_round_trip_between_two_servers_streams_the_bundle(source: Source, tmp_path: Path) -> None:
    target = tmp_path / "target"
    admin, reader = make_key(target, "admin", "admin"), make_key(target, "reader", "read")
    server = Server(target)
    try:
        with httpx.Client(headers=bearer(source.key), timeout=60) as src, httpx.Client(timeout=60) as dst:
            refused = dst.post(f"{server.url}/api/v1/import", content=b"", headers=bearer(reader))
            assert refused.status_code == 403
            for model_id in source.model_ids:
                with src.stream("GET", f"{source.server.url}/api/v1/models/{model_id}/export") as exported:
                    assert exported.status_code == 200
                    assert exported.headers["content-type"] == "application/x-tar"
                    assert int(exported.headers["content-length"]) > 0
                    imported = dst.post(f"{server.url}/api/v1/import", content=exported.iter_bytes(),
                                        headers={**bearer(admin), "content-type": "application/x-tar"})
                assert imported.status_code == 200, imported.text
                assert imported.json()["models"] == 1
        assert snapshot(server.url, reader, source.model_ids) == snapshot(source.server.url, source.key,
                                                                          source.model_ids)
    finally:
        server.stop()


# hand-made bundles, written with tarfile as the README documents the format


def _member(tar: tarfile.TarFile, name: str, data: bytes, kind: bytes = tarfile.REGTYPE) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.type = (len(data), kind) if kind == tarfile.REGTYPE else (0, kind)
    if kind == tarfile.SYMTYPE:
        info.linkname = "/etc/passwd"
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _version(number: int, data: bytes, label: str | None = None) -> dict[str, Any]:
    return {"number": number, "label": label, "format": "onnx", "kind": "onnx",
            "sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "uploaded_at": "2026-01-01T00:00:00Z"}


def craft(path: Path, models: list[dict[str, Any]], blobs: list[bytes],
          extra: list[tuple[str, bytes, bytes]] | None = None, listed: list[bytes] | None = None) -> Path:
    """A bundle: the manifest (listing `listed`, by default `blobs`), the `extra` members, then the blobs."""
    files = {hashlib.sha256(b).hexdigest(): b for b in blobs}
    manifest = {"format": "octomil-lite-bundle", "format_version": 1, "models": models,
                "files": [{"sha256": hashlib.sha256(b).hexdigest(), "size": len(b)}
                          for b in (blobs if listed is None else listed)]}
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        _member(tar, MANIFEST, json.dumps(manifest).encode())
        for name, data, kind in extra or []:
            _member(tar, name, data, kind)
        for digest, data in files.items():
            _member(tar, BLOB_PREFIX + digest, data)
    return path


def _model(versions: list[dict[str, Any]], model_id: str | None = None, name: str | None = None) -> dict[str, Any]:
    return {"id": model_id or str(uuid.uuid4()), "name": name, "created_at": "2026-01-01T00:00:00Z",
            "versions": versions}


async def _import(home: Path, bundle: Path) -> dict[str, int]:
    registry = await Registry.open(Config(data_dir=home, conversion_workers=0))
    try:
        with open(bundle, "rb") as f:
            return await transfer.import_bundle(registry.db, registry.blobs, f)
    finally:
        await registry.close()


def _state(home: Path) -> tuple[list[Any], list[Any], list[str]]:
    """Rows and stored files of a data directory (tmp/ must be empty: nothing staged is left behind)."""
    with sqlite3.connect(home / "registry.sqlite3") as db:
        models = db.execute("SELECT id, name, next_version FROM models ORDER BY id").fetchall()
        versions = db.execute("SELECT model_seq, number, label, digest FROM versions ORDER BY seq").fetchall()
    assert list((home / "tmp").iterdir()) == []
    return models, versions, sorted(str(p.relative_to(home)) for p in (home / "blobs").rglob("*") if p.is_file())


async def _refused(home: Path, bundle: Path, error: type[Exception], *needles: str) -> None:
    before = _state(home) if (home / "registry.sqlite3").exists() else ([], [], [])
    with pytest.raises(error) as caught:
        await _import(home, bundle)
    for needle in needles:
        assert needle in str(caught.value)
    assert _state(home) == before


async def test_tampered_member_is_refused_naming_it_and_nothing_is_imported(tmp_path: Path) -> None:
    good, other = b"model bytes " * 100, b"second model"
    bundle = craft(tmp_path / "b.tar", [_model([_version(1, good), _version(2, other)])], [good, other])
    with tarfile.open(bundle) as tar:
        member = tar.getmember(BLOB_PREFIX + hashlib.sha256(other).hexdigest())
    raw = bytearray(bundle.read_bytes())
    raw[member.offset_data] ^= 1
    bundle.write_bytes(raw)
    await _refused(tmp_path / "home", bundle, BadRequest, member.name, "tampered")

    # over HTTP too, as a JSON 400 naming the member
    home = tmp_path / "served"
    key = make_key(home, "a", "admin")
    server = Server(home)
    try:
        resp = httpx.post(f"{server.url}/api/v1/import", content=bundle.read_bytes(), headers=bearer(key))
        assert resp.status_code == 400 and member.name in resp.json()["message"]
    finally:
        server.stop()
    assert _state(home)[:2] == ([], [])


async def test_truncated_bundles_are_refused_naming_the_member(tmp_path: Path) -> None:
    first, second = os.urandom(3000), os.urandom(5000)
    bundle = craft(tmp_path / "b.tar", [_model([_version(1, first), _version(2, second)])], [first, second])
    with tarfile.open(bundle) as tar:
        a, b = (tar.getmember(BLOB_PREFIX + hashlib.sha256(x).hexdigest()) for x in (first, second))
    raw = bundle.read_bytes()
    home = tmp_path / "home"
    cut = tmp_path / "cut.tar"
    cut.write_bytes(raw[: b.offset_data + 1000])  # inside the second blob
    await _refused(home, cut, BadRequest, b.name, "truncated")
    cut.write_bytes(raw[: b.offset])  # at a member boundary: the second blob is simply missing
    await _refused(home, cut, BadRequest, b.name, "missing")
    cut.write_bytes(raw[: a.offset - 100])  # inside the manifest
    await _refused(home, cut, BadRequest, MANIFEST)
    cut.write_bytes(b"")
    await _refused(home, cut, BadRequest, "not a tar")

    out = cli(home, "import", str(cut))
    assert out.returncode == 1 and "not a tar" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("name, kind", [("../../escape", tarfile.REGTYPE), ("/tmp/escape", tarfile.REGTYPE),
                                        ("blobs/sha256/../../../escape", tarfile.REGTYPE),
                                        ("{digest}", tarfile.SYMTYPE)])
async def test_member_names_never_choose_a_path(tmp_path: Path, name: str, kind: bytes) -> None:
    data = b"payload"
    name = name.format(digest=BLOB_PREFIX + hashlib.sha256(data).hexdigest())
    stored = [data] if kind == tarfile.REGTYPE else []  # a link stands in for the listed blob
    bundle = craft(tmp_path / "b.tar", [_model([_version(1, data)])], stored, [(name, data, kind)], listed=[data])
    home = tmp_path / "home" / "data"
    await _refused(home, bundle, BadRequest, name[:60])
    assert not list(tmp_path.rglob("escape"))


async def test_clashes_are_all_reported_and_nothing_is_imported(tmp_path: Path) -> None:
    home = tmp_path / "home"
    model_id = str(uuid.uuid4())
    v1, v2 = b"first bytes", b"second bytes"
    await _import(home, craft(tmp_path / "a.tar", [_model([_version(1, v1, "1.0")], model_id, "resnet")], [v1]))

    fresh = _model([_version(1, b"fresh")])
    clashing = [fresh,
                _model([_version(1, v2), _version(2, v2, "1.0x"), _version(3, v2, "1.0")], model_id),
                _model([_version(1, v2)], name="resnet")]
    bundle = craft(tmp_path / "b.tar", clashing, [b"fresh", v2])
    with pytest.raises(Conflict) as caught:
        await _import(home, bundle)
    details = caught.value.details or []
    assert len(details) == 3
    assert any(f"{model_id} version 1: here it has other bytes" in d for d in details)
    assert any("label '1.0' is version 1 here" in d for d in details)
    assert any("the name 'resnet' is taken" in d for d in details)
    models, versions, blobs = _state(home)
    assert [m[0] for m in models] == [model_id] and len(versions) == 1 and len(blobs) == 1

    out = cli(home, "import", str(bundle))
    assert out.returncode == 1 and "nothing was imported" in out.stderr


async def test_import_is_idempotent_and_adds_only_new_versions(tmp_path: Path) -> None:
    home = tmp_path / "home"
    model_id = str(uuid.uuid4())
    v1, v2 = b"one", b"two"
    first = craft(tmp_path / "a.tar", [_model([_version(1, v1, "a")], model_id, "m")], [v1])
    assert (await _import(home, first))["versions"] == 1
    state = _state(home)
    again = await _import(home, first)
    assert again == {"models": 0, "versions": 0, "versions_present": 1, "artifacts": 0, "files": 1, "bytes": 3}
    assert _state(home) == state
    grown = craft(tmp_path / "b.tar", [_model([_version(1, v1, "a"), _version(7, v2, "b")], model_id, "m")], [v1, v2])
    assert (await _import(home, grown))["versions"] == 1
    models, versions, _ = _state(home)
    assert models == [(model_id, "m", 8)] and [v[1] for v in versions] == [1, 7]


async def test_ten_thousand_tiny_entries_round_trip(tmp_path: Path) -> None:
    blobs = [f"tiny model {i}".encode() for i in range(10_000)]
    models = [_model([_version(j + 1, blobs[i * 100 + j], f"v{j}") for j in range(100)], name=f"m{i}")
              for i in range(100)]
    bundle = craft(tmp_path / "many.tar", models, blobs)
    home = tmp_path / "home"
    started = time.monotonic()
    done = await _import(home, bundle)
    imported_in = time.monotonic() - started
    assert done["models"] == 100 and done["versions"] == 10_000 and done["files"] == 10_000

    registry = await Registry.open(Config(data_dir=home, conversion_workers=0))
    try:
        plan = await transfer.plan_export(registry, None)
        exported = b"".join(plan.chunks(registry.blobs.open))
    finally:
        await registry.close()
    assert len(exported) == plan.length()
    with tarfile.open(fileobj=io.BytesIO(exported)) as tar:
        manifest = json.load(tar.extractfile(MANIFEST))  # type: ignore[arg-type]
        assert len(tar.getnames()) == 10_001
    assert sorted(m["name"] for m in manifest["models"]) == sorted(m["name"] for m in models)
    again = {m["id"]: [(v["number"], v["label"], v["sha256"]) for v in m["versions"]] for m in manifest["models"]}
    assert again == {m["id"]: [(v["number"], v["label"], v["sha256"]) for v in m["versions"]] for m in models}
    print(f"imported 10,000 entries in {imported_in:.1f} s")
