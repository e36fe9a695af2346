"""ONNX uploads are checked from their structure (weights walked, never parsed): the guarantees still hold.

Large raw_data payloads are skipped by the server's protobuf walker and the rest (a "skeleton") is checked by
onnx.checker in a sandboxed job. Every refusal is a 400 with nothing stored and nothing left staged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import Api
from onnx import TensorProto, helper, numpy_helper

from octomil_lite.convert.onnx_skeleton import MAX_DEPTH, MalformedOnnx, SkeletonTooLarge, skeleton_of


def _model(weight_rows: int = 64, *, op: str = "MatMul") -> onnx.ModelProto:
    weights = numpy_helper.from_array(np.arange(weight_rows * 8, dtype=np.float32).reshape(weight_rows, 8), "W")
    graph = helper.make_graph([helper.make_node(op, ["X", "W"], ["Y"])], "g",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", weight_rows])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 8])], [weights])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


async def _refused(api: Api, content: bytes, *words: str) -> str:
    model = await api.create_model(name="m")
    resp = await api.upload(model["id"], content, "model.onnx", expect=400, format="onnx")
    message = resp.json()["message"]
    for word in words:
        assert word in message.lower(), message
    assert [p for p in api.registry.blobs.root.rglob("*") if p.is_file()] == []  # nothing stored
    assert list(api.registry.blobs.tmp.iterdir()) == []  # no staged upload, no skeleton left
    return message


async def test_a_large_model_is_stored_whole_with_its_signature(api: Api) -> None:
    content = _model(4096).SerializeToString()  # 128 KiB of weights: elided from the checked skeleton
    model = await api.create_model(name="big")
    body = (await api.upload(model["id"], content, "model.onnx")).json()
    assert body["formats"]["onnx"] == "ready"
    detail = (await api.client.get(f"/api/v1/models/{model['id']}/versions/1", headers=api.headers)).json()
    signature = detail["formats"]["onnx"]["signature"]
    assert signature == {"inputs": [{"name": "X", "type": "float", "shape": ["batch", 4096]}],
                         "outputs": [{"name": "Y", "type": "float", "shape": ["batch", 8]}]}
    resp = await api.client.get(f"/api/v1/models/{model['id']}/versions/1/download?format=onnx", headers=api.headers)
    assert resp.content == content
    assert list(api.registry.blobs.tmp.iterdir()) == []


async def test_a_model_failing_the_checker_is_400_even_with_large_weights(api: Api) -> None:
    await _refused(api, _model(4096, op="NoSuchOp").SerializeToString(), "onnx.checker")


async def test_raw_data_shorter_than_its_dims_is_400(api: Api) -> None:
    model = _model(4096)
    model.graph.initializer[0].raw_data = model.graph.initializer[0].raw_data[:-4]
    await _refused(api, model.SerializeToString(), "raw_data")


async def test_external_data_is_400_before_any_job(api: Api) -> None:
    model = _model(4096)
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "../../secret.key"
    await _refused(api, model.SerializeToString(), "external data")


async def test_an_external_tensor_in_a_nested_subgraph_is_400(api: Api) -> None:
    inner = _model(4096).graph
    inner.initializer[0].data_location = TensorProto.EXTERNAL
    outer = _model(4)
    outer.graph.node.append(helper.make_node("If", ["c"], ["z"], then_branch=inner, else_branch=inner))
    await _refused(api, outer.SerializeToString(), "external data")


@pytest.mark.parametrize("cut", [1, 100, 2000, -1])
async def test_a_truncated_model_is_400(api: Api, cut: int) -> None:
    content = _model(4096).SerializeToString()
    await _refused(api, content[:cut] if cut > 0 else content[:-7], "onnx")


async def test_garbage_that_looks_like_onnx_is_400(api: Api) -> None:
    content = b"\x08\x07\x12\x04test:" + b"\xff" * 5000  # a plausible header, then a length past the end
    await _refused(api, content, "onnx")


def _hostile(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / "m.onnx"
    path.write_bytes(content)
    return path


def test_deep_nesting_is_refused_without_recursing_far(tmp_path: Path) -> None:
    def msg(field: int, body: bytes) -> bytes:
        length, out = len(body), bytearray()
        while length >= 0x80:
            out.append(length & 0x7F | 0x80)
            length >>= 7
        out.append(length)
        return bytes([field << 3 | 2]) + bytes(out) + body

    body = b""
    for _ in range(MAX_DEPTH):
        body = msg(1, msg(5, msg(6, body)))  # GraphProto.node -> NodeProto.attribute -> AttributeProto.g
    with pytest.raises(MalformedOnnx, match="nested"):
        skeleton_of(_hostile(tmp_path, msg(7, body)))


@pytest.mark.parametrize("content, words", [
    (b"\x3a" + b"\xff" * 11, "10 bytes"),  # a length varint that never ends
    (b"\x3a\xff\xff\xff\xff\x0f", "past the end"),  # a 4 GiB graph in a 6-byte file
    (b"\x3b\x00", "wire type"),  # groups: never in ONNX
    (b"\x00\x01", "number 0"),
    (b"", "empty"),
])
def test_hostile_protobuf_is_refused_with_a_reason(tmp_path: Path, content: bytes, words: str) -> None:
    with pytest.raises(MalformedOnnx, match=words):
        skeleton_of(_hostile(tmp_path, content))


def test_unknown_fields_are_kept_for_the_job_to_judge(tmp_path: Path) -> None:
    content = _model(4096).SerializeToString() + b"\xa0\x06\x01"  # field 100, varint 1
    skeleton = skeleton_of(_hostile(tmp_path, content))
    assert skeleton.endswith(b"\xa0\x06\x01") and len(skeleton) < 1000
    parsed = onnx.load_from_string(skeleton)
    onnx.checker.check_model(parsed)
    assert list(parsed.graph.initializer[0].dims) == [0, 0]  # the payload is gone, the rank and type stay


def test_weights_outside_raw_data_fall_back_to_a_whole_file_check(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import octomil_lite.convert.onnx_skeleton as skeleton

    model = _model(4096)
    tensor = model.graph.initializer[0]
    tensor.float_data.extend(np.frombuffer(tensor.raw_data, dtype=np.float32).tolist())
    tensor.ClearField("raw_data")
    monkeypatch.setattr(skeleton, "MAX_SKELETON_BYTES", 64 * 1024)
    with pytest.raises(SkeletonTooLarge):
        skeleton_of(_hostile(tmp_path, model.SerializeToString()))


async def test_float_data_weights_still_get_checked_and_stored(api: Api) -> None:
    model = _model(64)
    tensor = model.graph.initializer[0]
    tensor.float_data.extend(np.frombuffer(tensor.raw_data, dtype=np.float32).tolist())
    tensor.ClearField("raw_data")
    created = await api.create_model(name="floats")
    body = (await api.upload(created["id"], model.SerializeToString(), "model.onnx")).json()
    assert body["formats"]["onnx"] == "ready"
