"""Parity: run the original and the converted model on the same deterministic sample rows and compare.

Tolerances (checked as np.allclose with rtol = atol = tolerance): 1e-4 for float networks and linear models,
1e-3 for tree ensembles (float32 thresholds) and TFLite.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .job import Parity

SAMPLE_ROWS = 16
FLOAT_TOLERANCE = 1e-4
TREE_TOLERANCE = 1e-3
TFLITE_TOLERANCE = 1e-3


def sample(shape: Sequence[int], dtype: Any = "float32") -> Any:
    import numpy as np

    rng = np.random.RandomState(0)
    if np.issubdtype(np.dtype(dtype), np.integer):
        return rng.randint(0, 2, size=tuple(shape)).astype(dtype)
    if np.dtype(dtype) == np.bool_:
        return rng.randint(0, 2, size=tuple(shape)).astype(bool)
    return rng.standard_normal(tuple(shape)).astype(dtype)


def compare(expected: Sequence[Any], actual: Sequence[Any], tolerance: float, rows: int,
             note: str | None = None) -> Parity:
    import numpy as np

    if len(expected) != len(actual):
        return Parity(None, tolerance, False, rows, f"original gave {len(expected)} outputs, converted {len(actual)}")
    worst = 0.0
    within = True
    for e, a in zip(expected, actual):
        e, a = np.asarray(e, dtype=np.float64), np.asarray(a, dtype=np.float64)
        if e.size != a.size:
            return Parity(None, tolerance, False, rows, f"output shapes differ: {list(e.shape)} vs {list(a.shape)}")
        e, a = e.reshape(-1), a.reshape(-1)
        if e.size:
            worst = max(worst, float(np.max(np.abs(e - a))))
            within = within and bool(np.allclose(a, e, rtol=tolerance, atol=tolerance))
    return Parity(worst, tolerance, within, rows, note)


def onnx_run(path: Path, feeds: dict[str, Any]) -> dict[str, Any]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds)))


def onnx_input_names(path: Path) -> list[str]:
    import onnxruntime as ort

    return [i.name for i in ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()]
