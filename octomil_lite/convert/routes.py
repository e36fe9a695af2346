"""The one routing table: (source kind, target) -> converter, and why a pair has no converter.

Adding a converter: write one function `Job -> Converted` in a framework module, add its row to CONVERTERS.
"""

from __future__ import annotations

from collections.abc import Callable

from . import estimators, tensorflow, torch
from .job import Converted, Impossible, Job, installed

NO_ONNX_ROUTE = ("no {target} converter for ONNX models works in this install (onnx2tf pins an older "
                 "TensorFlow/numpy/onnx, coremltools dropped its ONNX frontend); upload the original "
                 "Keras/SavedModel (for TFLite) or .pt2/TorchScript (for Core ML) instead")

CONVERTERS: dict[tuple[str, str], Callable[[Job], Converted]] = {
    ("pickle", "onnx"): estimators.pickled_estimator_to_onnx,
    ("joblib", "onnx"): estimators.pickled_estimator_to_onnx,
    ("skops", "onnx"): estimators.pickled_estimator_to_onnx,
    ("xgboost-json", "onnx"): estimators.xgboost_native_to_onnx,
    ("xgboost-ubj", "onnx"): estimators.xgboost_native_to_onnx,
    ("lightgbm-text", "onnx"): estimators.lightgbm_text_to_onnx,
    ("torch-export", "onnx"): torch.exported_to_onnx,
    ("torch-export", "coreml"): torch.exported_to_coreml,
    ("torchscript", "onnx"): torch.torchscript_to_onnx,
    ("torchscript", "coreml"): torch.torchscript_to_coreml,
    ("keras", "onnx"): tensorflow.keras_to_onnx,
    ("hdf5", "onnx"): tensorflow.keras_to_onnx,
    ("keras", "tflite"): tensorflow.keras_to_tflite,
    ("hdf5", "tflite"): tensorflow.keras_to_tflite,
    ("savedmodel-zip", "onnx"): tensorflow.saved_model_to_onnx,
    ("savedmodel-zip", "tflite"): tensorflow.saved_model_to_tflite,
    ("keras", "coreml"): tensorflow.keras_to_coreml,
    ("hdf5", "coreml"): tensorflow.keras_to_coreml,
    ("savedmodel-zip", "coreml"): tensorflow.saved_model_to_coreml,
    ("tflite", "onnx"): tensorflow.tflite_to_onnx,
}


def converter_for(job: Job) -> Callable[[Job], Converted]:
    if job.kind in ("pickle", "joblib", "skops") and job.hint == "pytorch":
        raise Impossible(torch.PICKLED_MODULE_REASON)
    if (job.kind, job.target) in CONVERTERS:
        return CONVERTERS[(job.kind, job.target)]
    if job.kind in ("torch-zip", "torch-legacy"):
        return torch.torch_pickle
    if job.kind == "onnx":
        raise Impossible(NO_ONNX_ROUTE.format(target="Core ML" if job.target == "coreml" else "TFLite"))
    if job.kind == job.target:
        raise Impossible(f"the upload is already a {job.target} model; download the original")
    if job.kind in estimators.ESTIMATOR_KINDS:
        raise Impossible(f"scikit-learn, XGBoost and LightGBM models convert to ONNX only, not {job.target}; "
                         "download the ONNX artifact")
    if job.kind in ("torchscript", "torch-export"):
        raise Impossible("PyTorch models convert to ONNX and Core ML here, not TFLite; download the ONNX artifact")
    if job.kind == "tflite":
        raise Impossible("coremltools cannot read TFLite files; upload the Keras model or SavedModel for Core ML")
    raise ValueError(f"unknown source kind {job.kind!r}")


def available_conversions() -> dict[str, list[str]]:
    """Source family -> targets this install can produce, found without importing any framework."""
    onnx_rt = installed("onnx", "onnxruntime")
    tf_ok = installed("tensorflow")
    coreml_ok = installed("coremltools")
    torch_ok = installed("torch")
    return {
        "sklearn": ["onnx"] if onnx_rt and installed("sklearn", "skl2onnx") else [],
        "xgboost": ["onnx"] if onnx_rt and installed("xgboost", "onnxmltools") else [],
        "lightgbm": ["onnx"] if onnx_rt and installed("lightgbm", "onnxmltools") else [],
        "pytorch": (["onnx"] if onnx_rt and torch_ok and installed("onnxscript") else [])
        + (["coreml"] if torch_ok and coreml_ok else []),
        "tensorflow": (["onnx"] if onnx_rt and tf_ok and installed("tf2onnx") else []) + (["tflite"] if tf_ok else [])
        + (["coreml"] if tf_ok and coreml_ok else []),
        "tflite": ["onnx"] if onnx_rt and tf_ok and installed("tf2onnx") else [],
        "onnx": [],
    }
