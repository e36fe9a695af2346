"""Writing a converter's output file: ONNX models, and zipped Core ML packages (from PyTorch or TensorFlow)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from .job import Converted, Job, Parity, dist_version, framework_version
from .parity import FLOAT_TOLERANCE

ONNX_OPSET = 17
COREML_NOTE = "Core ML cannot run on Linux; not checked"


def save_onnx(model: Any, job: Job) -> Path:
    import onnx

    path = job.out_dir / "model.onnx"
    onnx.save_model(model, str(path))
    return path


def _save_mlpackage(mlmodel: Any, job: Job) -> Path:
    package = job.scratch / "model.mlpackage"
    mlmodel.save(str(package))
    archive = shutil.make_archive(str(job.out_dir / "model.mlpackage"), "zip", root_dir=job.scratch,
                                  base_dir="model.mlpackage")
    return Path(archive)


def coreml_result(mlmodel: Any, job: Job, rows: int, framework: str = "pytorch") -> Converted:
    path = _save_mlpackage(mlmodel, job)
    parity = Parity(None, FLOAT_TOLERANCE, None, rows, COREML_NOTE)
    converter = f"coremltools {dist_version('coremltools')}"
    return Converted(path, parity, framework, framework_version(framework), converter)
