"""Security: an ONNX upload whose tensors point at external data (outside or not) is refused, never followed.

ONNX lets a tensor say "my bytes are in file X at offset O"; a registry that loads such a model reads X from its
own disk (CVE-2022-25882, CVE-2024-27318, CVE-2024-5187 in onnx itself). octomil-lite refuses every external
reference at upload, so no later step (checker, conversion, parity, download) can ever follow one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import Api
from onnx import TensorProto, helper, numpy_helper

SECRET = b"TOP-SECRET-MARKER-7f3a9c " * 40


def _external(tensor: TensorProto, location: str) -> TensorProto:
    """Turn `tensor` into one whose data is 'stored' in `location` (offset 0, the secret's length)."""
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(4 * 4))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def _weights(name: str = "W") -> TensorProto:
    return numpy_helper.from_array(np.ones((2, 2), dtype=np.float32), name)


def _io() -> tuple[onnx.ValueInfoProto, onnx.ValueInfoProto]:
    return (helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 2]),
            helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 2]))


def _model(graph: onnx.GraphProto) -> bytes:
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def initializer_model(location: str) -> bytes:
    x, y = _io()
    node = helper.make_node("Add", ["X", "W"], ["Y"])
    return _model(helper.make_graph([node], "g", [x], [y], initializer=[_external(_weights(), location)]))


def constant_node_model(location: str) -> bytes:
    x, y = _io()
    const = helper.make_node("Constant", [], ["W"], value=_external(_weights("c"), location))
    return _model(helper.make_graph([const, helper.make_node("Add", ["X", "W"], ["Y"])], "g", [x], [y]))


def subgraph_model(location: str) -> bytes:
    """The external tensor hides in the `then` branch of an If node."""
    x, y = _io()
    cond = helper.make_tensor_value_info("C", TensorProto.BOOL, [])
    branch_out = helper.make_tensor_value_info("B", TensorProto.FLOAT, [2, 2])
    then = helper.make_graph([helper.make_node("Constant", [], ["B"], value=_external(_weights("t"), location))],
                             "then", [], [branch_out])
    other = helper.make_graph([helper.make_node("Identity", ["X"], ["B"])], "else", [], [branch_out])
    node = helper.make_node("If", ["C"], ["Y"], then_branch=then, else_branch=other)
    return _model(helper.make_graph([node], "g", [x, cond], [y]))


def sparse_initializer_model(location: str) -> bytes:
    """A sparse initializer whose `values` tensor is external (not covered by onnx's own tensor walker)."""
    x, y = _io()
    values = _external(numpy_helper.from_array(np.ones(2, dtype=np.float32), "W"), location)
    indices = numpy_helper.from_array(np.array([0, 3], dtype=np.int64), "W_idx")
    sparse = helper.make_sparse_tensor(values, indices, [2, 2])
    node = helper.make_node("Add", ["X", "W"], ["Y"])
    graph = helper.make_graph([node], "g", [x], [y])
    graph.sparse_initializer.append(sparse)
    return _model(graph)


def sparse_constant_model(location: str) -> bytes:
    x, y = _io()
    values = _external(numpy_helper.from_array(np.ones(2, dtype=np.float32), "v"), location)
    indices = numpy_helper.from_array(np.array([0, 3], dtype=np.int64), "i")
    const = helper.make_node("Constant", [], ["W"], sparse_value=helper.make_sparse_tensor(values, indices, [2, 2]))
    return _model(helper.make_graph([const, helper.make_node("Add", ["X", "W"], ["Y"])], "g", [x], [y]))


def function_model(location: str) -> bytes:
    """The external tensor lives in a Constant inside a model-local function."""
    x, y = _io()
    body = [helper.make_node("Constant", [], ["K"], value=_external(_weights("k"), location)),
            helper.make_node("Add", ["A", "K"], ["Z"])]
    fn = helper.make_function("local", "AddK", ["A"], ["Z"], body, [helper.make_opsetid("", 17)])
    graph = helper.make_graph([helper.make_node("AddK", ["X"], ["Y"], domain="local")], "g", [x], [y])
    model = helper.make_model(graph, functions=[fn],
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])
    return model.SerializeToString()


