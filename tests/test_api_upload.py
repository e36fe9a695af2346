"""Upload and download versions: streaming storage, format inference, hashes, headers and errors."""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from pathlib import Path

import onnx
import pytest
from conftest import Api
from onnx import helper


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob_files(api: Api) -> list[Path]:
    return [p for p in api.registry.blobs.root.rglob("*") if p.is_file()]


def tmp_files(api: Api) -> list[Path]:
    return list(api.registry.blobs.tmp.iterdir())


async def test_upload_returns_201_with_spec_fields_and_updates_model(api: Api, sklearn_pickle: bytes) -> None:
    model = await api.create_model(framework="sklearn")
    resp = await api.upload(model["id"], sklearn_pickle, "model.pkl", format="sklearn",
                            description="After round 18 aggregation")
    body = resp.json()
    assert {"model_id", "version", "format", "model_path", "model_size_bytes", "model_hash", "description",
            "uploaded_at"} <= set(body)
    assert body["model_id"] == model["id"] and body["version"] == 1 and body["format"] == "sklearn"
    assert body["model_size_bytes"] == len(sklearn_pickle) and body["model_hash"] == sha(sklearn_pickle)
    assert body["description"] == "After round 18 aggregation"
    digest = body["model_hash"].removeprefix("sha256:")
    blob = api.registry.config.data_dir / "blobs" / "sha256" / digest[:2] / digest
    assert body["model_path"] == blob.resolve().as_uri() and blob.read_bytes() == sklearn_pickle
    got = (await api.client.get(f"/api/v1/models/{model['id']}", headers=api.headers)).json()
    assert got["model_path"] == body["model_path"] and got["model_hash"] == body["model_hash"]
    assert got["model_size_bytes"] == len(sklearn_pickle)
    [summary] = got["versions"]
    assert summary | {"version": 1, "format": "sklearn", "model_size_bytes": len(sklearn_pickle),
                      "description": "After round 18 aggregation", "uploaded_at": body["uploaded_at"]} == summary
    listed = (await api.client.get("/api/v1/models", headers=api.headers)).json()["models"][0]
    assert listed["model_hash"] == body["model_hash"]


async def test_versions_are_numbered_in_upload_order_and_model_describes_newest(api: Api) -> None:
    model = await api.create_model()
    payloads = [b"\x80\x04K" + bytes([i]) + b"." for i in range(3)]
    for i, data in enumerate(payloads, start=1):
        assert (await api.upload(model["id"], data, "m.pkl")).json()["version"] == i
    got = (await api.client.get(f"/api/v1/models/{model['id']}", headers=api.headers)).json()
    assert [v["version"] for v in got["versions"]] == [1, 2, 3]
    assert got["model_hash"] == sha(payloads[-1])


async def test_upload_same_bytes_twice_stores_one_blob_but_two_versions(api: Api, sklearn_pickle: bytes) -> None:
    model = await api.create_model()
    first = (await api.upload(model["id"], sklearn_pickle, "a.pkl")).json()
    second = (await api.upload(model["id"], sklearn_pickle, "b.pkl")).json()
    assert (first["version"], second["version"]) == (1, 2)
    assert first["model_path"] == second["model_path"]
    assert len(blob_files(api)) == 1 and tmp_files(api) == []


async def test_download_serves_original_bytes_with_spec_headers(api: Api, sklearn_pickle: bytes) -> None:
    model = await api.create_model()
    await api.upload(model["id"], sklearn_pickle, "model.pkl")
    for query in ("", "?format=original", "?format=sklearn"):
        resp = await api.client.get(f"/api/v1/models/{model['id']}/versions/1/download{query}", headers=api.headers)
        assert resp.status_code == 200, query
        assert resp.content == sklearn_pickle
        assert resp.headers["content-disposition"] == 'attachment; filename="model_v1.pkl"'
        assert resp.headers["content-length"] == str(len(sklearn_pickle))
        assert resp.headers["x-model-hash"] == sha(sklearn_pickle)


async def test_onnx_upload_downloads_as_onnx(api: Api, onnx_bytes: bytes) -> None:
    model = await api.create_model()
    body = (await api.upload(model["id"], onnx_bytes, "model.onnx")).json()
    assert body["format"] == "onnx"
    resp = await api.client.get(f"/api/v1/models/{model['id']}/versions/1/download?format=onnx", headers=api.headers)
    assert resp.status_code == 200 and resp.content == onnx_bytes
    assert resp.headers["content-disposition"] == 'attachment; filename="model_v1.onnx"'
    assert resp.headers["x-model-hash"] == sha(onnx_bytes)


