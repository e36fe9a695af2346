"""Version lifecycle (status, publish, deprecate, latest), metrics, create_version, federations, events, health."""

from __future__ import annotations

import hashlib

import pytest
from conftest import Api

pytestmark = pytest.mark.backends  # every test here runs on SQLite + directory and on PostgreSQL + S3


async def _versions(api: Api, model_id: str, **params: str) -> dict:
    resp = await api.client.get(f"/api/v1/models/{model_id}/versions", params=params, headers=api.headers)
    assert resp.status_code == 200, resp.text
    return resp.json()  # type: ignore[no-any-return]


async def test_uploads_are_published_and_listed_newest_first_with_paging(api: Api, sklearn_pickle: bytes) -> None:
    model = await api.create_model(name="life")
    for label in ("1.0.0", "1.1.0", "1.2.0"):
        body = (await api.upload(model["id"], sklearn_pickle, "m.pkl", version=label)).json()
        assert body["status"] == "published"
    page = await _versions(api, model["id"])
    assert [v["label"] for v in page["versions"]] == ["1.2.0", "1.1.0", "1.0.0"]
    assert page["total"] == 3 and page["limit"] == 100 and page["offset"] == 0
    page = await _versions(api, model["id"], limit="1", offset="1")
    assert [v["version"] for v in page["versions"]] == [2] and page["total"] == 3
    assert (await api.client.get(f"/api/v1/models/{model['id']}/versions", params={"status": "bogus"},
                                 headers=api.headers)).status_code == 400


async def test_deprecate_moves_latest_back_and_keeps_the_bytes(api: Api, sklearn_pickle: bytes) -> None:
    model = await api.create_model()
    base = f"/api/v1/models/{model['id']}/versions"
    await api.upload(model["id"], sklearn_pickle, "m.pkl", version="1.0.0")
    await api.upload(model["id"], b"\x80\x04K\x02.", "m.pkl", version="2.0.0")
    for _ in range(2):  # idempotent
        resp = await api.client.post(f"{base}/2.0.0/deprecate", json={}, headers=api.headers)
        assert resp.status_code == 200 and resp.json()["status"] == "deprecated"
    latest = (await api.client.get(f"{base}/latest", headers=api.headers)).json()
    assert latest["label"] == "1.0.0"
    kept = await api.client.get(f"{base}/2.0.0/download", headers=api.headers)
    assert kept.status_code == 200 and kept.content == b"\x80\x04K\x02."
    assert [v["label"] for v in (await _versions(api, model["id"], status="deprecated"))["versions"]] == ["2.0.0"]
    detail = (await api.client.get(f"/api/v1/models/{model['id']}", headers=api.headers)).json()
    assert [v["status"] for v in detail["versions"]] == ["published", "deprecated"]
    for _ in range(2):
        resp = await api.client.post(f"{base}/2.0.0/publish", json={}, headers=api.headers)
        assert resp.status_code == 200 and resp.json()["status"] == "published"
    assert (await api.client.get(f"{base}/latest", headers=api.headers)).json()["label"] == "2.0.0"
    await api.client.post(f"{base}/1/deprecate", headers=api.headers)
    await api.client.post(f"{base}/2/deprecate", headers=api.headers)
    none = await api.client.get(f"{base}/latest", headers=api.headers)
    assert none.status_code == 404 and none.json()["error"] == "not_found"
    assert (await api.client.post(f"{base}/9/publish", headers=api.headers)).status_code == 404
    assert (await api.client.post(f"{base}/1/publish", headers=bearer_read(api))).status_code == 403


def bearer_read(api: Api) -> dict[str, str]:
    return {"Authorization": f"Bearer {api.keys['read']}"}