BUILDERS: dict[str, Callable[[str], bytes]] = {
    "initializer": initializer_model, "constant-node": constant_node_model, "if-subgraph": subgraph_model,
    "sparse-initializer": sparse_initializer_model, "sparse-constant": sparse_constant_model,
    "function": function_model,
}


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "outside" / "secret.bin"
    path.parent.mkdir()
    path.write_bytes(SECRET)
    return path


def _locations(api: Api, secret: Path) -> dict[str, str]:
    """Where the reference points: relative escape, absolute, a planted symlink, an innocent-looking name."""
    tmp = api.registry.blobs.tmp
    link = tmp / "weights.bin"  # next to where the upload is staged: what a relative name would resolve to
    link.symlink_to(secret)
    return {
        "relative-escape": os.path.relpath(secret, tmp),
        "absolute": str(secret),
        "symlink": "weights.bin",
        "dotdot-deep": "../" * 30 + str(secret).lstrip("/"),
        "backslash": os.path.relpath(secret, tmp).replace("/", "\\"),
        "url": secret.as_uri(),
    }


def _assert_refused(resp_status: int, text: str) -> None:
    assert resp_status == 400, text
    assert "TOP-SECRET" not in text


@pytest.mark.parametrize("where", ["relative-escape", "absolute", "symlink", "dotdot-deep", "backslash", "url"])
@pytest.mark.parametrize("builder", list(BUILDERS))
async def test_external_data_is_refused_at_upload(api: Api, secret: Path, builder: str, where: str) -> None:
    location = _locations(api, secret)[where]
    model = await api.create_model()
    resp = await api.upload(model["id"], BUILDERS[builder](location), "model.onnx", expect=None, format="onnx")
    _assert_refused(resp.status_code, resp.text)
    assert resp.json()["error"] == "bad_request"
    # nothing stored, nothing left staged (the planted link aside), the secret untouched
    detail = (await api.client.get(f"/api/v1/models/{model['id']}", headers=api.headers)).json()
    assert detail["versions"] == []
    assert [p for p in api.registry.blobs.root.rglob("*") if p.is_file()] == []
    assert [p.name for p in api.registry.blobs.tmp.iterdir()] == ["weights.bin"]
    assert secret.read_bytes() == SECRET


async def test_inferred_format_is_refused_too(api: Api, secret: Path) -> None:
    """Without `format`, the bytes are recognised as ONNX and get the same check."""
    model = await api.create_model()
    resp = await api.upload(model["id"], initializer_model(str(secret)), "weights.bin", expect=None)
    _assert_refused(resp.status_code, resp.text)


async def test_self_contained_model_is_accepted_and_served_byte_identical(api: Api) -> None:
    """The control: the same graph with inline weights is stored and downloaded as ONNX unchanged."""
    x, y = _io()
    data = _model(helper.make_graph([helper.make_node("Add", ["X", "W"], ["Y"])], "g", [x], [y],
                                    initializer=[_weights()]))
    model = await api.create_model()
    await api.upload(model["id"], data, "model.onnx", format="onnx")
    resp = await api.client.get(f"/api/v1/models/{model['id']}/versions/1/download?format=onnx", headers=api.headers)
    assert resp.status_code == 200 and resp.content == data


@pytest.mark.parametrize("builder", list(BUILDERS))
def test_checker_refuses_external_data_even_when_the_target_exists(builder: str, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The refusal must come from looking for external references, not from the file happening to be absent.

    The sandboxed check runs in an empty directory, so today a reference to 'weights.bin' also fails for want of
    the file; here the file exists next to the model (and in the working directory) and must still be refused.
    """
    from octomil_lite.convert.onnx_checks import check_onnx

    (tmp_path / "weights.bin").write_bytes(SECRET)
    (tmp_path / "model").write_bytes(BUILDERS[builder]("weights.bin"))  # the job's input, as the sandbox names it
    monkeypatch.setenv("OCTOMIL_JOB_INPUT_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    result = check_onnx({})
    assert result["ok"] is False and "external data" in result["reason"], result
