"""Create, list and retrieve models: the hosted API's fields, filters, paging and errors."""

from __future__ import annotations

import re

import pytest
from conftest import Api

pytestmark = pytest.mark.backends  # every test here runs on SQLite + directory and on PostgreSQL + S3

MODEL_FIELDS = {"id", "round_id", "model_path", "model_size_bytes", "model_hash", "framework", "framework_version",
                "accuracy", "loss", "is_baseline", "description", "created_at"}
RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


async def test_create_model_returns_201_with_every_field(api: Api) -> None:
    body = {"framework": "pytorch", "framework_version": "2.1.0", "description": "MNIST", "is_baseline": True}
    resp = await api.client.post("/api/v1/models", json=body, headers=api.headers)
    assert resp.status_code == 201
    model = resp.json()
    assert set(model) >= MODEL_FIELDS
    assert {k: model[k] for k in body} == body
    assert model["model_path"] is None and model["model_hash"] is None and model["model_size_bytes"] is None
    assert RFC3339.fullmatch(model["created_at"])


async def test_create_model_with_empty_body_uses_defaults(api: Api) -> None:
    resp = await api.client.post("/api/v1/models", headers=api.headers)
    assert resp.status_code == 201
    assert resp.json()["is_baseline"] is False and resp.json()["framework"] is None


async def test_create_model_ignores_fields_it_does_not_define(api: Api) -> None:
    model = await api.create_model(name="mnist", use_case="vision", org_id="acme", framework="sklearn")
    assert model["framework"] == "sklearn"


async def test_create_model_rejects_bad_bodies_with_400(api: Api) -> None:
    cases = [
        (b"[1, 2]", "JSON object"),
        (b"not json", "JSON"),
        (b'{"framework": "caffe"}', "framework"),
        (b'{"is_baseline": "true"}', "is_baseline"),
        (b'{"framework_version": 2}', "framework_version"),
        (b'{"description": "' + b"x" * 1001 + b'"}', "description"),
    ]
    for body, field in cases:
        resp = await api.client.post("/api/v1/models", content=body,
                                     headers={**api.headers, "content-type": "application/json"})
        assert resp.status_code == 400, body
        error = resp.json()
        assert error["error"] == "bad_request"
        assert field in error["message"], error


async def test_description_of_exactly_1000_characters_is_accepted(api: Api) -> None:
    assert (await api.create_model(description="x" * 1000))["description"] == "x" * 1000


async def test_list_models_newest_first_with_total_limit_offset(api: Api) -> None:
    ids = [(await api.create_model(description=f"m{i}"))["id"] for i in range(5)]
    resp = await api.client.get("/api/v1/models", params={"limit": 2, "offset": 1}, headers=api.headers)
    assert resp.status_code == 200
    page = resp.json()
    assert page["total"] == 5 and page["limit"] == 2 and page["offset"] == 1
    assert [m["id"] for m in page["models"]] == [ids[3], ids[2]]
    assert all(set(m) >= MODEL_FIELDS for m in page["models"])


async def test_list_models_defaults_to_limit_20(api: Api) -> None:
    for _ in range(21):
        await api.create_model()
    page = (await api.client.get("/api/v1/models", headers=api.headers)).json()
    assert page["limit"] == 20 and page["offset"] == 0 and len(page["models"]) == 20 and page["total"] == 21


async def test_list_models_filters_by_framework_and_baseline(api: Api) -> None:
    await api.create_model(framework="pytorch", is_baseline=True)
    await api.create_model(framework="pytorch")
    await api.create_model(framework="sklearn", is_baseline=True)
    get = api.client.get
    page = (await get("/api/v1/models", params={"framework": "pytorch"}, headers=api.headers)).json()
    assert page["total"] == 2 and {m["framework"] for m in page["models"]} == {"pytorch"}
    page = (await get("/api/v1/models", params={"is_baseline": "true"}, headers=api.headers)).json()
    assert page["total"] == 2 and all(m["is_baseline"] for m in page["models"])
    page = (await get("/api/v1/models", params={"framework": "pytorch", "is_baseline": "false"},
                      headers=api.headers)).json()
    assert page["total"] == 1 and not page["models"][0]["is_baseline"]


async def test_list_models_ignores_unknown_query_parameters(api: Api) -> None:
    resp = await api.client.get("/api/v1/models", params={"org_id": "acme", "limit": 100}, headers=api.headers)
    assert resp.status_code == 200