async def test_metrics_of_any_name_merge_and_show_everywhere(api: Api, sklearn_pickle: bytes) -> None:
    model = await api.create_model()
    await api.upload(model["id"], sklearn_pickle, "m.pkl", version="1.0.0")
    url = f"/api/v1/models/{model['id']}/versions/1.0.0/metrics"
    resp = await api.client.patch(url, json={"metrics": {"f1": 0.8, "latency_ms": 12}}, headers=api.headers)
    assert resp.status_code == 200 and resp.json()["metrics"] == {"f1": 0.8, "latency_ms": 12.0}
    resp = await api.client.patch(url, json={"metrics": {"f1": 0.9, "latency_ms": None}}, headers=api.headers)
    assert resp.json()["metrics"] == {"f1": 0.9}
    assert (await _versions(api, model["id"]))["versions"][0]["metrics"] == {"f1": 0.9}
    detail = (await api.client.get(f"/api/v1/models/{model['id']}", headers=api.headers)).json()
    assert detail["versions"][0]["metrics"] == {"f1": 0.9}
    for bad in (b'{"metrics": {"f1": "high"}}', b'{"metrics": {"": 1}}', b'{"metrics": {"x": 1e400}}',
                b'{"metrics": [1]}', b"{}", b'{"metrics": {"t": true}}'):
        resp = await api.client.patch(url, content=bad, headers={**api.headers, "content-type": "application/json"})
        assert resp.status_code == 400 and resp.json()["error"] == "bad_request", (bad, resp.text)
    too_many = {"metrics": {f"m{i}": i for i in range(65)}}
    assert (await api.client.patch(url, json=too_many, headers=api.headers)).status_code == 400
    assert (await _versions(api, model["id"]))["versions"][0]["metrics"] == {"f1": 0.9}


async def test_create_version_registers_stored_bytes_after_checking_them(api: Api, sklearn_pickle: bytes,
                                                                         onnx_bytes: bytes) -> None:
    model = await api.create_model()
    first = (await api.upload(model["id"], onnx_bytes, "m.onnx", version="1.0.0")).json()
    digest = hashlib.sha256(onnx_bytes).hexdigest()
    base = f"/api/v1/models/{model['id']}/versions"
    body = {"version": "1.0.1", "storage_path": first["model_path"], "format": "onnx",
            "checksum": f"sha256:{digest}", "size_bytes": len(onnx_bytes), "metrics": {"auc": 0.7}}
    for bad, why in ((dict(body, checksum="0" * 64), "checksum"), (dict(body, size_bytes=3), "size_bytes"),
                     (dict(body, storage_path="s3://bucket/elsewhere.onnx"), "storage_path"),
                     (dict(body, storage_path="sha256:" + "1" * 64, checksum="1" * 64), "storage_path"),
                     (dict(body, format="sklearn"), "format"), (dict(body, checksum="abc"), "checksum")):
        resp = await api.client.post(base, json=bad, headers=api.headers)
        assert resp.status_code == 400, (why, resp.text)
    assert (await _versions(api, model["id"]))["total"] == 1
    resp = await api.client.post(base, json=body, headers=api.headers)
    assert resp.status_code == 201, resp.text
    made = resp.json()
    assert made["version"] == 2 and made["status"] == "draft" and made["model_hash"] == f"sha256:{digest}"
    assert (await api.client.get(f"{base}/latest", headers=api.headers)).json()["version"] == 1  # a draft
    detail = (await api.client.get(f"{base}/1.0.1", headers=api.headers)).json()
    assert detail["metrics"] == {"auc": 0.7} and detail["formats"]["onnx"]["status"] == "ready"
    dup = await api.client.post(base, json=body, headers=api.headers)
    assert dup.status_code == 409
    got = await api.client.get(f"{base}/1.0.1/download", headers=api.headers)
    assert got.content == onnx_bytes


async def test_architecture_fields_of_an_upload_are_the_models_architecture(api: Api, sklearn_pickle: bytes) -> None:
    model = await api.create_model()
    assert model["architecture"] == {}
    await api.upload(model["id"], sklearn_pickle, "m.pkl", version="1.0.0", architecture="mlp", input_dim="16",
                     hidden_dim="8", output_dim="4")
    got = (await api.client.get(f"/api/v1/models/{model['id']}", headers=api.headers)).json()
    assert got["architecture"] == {"name": "mlp", "input_dim": 16, "hidden_dim": 8, "output_dim": 4}
    bad = await api.upload(model["id"], sklearn_pickle, "m.pkl", expect=400, version="2", input_dim="-1")
    assert bad.json()["error"] == "bad_request"


