"""What the Octomil SDK relies on beyond the spec: names, labels, targets, signed links, external ONNX weights."""

from __future__ import annotations

import hashlib
import io
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import Api
from onnx import helper, numpy_helper
from onnx.external_data_helper import convert_model_to_external_data

pytestmark = pytest.mark.backends  # every test here runs on SQLite + directory and on PostgreSQL + S3


async def test_create_with_an_existing_name_returns_that_model(api: Api) -> None:
    first = await api.create_model(name="mnist", framework="pytorch", use_case="vision", org_id="default")
    again = await api.client.post("/api/v1/models", json={"name": "mnist", "framework": "pytorch", "description": ""},
                                  headers=api.headers)
    assert again.status_code == 200 and again.json()["id"] == first["id"]
    clash = await api.client.post("/api/v1/models", json={"name": "mnist", "framework": "sklearn"}, headers=api.headers)
    assert clash.status_code == 409 and clash.json()["error"] == "conflict"
    total = (await api.client.get("/api/v1/models", headers=api.headers)).json()["total"]
    assert total == 1


async def test_a_model_name_works_wherever_an_id_does(api: Api, sklearn_pickle: bytes) -> None:
    model = await api.create_model(name="churn", use_case="tabular")
    await api.upload("churn", sklearn_pickle, "m.pkl")
    got = (await api.client.get("/api/v1/models/churn", headers=api.headers)).json()
    assert got["id"] == model["id"] and got["name"] == "churn" and got["use_case"] == "tabular"
    resp = await api.client.get("/api/v1/models/churn/versions/latest/download", headers=api.headers)
    assert resp.status_code == 200 and resp.content == sklearn_pickle


async def test_list_filters_by_name_and_use_case(api: Api) -> None:
    await api.create_model(name="a", use_case="vision")
    await api.create_model(name="b", use_case="speech")
    await api.create_model(name="c", use_case="vision")
    page = (await api.client.get("/api/v1/models", params={"use_case": "vision"}, headers=api.headers)).json()
    assert page["total"] == 2 and {m["name"] for m in page["models"]} == {"a", "c"}
    page = (await api.client.get("/api/v1/models", params={"name": "b"}, headers=api.headers)).json()
    assert [m["name"] for m in page["models"]] == ["b"]


async def test_version_labels_address_versions_and_must_be_unique(api: Api, sklearn_pickle: bytes) -> None:
    model = await api.create_model()
    body = (await api.upload(model["id"], sklearn_pickle, "m.pkl", version="1.0.0")).json()
    assert body["label"] == "1.0.0" and body["version"] == 1
    dup = await api.upload(model["id"], sklearn_pickle, "m.pkl", expect=409, version="1.0.0")
    assert dup.json()["error"] == "conflict"
    await api.upload(model["id"], b"\x80\x04K\x01.", "m.pkl", version="1.1.0")
    base = f"/api/v1/models/{model['id']}/versions"
    assert (await api.client.get(f"{base}/1.0.0/download", headers=api.headers)).content == sklearn_pickle
    latest = (await api.client.get(f"{base}/latest", headers=api.headers)).json()
    assert latest["version"] == 2 and latest["label"] == "1.1.0"
    for bad in ("7", "latest", "a/b"):
        await api.upload(model["id"], sklearn_pickle, "m.pkl", expect=400, version=bad)


async def test_formats_field_queues_conversions_instead_of_naming_the_source(api: Api, sklearn_pickle: bytes) -> None:
    model = await api.create_model()
    keras = io.BytesIO()
    with zipfile.ZipFile(keras, "w") as zf:  # recognised as a Keras archive by its member names
        for name in ("config.json", "metadata.json", "model.weights.h5"):
            zf.writestr(name, b"{}")
    body = (await api.upload(model["id"], keras.getvalue(), "m.keras", formats="onnx,coreml,bogus")).json()
    assert body["format"] == "tensorflow"
    assert body["formats"] == {"coreml": "pending", "onnx": "pending"}
    detail = (await api.client.get(f"/api/v1/models/{model['id']}/versions/1", headers=api.headers)).json()
    assert detail["formats"]["coreml"]["status"] == "pending"
    assert detail["formats"]["tflite"]["status"] == "on_request"
    # what the source can never become is not queued: it is impossible at once
    body = (await api.upload(model["id"], sklearn_pickle, "m.pkl", formats="onnx,coreml")).json()
    assert body["format"] == "sklearn" and body["formats"]["coreml"] == "impossible"


