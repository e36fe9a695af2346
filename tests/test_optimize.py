"""optimize (int8 and fp16 variants made by the sandboxed conversion pool, with parity), compatibility and
optimized-config, against a real server with real onnxruntime."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import Server, bearer, make_key
from onnx import TensorProto, helper, numpy_helper


def _mlp(seed: int = 0, width: int = 256) -> bytes:
    """A float MLP with enough weights for quantization to matter (about 0.5 MB)."""
    rng = np.random.RandomState(seed)
    w1 = numpy_helper.from_array(rng.randn(32, width).astype(np.float32) * 0.1, "w1")
    w2 = numpy_helper.from_array(rng.randn(width, width).astype(np.float32) * 0.1, "w2")
    w3 = numpy_helper.from_array(rng.randn(width, 4).astype(np.float32) * 0.1, "w3")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"]), helper.make_node("Relu", ["h1"], ["a1"]),
             helper.make_node("MatMul", ["a1", "w2"], ["h2"]), helper.make_node("Relu", ["h2"], ["a2"]),
             helper.make_node("MatMul", ["a2", "w3"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], [w1, w2, w3])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model.SerializeToString()  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[httpx.Client, str]]:
    server = Server(tmp_path_factory.mktemp("optimize") / "data")
    key = make_key(server.data_dir)
    client = httpx.Client(base_url=f"{server.url}/api/v1", headers=bearer(key), timeout=120)
    try:
        yield client, server.url
    finally:
        client.close()
        server.stop()


def _model_with(client: httpx.Client, data: bytes, name: str) -> str:
    model_id: str = client.post("/models", json={"name": name}).json()["id"]
    resp = client.post(f"/models/{model_id}/versions/upload", data={"version": "1.0.0"},
                       files={"file": ("mlp.onnx", data)})
    assert resp.status_code == 201, resp.text
    return model_id


def test_optimize_makes_int8_and_fp16_with_parity_and_they_download(live: Any, tmp_path: Path) -> None:
    client, _ = live
    data = _mlp()
    model_id = _model_with(client, data, "mlp")
    resp = client.post(f"/models/{model_id}/optimize", json={"accuracy_threshold": 0.9, "target_devices": ["pixel_8"]})
    assert resp.status_code == 200, resp.text
    got = resp.json()
    assert got["feasible"] is True and got["reason"] is None, got
    assert got["optimizations_applied"] == ["dynamic_int8_quantization"]  # the smallest that qualifies
    assert got["compression_ratio"] > 3 and got["optimized_size_mb"] < got["original_size_mb"]
    assert got["target_devices"] == ["pixel_8"] and "no device profiles" in got["device_note"]
    for fmt in ("onnx-int8", "onnx-fp16"):
        candidate = got["report"][fmt]
        assert candidate["status"] == "ready" and candidate["meets_threshold"], candidate
        assert candidate["parity"]["max_abs_diff"] < 0.05
        download = client.get(got["converted_paths"][fmt].removeprefix("/api/v1"))
        assert download.status_code == 200 and len(download.content) == candidate["size_bytes"]
        assert download.headers["content-disposition"].endswith(f'.{fmt.split("-")[1]}.onnx"')
        path = tmp_path / f"{fmt}.onnx"
        path.write_bytes(download.content)
        onnx.checker.check_model(onnx.load(str(path)))
        x = np.random.RandomState(1).rand(3, 32).astype(np.float32)
        want = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        have = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        assert np.max(np.abs(want - have)) < 0.05
    detail = client.get(f"/models/{model_id}/versions/1.0.0").json()
    assert detail["formats"]["onnx-int8"]["status"] == "ready" and detail["formats"]["onnx-int8"]["parity"]
    again = client.post(f"/models/{model_id}/optimize", json={}).json()  # made once, judged again
    assert again["report"]["onnx-int8"]["size_bytes"] == got["report"]["onnx-int8"]["size_bytes"]


def test_unmet_threshold_or_budget_is_infeasible_with_a_reason(live: Any) -> None:
    client, _ = live
    model_id = _model_with(client, _mlp(2), "strict")
    got = client.post(f"/models/{model_id}/optimize", json={"accuracy_threshold": 1.0}).json()
    assert got["feasible"] is False and "below the threshold 1.0" in got["reason"], got
    assert got["optimizations_applied"] == [] and got["compression_ratio"] is None
    tight = client.post(f"/models/{model_id}/optimize", json={"accuracy_threshold": 0.5, "size_budget_mb": 0.001})
    assert tight.json()["feasible"] is False and "size budget" in tight.json()["reason"]
    for bad in ({"accuracy_threshold": 2}, {"accuracy_threshold": "high"}, {"size_budget_mb": -1},
                {"size_budget_mb": None}):
        assert client.post(f"/models/{model_id}/optimize", json=bad).status_code == 400
    assert client.get(f"/models/{model_id}/versions/1/download", params={"format": "onnx-fp16"}).status_code == 200


def test_compatibility_and_optimized_config_say_what_is_known(live: Any) -> None:
    client, _ = live
    model_id = _model_with(client, _mlp(3), "compat")
    before = client.get(f"/models/{model_id}/compatibility", params={"devices": "pixel_8,iphone_15"}).json()
    assert before["unknown_devices"] == ["pixel_8", "iphone_15"] and before["compatible_devices"] == []
    assert before["feasibility_category"] == "tiny" and before["formats"]["onnx"] == "ready"
    assert any("optimize" in r for r in before["recommendations"])
    assert client.get(f"/models/{model_id}/versions/1/download", params={"format": "onnx-int8"}).status_code == 404
    config = client.get(f"/models/{model_id}/optimized-config/pixel_8").json()
    assert config["format"] == "onnx" and config["device"] == "pixel_8"
    assert client.get("/models/nope/compatibility").status_code == 404