async def test_download_of_a_format_that_does_not_exist_is_404(api: Api, sklearn_pickle: bytes) -> None:
    model = await api.create_model()
    await api.upload(model["id"], sklearn_pickle, "model.pkl")
    base = f"/api/v1/models/{model['id']}/versions"
    for path in (f"{base}/1/download?format=tflite", f"{base}/2/download", f"{base}/0/download",
                 f"{base}/abc/download", "/api/v1/models/00000000-0000-4000-8000-000000000000/versions/1/download"):
        resp = await api.client.get(path, headers=api.headers)
        assert resp.status_code == 404, path
        assert resp.json()["error"] == "not_found"
    resp = await api.client.get(f"{base}/1/download?format=exe", headers=api.headers)
    assert resp.status_code == 400 and "format" in resp.json()["message"]


async def test_upload_to_unknown_model_is_404(api: Api, sklearn_pickle: bytes) -> None:
    for model_id in ("00000000-0000-4000-8000-000000000000", "nope"):
        resp = await api.upload(model_id, sklearn_pickle, "m.pkl", expect=404)
        assert resp.json()["error"] == "not_found"
    assert tmp_files(api) == [] and blob_files(api) == []


def _zip(names: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in names.items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.mark.parametrize(("filename", "content", "expected"), [
    ("model.bin", b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x07sklearn.", "sklearn"),
    ("clf.pkl", b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x0fxgboost.sklearn.", "xgboost"),
    ("weights.pt", _zip({"archive/data.pkl": b"\x80\x02}q\x00.", "archive/version": b"3\n"}), "pytorch"),
    ("model.keras", _zip({"config.json": b"{}", "metadata.json": b"{}", "model.weights.h5": b""}), "tensorflow"),
    ("model.h5", b"\x89HDF\r\n\x1a\n" + b"\x00" * 100, "tensorflow"),
    ("model.json", b'{"learner": {"attributes": {}}, "version": [2, 1, 0]}', "xgboost"),
    ("model.txt", b"tree\nversion=v4\nnum_class=1\n", "lightgbm"),
])
async def test_format_is_inferred_from_content_when_absent(api: Api, filename: str, content: bytes,
                                                           expected: str) -> None:
    model = await api.create_model()
    assert (await api.upload(model["id"], content, filename)).json()["format"] == expected


async def test_format_inferred_for_onnx_and_sklearn_pickle(api: Api, onnx_bytes: bytes, sklearn_pickle: bytes) -> None:
    model = await api.create_model()
    assert (await api.upload(model["id"], onnx_bytes, "upload")).json()["format"] == "onnx"
    assert (await api.upload(model["id"], sklearn_pickle, "upload")).json()["format"] == "sklearn"


async def test_format_contradicting_content_is_400_naming_both(api: Api, sklearn_pickle: bytes,
                                                               onnx_bytes: bytes) -> None:
    model = await api.create_model()
    resp = await api.upload(model["id"], sklearn_pickle, "m.onnx", expect=400, format="onnx")
    message = resp.json()["message"]
    assert "onnx" in message and "pickle" in message
    resp = await api.upload(model["id"], onnx_bytes, "m.onnx", expect=400, format="pytorch")
    assert "pytorch" in resp.json()["message"] and "ONNX" in resp.json()["message"]
    resp = await api.upload(model["id"], b"just some text", "m.pt", expect=400, format="pytorch")
    assert "pytorch" in resp.json()["message"]
    assert tmp_files(api) == [] and blob_files(api) == []


async def test_unknown_format_value_and_undetectable_content_are_400(api: Api, sklearn_pickle: bytes) -> None:
    model = await api.create_model()
    resp = await api.upload(model["id"], sklearn_pickle, "m.pkl", expect=400, format="caffe")
    assert "format" in resp.json()["message"]
    resp = await api.upload(model["id"], b"hello world", "notes.txt", expect=400)
    assert "format" in resp.json()["message"]
    resp = await api.upload(model["id"], b"", "empty.pkl", expect=400)
    assert "empty" in resp.json()["message"]


async def test_onnx_failing_the_checker_is_400(api: Api) -> None:
    node = helper.make_node("NoSuchOp", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    bad = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    model = await api.create_model()
    resp = await api.upload(model["id"], bad, "bad.onnx", expect=400, format="onnx")
    assert "onnx" in resp.json()["message"].lower()
    assert tmp_files(api) == [] and blob_files(api) == []


async def test_onnx_with_external_data_is_400(api: Api, tmp_path: Path) -> None:
    weights = helper.make_tensor("w", onnx.TensorProto.FLOAT, [1], [0.0])
    weights.data_location = onnx.TensorProto.EXTERNAL
    weights.ClearField("float_data")
    entry = weights.external_data.add()
    entry.key, entry.value = "location", "../../../../etc/passwd"
    node = helper.make_node("Add", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])], [weights])
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    model = await api.create_model()
    resp = await api.upload(model["id"], data, "ext.onnx", expect=400)
    assert "external data" in resp.json()["message"]


async def test_truncated_onnx_given_as_onnx_is_400(api: Api, onnx_bytes: bytes) -> None:
    model = await api.create_model()
    resp = await api.upload(model["id"], onnx_bytes[: len(onnx_bytes) // 2], "m.onnx", expect=400, format="onnx")
    assert resp.json()["error"] == "bad_request"


async def test_upload_without_file_part_or_multipart_is_400(api: Api) -> None:
    model = await api.create_model()
    url = f"/api/v1/models/{model['id']}/versions/upload"
    resp = await api.client.post(url, headers=api.headers, data={"format": "onnx"},
                                 files={"other": ("x", b"abc")})
    assert resp.status_code == 400 and "'file'" in resp.json()["message"]
    resp = await api.client.post(url, headers=api.headers, json={"file": "abc"})
    assert resp.status_code == 400 and "multipart" in resp.json()["message"]
    resp = await api.client.post(url, content=b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; "
                                 b"filename=\"a\"\r\n\r\nabc", headers={**api.headers,
                                 "content-type": "multipart/form-data; boundary=xyz"})
    assert resp.status_code == 400 and "malformed" in resp.json()["message"]
    assert tmp_files(api) == [] and blob_files(api) == []


async def test_upload_ignores_form_fields_it_does_not_define(api: Api, sklearn_pickle: bytes) -> None:
    model = await api.create_model()
    resp = await api.upload(model["id"], sklearn_pickle, "m.pkl", version="1.0.0", architecture="mlp",
                            input_dim="4")
    assert resp.json()["version"] == 1


async def test_upload_description_over_1000_characters_is_400(api: Api, sklearn_pickle: bytes) -> None:
    model = await api.create_model()
    await api.upload(model["id"], sklearn_pickle, "m.pkl", expect=400, description="x" * 1001)
    assert blob_files(api) == []


async def test_upload_over_max_size_is_413_and_leaves_nothing(tmp_path: Path) -> None:
    from conftest import bearer, on_app_loop
    from litestar.testing import AsyncTestClient

    from octomil_lite.config import Config
    from octomil_lite.server.app import create_app

    config = Config(data_dir=tmp_path / "small", rate_limit=0, max_upload_size=2 * 1024 * 1024)
    async with AsyncTestClient(app=create_app(config)) as client:
        key = await on_app_loop(client, client.app.state.registry.create_key, "k", "admin")
        model = (await client.post("/api/v1/models", json={}, headers=bearer(key))).json()
        url = f"/api/v1/models/{model['id']}/versions/upload"
        big = b"\x80\x04" + os.urandom(2 * 1024 * 1024)
        resp = await client.post(url, headers=bearer(key), files={"file": ("m.pkl", big)})
        assert resp.status_code == 413 and resp.json()["error"] == "payload_too_large"

        ok = await client.post(url, headers=bearer(key), files={"file": ("m.pkl", big[: 1024 * 1024])})
        assert ok.status_code == 201
        registry = client.app.state.registry
        assert list(registry.blobs.tmp.iterdir()) == []
        assert len([p for p in registry.blobs.root.rglob("*") if p.is_file()]) == 1


async def test_missing_blob_on_disk_is_a_json_500(api: Api, sklearn_pickle: bytes) -> None:
    model = await api.create_model()
    body = (await api.upload(model["id"], sklearn_pickle, "m.pkl")).json()
    path = Path(body["model_path"].removeprefix("file://"))
    path.chmod(0o644)
    path.unlink()
    resp = await api.client.get(f"/api/v1/models/{model['id']}/versions/1/download", headers=api.headers)
    assert resp.status_code == 500
    assert resp.json()["error"] == "internal_error" and "verify" in resp.json()["message"]
