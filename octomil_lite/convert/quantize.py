"""Quantized ONNX variants (run only inside a sandboxed worker): dynamic int8 and fp16, with parity against the
float model on the same sample inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

QUANTIZED = {"onnx-int8": ".int8.onnx", "onnx-fp16": ".fp16.onnx"}
SAMPLE_ROWS = 16
_NUMPY_TYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
                "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool"}


def _feeds(session: Any) -> dict[str, Any]:
    """Deterministic sample inputs for every graph input: free dimensions are SAMPLE_ROWS first, 1 after."""
    import numpy as np

    rng = np.random.RandomState(0)
    feeds = {}
    for value in session.get_inputs():
        dtype = _NUMPY_TYPES.get(value.type)
        if dtype is None:
            raise ValueError(f"input '{value.name}' has type {value.type}, which no sample can be made for")
        shape = [d if isinstance(d, int) and d > 0 else (SAMPLE_ROWS if i == 0 else 1)
                 for i, d in enumerate(value.shape)]
        sample = rng.rand(*shape) if dtype.startswith("float") else rng.randint(0, 2, size=shape)
        feeds[value.name] = sample.astype(dtype)
    return feeds


def _parity(expected: list[Any], actual: list[Any]) -> dict[str, Any]:
    """Integer outputs (class labels) by agreement, float outputs by max absolute and relative difference."""
    import numpy as np

    agreement: list[float] = []
    max_abs = max_ref = 0.0
    for want, got in zip(expected, actual):
        if not isinstance(want, np.ndarray) or not isinstance(got, np.ndarray) or want.shape != got.shape:
            continue  # e.g. sequence-of-maps outputs: compared through the array outputs beside them
        if want.dtype.kind in "iub":
            agreement.append(float(np.mean(want == got)) if want.size else 1.0)
        else:
            want64, got64 = want.astype(np.float64), got.astype(np.float64)
            max_abs = max(max_abs, float(np.max(np.abs(want64 - got64))) if want.size else 0.0)
            max_ref = max(max_ref, float(np.max(np.abs(want64))) if want.size else 0.0)
    result: dict[str, Any] = {"rows": SAMPLE_ROWS, "max_abs_diff": max_abs,
                              "max_rel_diff": max_abs / max_ref if max_ref > 0 else max_abs}
    if agreement:
        result["agreement"] = min(agreement)
    return result


def _sort_nodes(graph: Any) -> None:
    """Topologically order a graph's nodes (the fp16 converter appends its input casts after their users)."""
    known = {v.name for v in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in known for i in n.input)]
        if not ready:  # inputs from an enclosing scope or a cycle: leave the rest in their order for the checker
            ordered += pending
            break
        for node in ready:
            known.update(node.output)
            ordered.append(node)
        taken = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in taken]
    copies = [type(n)() for n in ordered]
    for copy, node in zip(copies, ordered):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)


def quantize(payload: dict[str, Any]) -> dict[str, Any]:
    """Write the `target` variant of the ONNX model at `src` into `out_dir`; report its parity."""
    import onnx
    import onnxruntime as ort

    src, target = Path(payload["src"]), payload["target"]
    out = Path(payload["out_dir"]) / f"model{QUANTIZED[target]}"
    try:
        if target == "onnx-int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8)
            converter = f"onnxruntime.quantization.quantize_dynamic (QInt8) {ort.__version__}"
        else:
            from onnxruntime.transformers.float16 import convert_float_to_float16

            model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
            _sort_nodes(model.graph)
            onnx.save_model(model, str(out))
            converter = f"onnxruntime.transformers.float16 {ort.__version__}"
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        float_session = ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
        quantized_session = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
        feeds = _feeds(float_session)
        parity = _parity(float_session.run(None, feeds), quantized_session.run(None, feeds))
    except Exception as exc:  # noqa: BLE001 - the model is the user's; say why it cannot be quantized
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        return {"status": "impossible", "reason": f"{target} could not be made: {reason}"}
    return {"status": "done", "path": str(out), "parity": parity, "converter": converter}