async def test_list_models_rejects_out_of_range_paging_and_unknown_framework(api: Api) -> None:
    for params in ({"limit": 0}, {"limit": 101}, {"limit": "x"}, {"offset": -1}, {"framework": "caffe"},
                   {"is_baseline": "maybe"}):
        resp = await api.client.get("/api/v1/models", params=params, headers=api.headers)
        assert resp.status_code == 400, params
        body = resp.json()
        assert body["error"] == "bad_request" and next(iter(params)) in body["message"]


async def test_get_model_returns_metadata_and_empty_versions(api: Api) -> None:
    created = await api.create_model(framework="xgboost", description="d")
    resp = await api.client.get(f"/api/v1/models/{created['id']}", headers=api.headers)
    assert resp.status_code == 200
    model = resp.json()
    assert {k: model[k] for k in created} == created
    assert model["versions"] == []


async def test_get_unknown_or_malformed_model_is_404(api: Api) -> None:
    for model_id in ("00000000-0000-4000-8000-000000000000", "not-a-uuid", "1" * 500):
        resp = await api.client.get(f"/api/v1/models/{model_id}", headers=api.headers)
        assert resp.status_code == 404, model_id
        assert resp.json()["error"] == "not_found"
    resp = await api.client.get("/api/v1/models/%00", headers=api.headers)
    assert resp.status_code in (400, 404) and resp.json()["error"] in ("bad_request", "not_found")


async def test_unknown_route_and_wrong_method_are_json_errors(api: Api) -> None:
    resp = await api.client.get("/api/v1/nothing-here", headers=api.headers)
    assert resp.status_code == 404 and resp.json()["error"] == "not_found"
    resp = await api.client.put("/api/v1/models", headers=api.headers)
    assert resp.status_code == 405 and resp.json()["error"] == "method_not_allowed"
    for page in ("/no/such/page", "/schema/redoc", "/static/nope.js"):
        resp = await api.client.get(page)
        assert resp.status_code == 404 and resp.headers["content-type"].startswith("application/json"), page
        assert resp.json()["error"] == "not_found"


async def test_health_needs_no_key(api: Api) -> None:
    resp = await api.client.get("/health")
    assert resp.status_code == 200
    body = resp.json()
    assert body["status"] == "ok" and body["version"]


async def test_messages_say_not_valid_json_and_list_the_allowed_frameworks(api: Api) -> None:
    headers = {**api.headers, "content-type": "application/json"}
    for body in (b'{"framework": "sklearn"', b"not json"):
        resp = await api.client.post("/api/v1/models", content=body, headers=headers)
        assert resp.status_code == 400 and "not valid JSON" in resp.json()["message"], resp.text
        assert "truncated" not in resp.json()["message"]
    model = await api.create_model()
    resp = await api.client.patch(f"/api/v1/models/{model['id']}", content=b'{"accuracy": ', headers=headers)
    assert resp.status_code == 400 and "not valid JSON" in resp.json()["message"]
    resp = await api.client.post("/api/v1/models", json={"framework": "caffe"}, headers=api.headers)
    assert resp.status_code == 400 and "pytorch, tensorflow, xgboost, sklearn" in resp.json()["message"]
    resp = await api.client.get("/api/v1/models?framework=caffe", headers=api.headers)
    assert resp.status_code == 400 and "pytorch, tensorflow, xgboost, sklearn" in resp.json()["message"]
    resp = await api.client.post("/api/v1/models", content=b"{" + b" " * (1024 * 1024) + b"}", headers=headers)
    assert resp.status_code == 413 and "1.0 MiB" in resp.json()["message"]
    assert (await api.client.get("/api/v1/models", headers=api.headers)).json()["total"] == 1


async def test_format_names_take_the_right_article(api: Api, sklearn_pickle: bytes) -> None:
    model = await api.create_model()
    resp = await api.upload(model["id"], b"some text", "m.onnx", expect=400, format="onnx")
    assert "look like an ONNX model" in resp.json()["message"]
    await api.upload(model["id"], sklearn_pickle, "m.pkl")
    resp = await api.client.get(f"/api/v1/models/{model['id']}/versions/1/download?format=pytorch",
                                headers=api.headers)
    assert resp.status_code == 404 and "is a scikit-learn model" in resp.json()["message"]
