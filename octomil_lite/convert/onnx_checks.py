"""ONNX checks run in the sandboxed child: validate an upload, fold external weights, read the signature."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .sandbox import job_input


def check_onnx(payload: dict[str, Any]) -> dict[str, Any]:
    """Validate an uploaded ONNX file without following any external-data reference."""
    import onnx

    try:
        model = onnx.load(job_input("model"), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the user's file
        return {"ok": False, "reason": f"not a readable ONNX model ({type(exc).__name__})"}
    for tensor in _all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.external_data:
            return {"ok": False, "reason": f"tensor '{tensor.name}' references external data; "
                                           "upload a self-contained model"}
    try:
        onnx.checker.check_model(model, full_check=False)
    except Exception as exc:  # noqa: BLE001
        return {"ok": False, "reason": f"fails onnx.checker: {str(exc).splitlines()[0][:300]}"}
    return {"ok": True, "signature": onnx_signature(model)}


def fold_onnx(payload: dict[str, Any]) -> dict[str, Any]:
    """Fold an uploaded external-weights file into its ONNX model, refusing any other reference."""
    import shutil

    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    try:
        model = onnx.load(job_input("model"), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the user's file
        return {"ok": False, "reason": f"not a readable ONNX model ({type(exc).__name__})"}
    name = os.path.basename(payload["data_name"].replace("\\", "/"))
    for tensor in _all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = {e.key: e.value for e in tensor.external_data}.get("location", "")
        if location != name or not name or name in (".", ".."):
            return {"ok": False, "reason": f"tensor '{tensor.name}' references external data '{location[:100]}', "
                                           f"but the uploaded onnx_data file is '{name[:100]}'"}
    folder = Path(job_input("data"))  # the parent put the weights there under their uploaded name
    if (folder / name).is_symlink():  # unisolated (--unsafe-conversions) jobs get links; onnx wants a real file
        os.mkdir("fold")
        shutil.copyfile(folder / name, Path("fold", name))
        folder = Path("fold")
    try:
        load_external_data_for_model(model, str(folder))
        onnx.checker.check_model(model, full_check=False)
        onnx.save_model(model, "folded.onnx")
    except Exception as exc:  # noqa: BLE001
        first_line = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        return {"ok": False, "reason": f"the model and its onnx_data do not fit together: {first_line}"}
    return {"ok": True, "signature": onnx_signature(model), "path": "folded.onnx"}


def _all_tensors(model: Any) -> Any:
    """Every tensor of a model, including the values and indices of sparse ones (onnx's own walker skips those)."""
    from onnx.external_data_helper import _get_all_tensors

    yield from _get_all_tensors(model)
    yield from _sparse_in_graph(model.graph)
    for function in model.functions:
        yield from _sparse_in_nodes(function.node)


def _sparse_in_graph(graph: Any) -> Any:
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    yield from _sparse_in_nodes(graph.node)


def _sparse_in_nodes(nodes: Any) -> Any:
    for node in nodes:
        for attr in node.attribute:
            for sparse in ([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []) + list(attr.sparse_tensors):
                yield from (sparse.values, sparse.indices)
            for graph in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _sparse_in_graph(graph)


def onnx_signature(model: Any) -> dict[str, Any]:
    """Names, element types and shapes of a model's graph inputs and outputs."""
    import onnx

    initializers = {t.name for t in model.graph.initializer}

    def describe(values: Any) -> list[dict[str, Any]]:
        out = []
        for v in values:
            if v.name in initializers:
                continue
            tt = v.type.tensor_type
            shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
            elem = onnx.TensorProto.DataType.Name(tt.elem_type).lower() if tt.elem_type else None
            out.append({"name": v.name, "type": elem, "shape": shape})
        return out

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}