async def test_names_match_case_insensitively_and_org_id_query_is_accepted(api: Api) -> None:
    first = await api.create_model(name="MNIST", framework="pytorch")
    again = await api.client.post("/api/v1/models", params={"org_id": "default"}, json={"name": "mnist"},
                                  headers=api.headers)
    assert again.status_code == 200 and again.json()["id"] == first["id"]


async def test_federations_minimal(api: Api) -> None:
    headers = api.headers
    assert (await api.client.get("/api/v1/federations", params={"org_id": "default", "name": "x"},
                                 headers=headers)).json() == []
    created = await api.client.post("/api/v1/federations", json={"org_id": "default", "name": "x"}, headers=headers)
    assert created.status_code == 201
    fed = created.json()
    assert set(fed) == {"id", "name", "description", "org_id", "created_at"}
    again = await api.client.post("/api/v1/federations", json={"name": "x"}, headers=headers)
    assert again.status_code == 200 and again.json()["id"] == fed["id"]
    listed = (await api.client.get("/api/v1/federations", params={"name": "x"}, headers=headers)).json()
    assert [f["id"] for f in listed] == [fed["id"]]
    assert (await api.client.get(f"/api/v1/federations/{fed['id']}", headers=headers)).json() == fed
    model = await api.create_model(name="shared")
    url = f"/api/v1/federations/{fed['id']}/models"
    assert (await api.client.post(url, json={"model_id": "shared"}, headers=headers)).status_code == 201
    assert (await api.client.post(url, json={"model_id": model["id"]}, headers=headers)).status_code == 200
    assert [m["id"] for m in (await api.client.get(url, headers=headers)).json()] == [model["id"]]
    assert (await api.client.post(url, json={"model_id": "nope"}, headers=headers)).status_code == 404
    for method, path in (("POST", "invite"), ("POST", "analytics/descriptive"), ("GET", "members"),
                         ("GET", "privacy")):
        resp = await api.client.request(method, f"/api/v1/federations/{fed['id']}/{path}", json={}, headers=headers)
        assert resp.status_code == 501 and resp.json()["error"] == "not_implemented", resp.text
        assert "hosted" in resp.json()["message"]
    assert (await api.client.get("/api/v1/federations/nope", headers=headers)).status_code == 404


async def test_events_are_accepted_and_counted_per_model(api: Api) -> None:
    model = await api.create_model(name="llm")
    for event in ("generation_started", "generation_completed", "generation_started"):
        resp = await api.client.post("/api/v1/inference/events", json={
            "model_id": "llm", "event_type": event, "version": "latest", "session_id": "s"}, headers=api.headers)
        assert resp.status_code == 202, resp.text
    unknown = await api.client.post("/api/v1/inference/events", json={"model_id": "nope"}, headers=api.headers)
    assert unknown.status_code == 202 and unknown.json()["counted"] == 0
    envelope = {"resourceLogs": [{"resource": {}, "scopeLogs": [{"logRecords": [
        {"body": {"stringValue": "inference.completed"},
         "attributes": [{"key": "model.id", "value": {"stringValue": model["id"]}}]},
        {"body": {"stringValue": "funnel.x"}, "attributes": []}]}]}]}
    resp = await api.client.post("/api/v2/telemetry/events", json=envelope, headers=bearer_read(api))
    assert resp.status_code == 202 and resp.json() == {"accepted": 2, "counted": 1}
    for i in range(40):  # bounded: a model keeps at most 32 event names
        await api.client.post("/api/v1/inference/events", json={"model_id": "llm", "event_type": f"e{i}"},
                              headers=api.headers)
    events = (await api.client.get("/api/v1/models/llm", headers=api.headers)).json()["events"]
    assert events["generation_started"]["count"] == 2 and events["inference.completed"]["count"] == 1
    assert len(events) == 32 and events["other"]["count"] == 40 - (32 - 1 - 3)
    assert (await api.client.post("/api/v2/telemetry/events", json=envelope)).status_code == 401


async def test_api_v1_health_needs_a_key(api: Api) -> None:
    resp = await api.client.get("/api/v1/health", headers=bearer_read(api))
    assert resp.status_code == 200 and resp.json()["status"] == "ok"
    assert (await api.client.get("/api/v1/health")).status_code == 401
