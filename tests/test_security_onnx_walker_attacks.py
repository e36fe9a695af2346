"""Breaks found attacking the ONNX structure walker, which parses untrusted upload bytes IN THE SERVER PROCESS
(convert/onnx_skeleton.py): each test failed before its fix. A hostile upload must cost the server bounded CPU
and memory and end in a 400 or a whole-file check in a job, never a 500 or a hang."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import pytest
from conftest import Api

from octomil_lite.convert import onnx_skeleton
from octomil_lite.convert.onnx_skeleton import MalformedOnnx, SkeletonTooLarge, skeleton_of
from octomil_lite.convert.onnx_skeleton import encode_varint as _varint


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _model_with_tensor(tensor: bytes) -> bytes:
    """ModelProto{ir_version: 8, graph: GraphProto{initializer: TENSOR}}."""
    return _varint(1 << 3) + b"\x08" + _field(7, _field(5, tensor))


def _tensor(dims: bytes, raw: int = 2048, extra: bytes = b"") -> bytes:
    """A float TensorProto: packed DIMS, data_type FLOAT, RAW bytes of raw_data (elided from the skeleton)."""
    return _field(1, dims) + _varint(2 << 3) + b"\x01" + extra + _field(9, b"\x00" * raw)


def _file(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / "m.onnx"
    path.write_bytes(content)
    return path


def test_many_huge_dims_are_refused_at_once_not_multiplied_out(tmp_path: Path) -> None:
    # The walker multiplied every dim into one Python int before comparing with raw_data's length: 80,000 dims of
    # 2**62 (800 KB) took 45 s of server CPU, 1M dims hours; 400 dims already made the refusal's message overflow
    # int->str conversion (ValueError: a 500, not a 400).
    dims = b"".join(_varint((1 << 62) + 1) for _ in range(20_000))
    path = _file(tmp_path, _model_with_tensor(_tensor(dims)))
    started = time.monotonic()
    with pytest.raises(MalformedOnnx, match="raw_data"):
        skeleton_of(path)
    assert time.monotonic() - started < 1.0


def test_a_huge_packed_dims_field_is_not_held_as_a_python_list(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # Every packed dim became a Python int in a list: a 2 GiB field of 1-byte dims is 16 GiB of list in the server.
    # Packed numbers count against the field budget (lowered here to keep the test fast under tracemalloc).
    monkeypatch.setattr(onnx_skeleton, "MAX_FIELDS", 100_000, raising=False)
    dims = b"\x01" * 4_000_000
    path = _file(tmp_path, _model_with_tensor(_tensor(dims)))
    tracemalloc.start()
    try:
        with pytest.raises(SkeletonTooLarge):  # past MAX_FIELDS numbers: the whole file is checked in a job
            skeleton_of(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1024**2, f"{peak} bytes held by the server for a {len(dims)}-byte dims field"


def test_an_elided_tensor_with_a_huge_other_field_is_not_copied_in_full(tmp_path: Path) -> None:
    # A tensor whose raw_data is elided was rebuilt in memory whole (its doc_string too) before any size check,
    # then copied twice more by its parents: about 3x the tensor's size in server memory.
    doc = _field(12, b"d" * (48 * 1024**2))  # TensorProto.doc_string
    path = _file(tmp_path, _model_with_tensor(_tensor(_varint(512), extra=doc)))
    tracemalloc.start()
    try:
        with pytest.raises(SkeletonTooLarge):
            skeleton_of(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < onnx_skeleton.MAX_SKELETON_BYTES + 8 * 1024**2, f"{peak} bytes held by the server"


def test_millions_of_tiny_fields_stop_the_walk(tmp_path: Path) -> None:
    # About 1.7 us of server CPU per field: a 2 GiB upload of 2-byte fields held a core for ~30 minutes (20 GiB,
    # the upload limit: hours). Past the budget the whole file is checked in a job, under the job's limits.
    budget = onnx_skeleton.MAX_FIELDS
    path = _file(tmp_path, b"\x08\x01" * (budget + 1))
    started = time.monotonic()
    with pytest.raises(SkeletonTooLarge):
        skeleton_of(path)
    assert time.monotonic() - started < 10


async def test_an_upload_with_overflowing_dims_is_400_not_500(api: Api) -> None:
    dims = b"".join(_varint((1 << 62) + 1) for _ in range(500))
    model = await api.create_model(name="dims")
    resp = await api.upload(model["id"], _model_with_tensor(_tensor(dims)), "model.onnx", expect=400, format="onnx")
    assert "raw_data" in resp.json()["message"]
    assert list(api.registry.blobs.tmp.iterdir()) == []