async def test_download_url_is_signed_expiring_and_bound_to_one_file(api: Api, sklearn_pickle: bytes,
                                                                     onnx_bytes: bytes) -> None:
    model = await api.create_model()
    await api.upload(model["id"], sklearn_pickle, "m.pkl")
    await api.upload(model["id"], onnx_bytes, "m.onnx")
    resp = await api.client.get(f"/api/v1/models/{model['id']}/versions/1/download-url", headers=api.headers)
    assert resp.status_code == 200
    signed = resp.json()
    assert signed["url"].startswith("http") and signed["expires_at"].endswith("Z")
    url = signed["url"].split("://", 1)[1].split("/", 1)[1]
    ok = await api.client.get("/" + url)
    assert ok.status_code == 200 and ok.content == sklearn_pickle
    assert ok.headers["x-model-hash"] == "sha256:" + hashlib.sha256(sklearn_pickle).hexdigest()
    assert ok.headers["content-disposition"] == 'attachment; filename="model_v1.pkl"'
    for altered in (url.replace("/versions/1/", "/versions/2/"), url.replace("format=original", "format=onnx"),
                    url[:-1] + ("0" if url[-1] != "0" else "1"), url.replace("&signature=", "&x=")):
        refused = await api.client.get("/" + altered)
        assert refused.status_code in (401, 403), altered
        assert refused.json()["error"] in ("unauthorized", "forbidden")
    short = (await api.client.get(f"/api/v1/models/{model['id']}/versions/1/download-url",
                                  params={"expires_in": 1}, headers=api.headers)).json()
    time.sleep(2.1)
    expired = await api.client.get("/" + short["url"].split("://", 1)[1].split("/", 1)[1])
    assert expired.status_code == 403 and "expired" in expired.json()["message"]


def _external_model(tmp_path: Path) -> tuple[bytes, bytes, np.ndarray]:
    weights = np.arange(4096, dtype=np.float32).reshape(64, 64) / 4096
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])],
                              [numpy_helper.from_array(weights, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    convert_model_to_external_data(model, location="model.onnx.data", size_threshold=0)
    onnx.save_model(model, tmp_path / "model.onnx")
    return (tmp_path / "model.onnx").read_bytes(), (tmp_path / "model.onnx.data").read_bytes(), weights


async def test_onnx_data_is_folded_into_one_self_contained_model(api: Api, tmp_path: Path) -> None:
    model_bytes, data, weights = _external_model(tmp_path)
    model = await api.create_model()
    resp = await api.client.post(f"/api/v1/models/{model['id']}/versions/upload", headers=api.headers,
                                 files={"file": ("model.onnx", model_bytes), "onnx_data": ("model.onnx.data", data)})
    assert resp.status_code == 201, resp.text
    body = resp.json()
    served = await api.client.get(f"/api/v1/models/{model['id']}/versions/1/download?format=onnx", headers=api.headers)
    assert served.status_code == 200
    served_hash = "sha256:" + hashlib.sha256(served.content).hexdigest()
    assert served.headers["x-model-hash"] == served_hash == body["model_hash"]
    session = ort.InferenceSession(served.content, providers=["CPUExecutionProvider"])
    x = np.ones((1, 64), dtype=np.float32)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ weights, rtol=1e-5)


async def test_onnx_data_must_be_the_file_the_model_names(api: Api, tmp_path: Path, sklearn_pickle: bytes) -> None:
    model_bytes, data, _ = _external_model(tmp_path)
    model = await api.create_model()
    url = f"/api/v1/models/{model['id']}/versions/upload"
    wrong = await api.client.post(url, headers=api.headers,
                                  files={"file": ("model.onnx", model_bytes), "onnx_data": ("other.bin", data)})
    assert wrong.status_code == 400 and "model.onnx.data" in wrong.json()["message"]
    traversal = await api.client.post(url, headers=api.headers, files={
        "file": ("model.onnx", model_bytes), "onnx_data": ("../../model.onnx.data", data)})
    assert traversal.status_code in (201, 400)
    misplaced = await api.client.post(url, headers=api.headers,
                                      files={"file": ("m.pkl", sklearn_pickle), "onnx_data": ("x.data", data)})
    assert misplaced.status_code == 400
    tmp = api.registry.blobs.tmp
    assert list(tmp.iterdir()) == []
