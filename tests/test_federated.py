"""Federated learning over the API: devices, rounds, validated updates, FedAvg into a new version."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import Api, bearer

from octomil_lite import federated

pytestmark = pytest.mark.backends  # every test here runs on SQLite + directory and on PostgreSQL + S3

BASE = {"w": np.arange(6, dtype=np.float32).reshape(2, 3) / 10, "b": np.array([1.0, -1.0], dtype=np.float32)}


def npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def device_key(api: Api, name: str) -> str:
    return await api.on_app(api.registry.create_key, name, "device")


async def register(api: Api, key: str, identifier: str) -> dict[str, Any]:
    resp = await api.client.post("/api/v1/devices/register", headers=bearer(key), json={
        "device_identifier": identifier, "org_id": "default", "platform": "python", "os_version": "linux",
        "sdk_version": "4.1.2", "app_version": "0.1.0", "metadata": {"client": "test"},
        "capabilities": {"training": True}})
    assert resp.status_code == 200, resp.text
    return resp.json()  # type: ignore[no-any-return]


async def npz_model(api: Api, name: str) -> str:
    model = await api.create_model(name=name, framework="pytorch")
    await api.upload(model["id"], npz(BASE), filename="base.npz")
    return str(model["id"])


async def blob_count(api: Api) -> int:
    return len(await api.blobs())


async def test_register_is_idempotent_and_device_keys_are_narrow(api: Api) -> None:
    key, other = await device_key(api, "dev-a"), await device_key(api, "dev-b")
    first = await register(api, key, "laptop-1")
    again = await register(api, key, "laptop-1")
    assert first["id"] == again["id"] and first["status"] == "active"
    assert first["device_identifier"] == "laptop-1" and first["capabilities"] == {"training": True}
    resp = await api.client.post(f"/api/v1/devices/{first['id']}/heartbeat", headers=bearer(key),
                                 json={"sdk_version": "4.1.2", "metadata": {"battery": 80}})
    assert resp.status_code == 200 and resp.json()["status"] == "ok" and resp.json()["server_time"]
    # another device key may neither take over the identifier nor speak for the device
    resp = await api.client.post("/api/v1/devices/register", headers=bearer(other),
                                 json={"device_identifier": "laptop-1"})
    assert resp.status_code == 403, resp.text
    resp = await api.client.post(f"/api/v1/devices/{first['id']}/heartbeat", headers=bearer(other), json={})
    assert resp.status_code == 403
    # a device key cannot change models, open rounds or aggregate; a read key cannot register
    model_id = await npz_model(api, "narrow")
    for path, body in (("/api/v1/training/rounds", {"model_id": model_id}),
                       ("/api/v1/training/aggregate", {"model_id": model_id}), ("/api/v1/models", {})):
        assert (await api.client.post(path, headers=bearer(key), json=body)).status_code == 403, path
    resp = await api.client.post("/api/v1/devices/register", headers=bearer(api.keys["read"]),
                                 json={"device_identifier": "x"})
    assert resp.status_code == 403
    resp = await api.client.post("/api/v1/devices/register", headers=bearer(key), json={"platform": "python"})
    assert resp.status_code == 400 and "device_identifier" in resp.json()["message"]


async def test_rounds_as_the_sdk_reads_them(api: Api) -> None:
    model_id = await npz_model(api, "rounds")
    key = await device_key(api, "dev")
    device = await register(api, key, "d1")
    resp = await api.client.post("/api/v1/training/rounds", headers=api.headers, json={
        "model_id": model_id, "version": 1, "min_updates": 2, "target_participants": 3, "deadline_seconds": 600,
        "config": {"learning_rate": 0.1}})
    assert resp.status_code == 201, resp.text
    opened = resp.json()
    assert opened["status"] == "active" and opened["deadline"] and opened["participants"] == 0
    resp = await api.client.get("/api/v1/training/rounds", headers=bearer(key),
                                params={"device_id": device["id"], "status": "active"})
    rounds = resp.json()["rounds"]
    assert [r["round_id"] for r in rounds] == [opened["round_id"]]
    config = rounds[0]["config"]
    assert config == {"learning_rate": 0.1, "min_updates": 2, "target_participants": 3, "model_id": model_id,
                      "version": 1}
    status = (await api.client.get(f"/api/v1/training/rounds/{opened['round_id']}/status", headers=bearer(key))).json()
    assert {k: status[k] for k in ("round_id", "status", "participants", "target_participants", "model_id",
                                   "version")} == {"round_id": opened["round_id"], "status": "active",
                                                   "participants": 0, "target_participants": 3,
                                                   "model_id": model_id, "version": 1}
    assignments = (await api.client.get(f"/api/v1/devices/{device['id']}/assignments", headers=bearer(key))).json()
    assert [a["round_id"] for a in assignments["assignments"]] == [opened["round_id"]]
    resp = await api.client.post("/api/v1/training/rounds", headers=api.headers,
                                 json={"model_id": model_id, "deadline_seconds": 0})
    assert resp.status_code == 400 and "deadline_seconds" in resp.json()["message"]
    # past its deadline, a round shows as expired, is no device's assignment and takes no update
    row = await api.on_app(api.registry.db.get_round, opened["round_id"])
    await api.on_app(api.registry.db.update_round, row["seq"], {"deadline": "2000-01-01T00:00:00Z"})
    status = (await api.client.get(f"/api/v1/training/rounds/{opened['round_id']}/status", headers=bearer(key))).json()
    assert status["status"] == "expired"
    resp = await api.client.get("/api/v1/training/rounds", headers=bearer(key),
                                params={"device_id": device["id"], "status": "active"})
    assert resp.json()["rounds"] == []
    resp = await submit(api, key, device["id"], model_id, npz(BASE), 5, round_id=opened["round_id"])
    assert resp.status_code == 409 and "expired" in resp.json()["message"]
    resp = await api.client.post("/api/v1/training/rounds", headers=api.headers,
                                 json={"model_id": model_id, "config": {"secure_aggregation": True}})
    assert resp.status_code == 501 and "hosted" in resp.json()["message"]


async def submit(api: Api, key: str, device_id: str, model_id: str, data: bytes, n: int, **extra: Any) -> Any:
    return await api.client.post("/api/v1/training/weights", headers=bearer(key), json={
        "model_id": model_id, "version": 1, "device_id": device_id, "sample_count": n,
        "weights_data": b64(data), **extra})


async def test_fedavg_of_weights_and_deltas_equals_the_weighted_mean(api: Api) -> None:
    model_id = await npz_model(api, "fedavg")
    key = await device_key(api, "dev")
    devices = [(await register(api, key, f"d{i}"))["id"] for i in range(3)]
    opened = (await api.client.post("/api/v1/training/rounds", headers=api.headers,
                                    json={"model_id": model_id, "min_updates": 3})).json()
    rng = np.random.default_rng(7)
    full_a = {k: (v + rng.normal(size=v.shape)).astype(np.float32) for k, v in BASE.items()}
    delta_b = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in BASE.items()}
    full_c = {k: (v + rng.normal(size=v.shape)).astype(np.float32) for k, v in BASE.items()}
    flat_c = np.concatenate([full_c["w"].ravel(), full_c["b"].ravel()])  # np.save of one flat vector
    sent = [(devices[0], npz(full_a), 10, "weights", {"loss": 1.0, "accuracy": 0.5}),
            (devices[1], npz(delta_b), 30, "delta", {"loss": 2.0}),
            (devices[2], npy(flat_c), 60, "weights", {"loss": 3.0, "accuracy": 0.8})]
    for device_id, data, n, fmt, metrics in sent:
        resp = await submit(api, key, device_id, model_id, data, n, update_format=fmt, metrics=metrics,
                            round_id=opened["round_id"])
        assert resp.status_code == 200, resp.text
        assert resp.json()["status"] == "accepted" and resp.json()["update_id"]
    retried = await submit(api, key, devices[0], model_id, npz(full_a), 10, round_id=opened["round_id"])
    assert retried.status_code == 200  # a client's retry of the same bytes is the same update, not a second one
    early = await api.client.post("/api/v1/training/aggregate", headers=api.headers,
                                  json={"model_id": model_id, "min_updates": 4})
    assert early.status_code == 409 and "at least 4" in early.json()["message"]
    resp = await api.client.post("/api/v1/training/aggregate", headers=api.headers, json={
        "model_id": model_id, "base_version": 1, "min_updates": 3, "publish": True, "strategy": "metrics",
        "update_format": "delta"})
    assert resp.status_code == 200, resp.text
    result = resp.json()
    assert result["round_id"] == opened["round_id"] and result["version"] == 2 and result["new_version"] == "2"
    assert result["update_count"] == 3 and result["sample_count"] == 100
    assert result["metrics"] == pytest.approx({"loss": (10 + 60 + 180) / 100, "accuracy": (5 + 48) / 70})
    assert [p["sample_count"] for p in result["participants"]] == [10, 30, 60]
    resp = await api.client.get(f"/api/v1/models/{model_id}/versions/2/download", headers=api.headers,
                                params={"format": "numpy"})
    assert resp.status_code == 200
    got = np.load(io.BytesIO(resp.content), allow_pickle=False)
    for name, base in BASE.items():
        expected = (10 * full_a[name].astype(np.float64) + 30 * (base.astype(np.float64) + delta_b[name])
                    + 60 * full_c[name].astype(np.float64)) / 100
        assert got[name].dtype == np.float32
        np.testing.assert_allclose(got[name], expected, rtol=0, atol=1e-6)
    status = (await api.client.get(f"/api/v1/training/rounds/{opened['round_id']}/status", headers=api.headers)).json()
    assert status["status"] == "completed" and status["result_version"] == 2 and status["participants"] == 3
    assert status["provenance"]["base_version"] == 1 and len(status["provenance"]["updates"]) == 3
    updates = (await api.client.get(f"/api/v1/training/rounds/{opened['round_id']}/updates",
                                    headers=api.headers)).json()["updates"]
    assert [(u["sample_count"], u["update_format"], u["encoding"], u["status"]) for u in updates] == [
        (10, "weights", "npz", "aggregated"), (30, "delta", "npz", "aggregated"), (60, "weights", "npy", "aggregated")]
    version = (await api.client.get(f"/api/v1/models/{model_id}/versions/2", headers=api.headers)).json()
    assert version["round_id"] == opened["round_id"] and version["loss"] == pytest.approx(2.5)
    again = await api.client.post("/api/v1/training/aggregate", headers=api.headers, json={"model_id": model_id,
                                                                                          "base_version": 1})
    assert again.status_code == 409  # every update was used


def pickled_object_npy() -> bytes:
    return npy(np.array([{"evil": 1}], dtype=object))


async def test_bad_updates_are_400_and_never_stored(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    model_id = await npz_model(api, "bad")
    key = await device_key(api, "dev")
    device_id = (await register(api, key, "d"))["id"]
    before = await blob_count(api)
    cases = {
        "not base64": ("%%%", None),
        "not weights": (b64(b"hello world"), "np.save"),
        "shape": (b64(npz({"w": np.zeros((3, 2), np.float32), "b": BASE["b"]})), "shape"),
        "dtype": (b64(npz({"w": BASE["w"].astype(np.float64), "b": BASE["b"]})), "float64"),
        "names": (b64(npz({"w": BASE["w"]})), "missing"),
        "object npy": (b64(pickled_object_npy()), "not a plain numeric"),
        "nan": (b64(npz({"w": np.full((2, 3), np.nan, np.float32), "b": BASE["b"]})), "NaN"),
        "flat size": (b64(npy(np.zeros(7, np.float32))), "flattened"),
    }
    for case, (data, words) in cases.items():
        resp = await api.client.post("/api/v1/training/weights", headers=bearer(key), json={
            "model_id": model_id, "version": 1, "device_id": device_id, "sample_count": 5, "weights_data": data})
        assert resp.status_code == 400, (case, resp.text)
        assert words is None or words in resp.json()["message"], (case, resp.json()["message"])
    resp = await submit(api, key, device_id, model_id, npz(BASE), 0)
    assert resp.status_code == 400 and "sample_count" in resp.json()["message"]
    monkeypatch.setattr(federated, "MAX_UPDATE_BYTES", 100)
    resp = await submit(api, key, device_id, model_id, npz(BASE), 5)
    assert resp.status_code == 400 and "limited to 100 bytes" in resp.json()["message"]
    assert await blob_count(api) == before
    assert list(api.registry.blobs.tmp.iterdir()) == []
    assert await api.on_app(api.registry.db.list_updates) == []


async def test_torch_updates_are_read_in_the_sandbox_and_aggregate_to_a_state_dict(api: Api, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")

    def saved(obj: Any) -> bytes:
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()

    base = {"fc.weight": torch.ones(2, 2), "fc.bias": torch.zeros(2)}
    model = await api.create_model(name="torch-fl", framework="pytorch")
    await api.upload(model["id"], saved(base), filename="base.pt")
    key = await device_key(api, "dev")
    devices = [(await register(api, key, f"t{i}"))["id"] for i in range(2)]
    one = {k: v + 1 for k, v in base.items()}
    delta = {k: torch.full_like(v, 3.0) for k, v in base.items()}
    assert (await submit(api, key, devices[0], model["id"], saved(one), 1)).status_code == 200
    resp = await submit(api, key, devices[1], model["id"], saved(delta), 3, update_format="delta")
    assert resp.status_code == 200, resp.text
    refused = await submit(api, key, devices[1], model["id"], saved(torch.nn.Linear(2, 2)), 3)
    assert refused.status_code == 400 and "weights_only" in refused.json()["message"], refused.text
    resp = await api.client.post("/api/v1/training/aggregate", headers=api.headers,
                                 json={"model_id": model["id"], "min_updates": 2, "new_version": "fl-1"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["new_version"] == "fl-1"
    got = await api.client.get(f"/api/v1/models/{model['id']}/versions/fl-1/download", headers=api.headers,
                               params={"format": "pytorch"})
    state = torch.load(io.BytesIO(got.content), weights_only=True)
    # (1 * (base + 1) + 3 * (base + 3)) / 4 = base + 2.5
    for name, tensor in base.items():
        torch.testing.assert_close(state[name], tensor + 2.5, atol=1e-6, rtol=0)


async def test_secure_aggregation_and_personalisation_answer_501(api: Api) -> None:
    for method, path in (("GET", "/api/v1/training/rounds/r/secagg/session"),
                         ("GET", "/api/v1/training/personalized/d"), ("POST", "/api/v1/training/personalized/d")):
        resp = await api.client.request(method, path, headers=api.headers)
        assert resp.status_code == 501 and resp.json()["error"] == "not_implemented", path
        assert "hosted Octomil platform" in resp.json()["message"]
