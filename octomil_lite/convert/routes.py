"""Model conversion, run only inside the sandboxed worker child: `run_job(payload) -> result dict`.

Every converter loads the upload, writes one file into `out_dir`, then runs the original and
the converted model on the same deterministic sample rows and records how far apart they are.
Parity tolerances (checked as np.allclose with rtol = atol = tolerance): 1e-4 for float
networks and linear models, 1e-3 for tree ensembles (float32 thresholds) and TFLite.
"""

from __future__ import annotations

import importlib.util
import shutil
import stat
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TARGETS = ("onnx", "tflite", "coreml")
SAMPLE_ROWS = 16
FLOAT_TOLERANCE = 1e-4
TREE_TOLERANCE = 1e-3
TFLITE_TOLERANCE = 1e-3
ONNX_OPSET = 17
MAX_INPUT_ELEMENTS = 2**26
MAX_UNZIPPED_BYTES = 4 * 1024**3
MAX_ZIP_MEMBERS = 100_000
COREML_NOTE = "Core ML cannot run on Linux; not checked"
STATE_DICT_REASON = ("a PyTorch state_dict holds only weights; re-export with torch.export (.pt2) "
                     "or TorchScript so the architecture travels with it")
PICKLED_MODULE_REASON = ("the file pickles a whole nn.Module, which needs its Python class (the architecture) "
                         "and would run untrusted code to load; re-export with torch.export (.pt2) or TorchScript")
INPUT_SHAPE_REASON = ("a TorchScript model does not record its input shape; re-upload with the "
                      "`input_shape` form field, e.g. `1,3,32,32`")
NO_ONNX_ROUTE = ("no {target} converter for ONNX models works in this install (onnx2tf pins an older "
                 "TensorFlow/numpy/onnx, coremltools dropped its ONNX frontend); upload the original "
                 "Keras/SavedModel (for TFLite) or .pt2/TorchScript (for Core ML) instead")


class Impossible(Exception):
    """The target cannot be produced from this source at all."""


class Unavailable(Exception):
    """A framework the conversion needs is not installed."""

    def __init__(self, reason: str, extra: str) -> None:
        super().__init__(reason)
        self.extra = extra


@dataclass(frozen=True)
class Job:
    """One conversion request, validated from the payload."""

    src: Path
    kind: str
    hint: str | None
    target: str
    out_dir: Path
    input_shape: tuple[int, ...] | None
    scratch: Path


@dataclass
class Parity:
    """How far the converted model's outputs are from the original's on the sample rows."""

    max_abs_diff: float | None
    tolerance: float
    within: bool | None
    inputs: int
    note: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON form for the result."""
        return {"max_abs_diff": self.max_abs_diff, "tolerance": self.tolerance, "within": self.within,
                "inputs": self.inputs, "note": self.note}


@dataclass
class Converted:
    """What a converter produced."""

    path: Path
    parity: Parity
    framework: str
    framework_version: str | None
    converter: str


def _installed(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


def _require(extra: str, *modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise Unavailable(f"this conversion needs {', '.join(missing)}, which is not installed; "
                          f'run: pip install "octomil-lite[{extra}]"', extra)


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


DISTRIBUTIONS = {"sklearn": ("scikit-learn",), "xgboost": ("xgboost", "xgboost-cpu"), "lightgbm": ("lightgbm",),
                 "pytorch": ("torch",), "tensorflow": ("tensorflow", "tensorflow-cpu")}


def _framework_version(framework: str) -> str | None:
    return next((v for dist in DISTRIBUTIONS[framework] if (v := _version(dist))), None)


def available_conversions() -> dict[str, list[str]]:
    """Source family -> targets this install can produce, found without importing any framework."""
    onnx_rt = _installed("onnx", "onnxruntime")
    tf = _installed("tensorflow")
    coreml = _installed("coremltools")
    torch = _installed("torch")
    return {
        "sklearn": ["onnx"] if onnx_rt and _installed("sklearn", "skl2onnx") else [],
        "xgboost": ["onnx"] if onnx_rt and _installed("xgboost", "onnxmltools") else [],
        "lightgbm": ["onnx"] if onnx_rt and _installed("lightgbm", "onnxmltools") else [],
        "pytorch": (["onnx"] if onnx_rt and torch and _installed("onnxscript") else [])
        + (["coreml"] if torch and coreml else []),
        "tensorflow": (["onnx"] if onnx_rt and tf and _installed("tf2onnx") else []) + (["tflite"] if tf else [])
        + (["coreml"] if tf and coreml else []),
        "tflite": ["onnx"] if onnx_rt and tf and _installed("tf2onnx") else [],
        "onnx": [],
    }


def _parse_job(payload: dict[str, Any], scratch: Path) -> Job:
    target = payload.get("target")
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; expected one of {', '.join(TARGETS)}")
    shape = (payload.get("options") or {}).get("input_shape")
    input_shape = None
    if shape is not None:
        input_shape = tuple(int(d) for d in shape)
        if not input_shape or any(d <= 0 for d in input_shape):
            raise ValueError(f"input_shape {list(shape)} must be positive integers, e.g. 1,3,32,32")
        elements = 1
        for d in input_shape:
            elements *= d
        if elements > MAX_INPUT_ELEMENTS:
            raise ValueError(f"input_shape {list(shape)} has {elements} elements, over the {MAX_INPUT_ELEMENTS} limit")
    return Job(src=Path(payload["src"]), kind=str(payload.get("kind")), hint=payload.get("framework_hint"),
               target=target, out_dir=Path(payload["out_dir"]), input_shape=input_shape, scratch=scratch)


def run_job(payload: dict[str, Any]) -> dict[str, Any]:
    """Convert one uploaded model as the payload asks; never raises for a bad file."""
    from octomil_lite.safe_pickle import RefusedGlobal

    scratch = None
    try:
        scratch = Path(tempfile.mkdtemp(prefix=".work-", dir=payload["out_dir"]))
        # Libraries write temporaries (coremltools, tf2onnx, zip extraction): keep them inside out_dir.
        tempfile.tempdir = str(scratch)
        job = _parse_job(payload, scratch)
        converter = _converter_for(job)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            done = converter(job)
        return _done_result(done)
    except Impossible as exc:
        return {"status": "impossible", "reason": str(exc)}
    except Unavailable as exc:
        return {"status": "unavailable", "reason": str(exc), "extra": exc.extra}
    except RefusedGlobal as exc:
        return {"status": "failed", "reason": f"{exc}; only numpy, scipy, scikit-learn, xgboost and lightgbm "
                                               "model types may appear in an uploaded pickle"}
    except MemoryError:
        return {"status": "failed", "reason": "ran out of memory loading or converting the model "
                                              "(the file may be corrupt or declare enormous tensors)"}
    except Exception as exc:  # noqa: BLE001 - any failure is reported against the user's file
        return {"status": "failed", "reason": _describe(exc)}
    finally:
        tempfile.tempdir = None
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _describe(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__


def _done_result(done: Converted) -> dict[str, Any]:
    signature = None
    if done.path.suffix == ".onnx":
        import onnx

        from octomil_lite.worker import onnx_signature

        signature = onnx_signature(onnx.load(str(done.path), load_external_data=False))
    return {"status": "done", "path": str(done.path), "parity": done.parity.as_dict(), "signature": signature,
            "framework": done.framework, "framework_version": done.framework_version, "converter": done.converter}


def _converter_for(job: Job) -> Callable[[Job], Converted]:
    if job.kind in ("pickle", "joblib", "skops") and job.hint == "pytorch":
        raise Impossible(PICKLED_MODULE_REASON)
    if (job.kind, job.target) in CONVERTERS:
        return CONVERTERS[(job.kind, job.target)]
    if job.kind in ("torch-zip", "torch-legacy"):
        return _torch_pickle
    if job.kind == "onnx":
        raise Impossible(NO_ONNX_ROUTE.format(target="Core ML" if job.target == "coreml" else "TFLite"))
    if job.kind == job.target:
        raise Impossible(f"the upload is already a {job.target} model; download the original")
    if job.kind in ESTIMATOR_KINDS:
        raise Impossible(f"scikit-learn, XGBoost and LightGBM models convert to ONNX only, not {job.target}; "
                         "download the ONNX artifact")
    if job.kind in ("torchscript", "torch-export"):
        raise Impossible("PyTorch models convert to ONNX and Core ML here, not TFLite; download the ONNX artifact")
    if job.kind == "tflite":
        raise Impossible("coremltools cannot read TFLite files; upload the Keras model or SavedModel for Core ML")
    raise ValueError(f"unknown source kind {job.kind!r}")


# ---- parity helpers ----

def _sample(shape: Sequence[int], dtype: Any = "float32") -> Any:
    import numpy as np

    rng = np.random.RandomState(0)
    if np.issubdtype(np.dtype(dtype), np.integer):
        return rng.randint(0, 2, size=tuple(shape)).astype(dtype)
    if np.dtype(dtype) == np.bool_:
        return rng.randint(0, 2, size=tuple(shape)).astype(bool)
    return rng.standard_normal(tuple(shape)).astype(dtype)


def _compare(expected: Sequence[Any], actual: Sequence[Any], tolerance: float, rows: int,
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


def _onnx_run(path: Path, feeds: dict[str, Any]) -> dict[str, Any]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds)))


def _onnx_input_names(path: Path) -> list[str]:
    import onnxruntime as ort

    return [i.name for i in ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()]


def _save_onnx(model: Any, job: Job) -> Path:
    import onnx

    path = job.out_dir / "model.onnx"
    onnx.save_model(model, str(path))
    return path


def _with_suffix(job: Job, suffix: str) -> Path:
    # Keras and TF pick their loader from the file name; uploads are stored without one.
    link = job.scratch / f"upload{suffix}"
    link.symlink_to(job.src.resolve())
    return link


# ---- scikit-learn, XGBoost, LightGBM ----

ESTIMATOR_KINDS = ("pickle", "joblib", "skops", "xgboost-json", "xgboost-ubj", "lightgbm-text")


def _load_estimator(job: Job) -> tuple[Any, str | None]:
    """Unpickle through the allowlist; return the object and the scikit-learn version that wrote it, if recorded."""
    from octomil_lite import safe_pickle

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if job.kind == "skops":
            model = _load_skops(job.src)
        else:
            # Plain pickles too: joblib.dump without compression writes a pickle with array bytes inline, which
            # the sniffer cannot tell from pickle.dumps; joblib's unpickler reads both, through the allowlist.
            model = safe_pickle.load_joblib(job.src)
    written_by = next((str(w.message.original_sklearn_version) for w in caught
                       if hasattr(w.message, "original_sklearn_version")), None)
    return model, written_by


def _load_skops(path: Path) -> Any:
    import skops.io

    from octomil_lite.safe_pickle import find_allowed_class

    untrusted = skops.io.get_untrusted_types(file=path)
    for qualified in untrusted:
        module, _, name = qualified.rpartition(".")
        find_allowed_class(module, name)
    return skops.io.load(path, trusted=untrusted)


def _estimator_framework(model: Any) -> str:
    top = type(model).__module__.split(".")[0]
    if top in ("xgboost", "lightgbm", "sklearn"):
        return top
    raise ValueError(f"the file holds a {type(model).__module__}.{type(model).__name__}, not a fitted model")


def _pickled_estimator_to_onnx(job: Job) -> Converted:
    import numpy as np

    model, written_by = _load_estimator(job)
    framework = _estimator_framework(model)
    if framework == "sklearn":
        from sklearn.base import BaseEstimator

        if not isinstance(model, BaseEstimator):
            raise ValueError(f"the file holds a {type(model).__name__}, not a scikit-learn estimator")
    n_features = getattr(model, "n_features_in_", None)
    if not n_features:
        raise ValueError(f"{type(model).__name__} is not fitted (no n_features_in_); fit it before saving")
    x = _sample((SAMPLE_ROWS, int(n_features)))
    if framework == "sklearn":
        onnx_model, converter = _sklearn_onnx(model, int(n_features))
    else:
        onnx_model, converter = _boosted_onnx(framework, model, int(n_features))
    path = _save_onnx(onnx_model, job)
    got = _onnx_run(path, {_onnx_input_names(path)[0]: x})
    tolerance = TREE_TOLERANCE if framework != "sklearn" or _is_tree_based(model) else FLOAT_TOLERANCE
    parity = _estimator_parity(model, x.astype(np.float64), got, tolerance)
    return Converted(path, parity, framework, written_by or _framework_version(framework), converter)


def _sklearn_onnx(model: Any, n_features: int) -> tuple[Any, str]:
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    options = {"zipmap": False} if hasattr(model, "predict_proba") else None
    onnx_model = to_onnx(model, initial_types=[("input", FloatTensorType([None, n_features]))], options=options)
    return onnx_model, f"skl2onnx {_version('skl2onnx')}"


def _boosted_onnx(framework: str, model: Any, n_features: int) -> tuple[Any, str]:
    _require(framework, framework, "onnxmltools")
    from onnxmltools import convert_lightgbm, convert_xgboost
    from onnxmltools.convert.common.data_types import FloatTensorType

    initial = [("input", FloatTensorType([None, n_features]))]
    if framework == "xgboost":
        booster = model.get_booster() if hasattr(model, "get_booster") else model
        # onnxmltools maps features by the names f0..fN; other names break its tree parser.
        booster.feature_names = None
        onnx_model = convert_xgboost(model, initial_types=initial)
    else:
        onnx_model = convert_lightgbm(model, initial_types=initial, zipmap=False)
    return onnx_model, f"onnxmltools {_version('onnxmltools')}"


def _is_tree_based(model: Any) -> bool:
    steps = [s for _, s in getattr(model, "steps", [])] or [model]
    return any(type(s).__module__.startswith(("sklearn.tree", "sklearn.ensemble")) for s in steps)


def _estimator_parity(model: Any, x: Any, got: dict[str, Any], tolerance: float) -> Parity:
    import numpy as np

    rows = len(x)
    if hasattr(model, "predict_proba") and "probabilities" in got:
        parity = _compare([model.predict_proba(x)], [got["probabilities"]], tolerance, rows)
        if "label" in got:
            mismatched = int(np.sum(np.asarray(model.predict(x)).reshape(-1) != np.asarray(got["label"]).reshape(-1)))
            if mismatched:
                parity.within = False
                parity.note = f"{mismatched} of {rows} predicted labels differ"
        return parity
    first = next(iter(got.values()))
    if hasattr(model, "predict"):
        return _compare([model.predict(x)], [first], tolerance, rows)
    return _compare([model.transform(x)], [first], tolerance, rows)


def _xgboost_native_to_onnx(job: Job) -> Converted:
    import json

    _require("xgboost", "xgboost", "onnxmltools")
    import xgboost as xgb

    booster = xgb.Booster()
    booster.load_model(str(job.src))
    config = json.loads(booster.save_config())
    n_features = booster.num_features()
    onnx_model, converter = _boosted_onnx("xgboost", booster, n_features)
    path = _save_onnx(onnx_model, job)
    x = _sample((SAMPLE_ROWS, n_features))
    got = _onnx_run(path, {_onnx_input_names(path)[0]: x})
    parity = _booster_parity(booster.predict(xgb.DMatrix(x)), got)
    version = ".".join(str(v) for v in config.get("version", [])) or _framework_version("xgboost")
    return Converted(path, parity, "xgboost", version, converter)


def _lightgbm_text_to_onnx(job: Job) -> Converted:
    _require("lightgbm", "lightgbm", "onnxmltools")
    import lightgbm as lgb

    booster = lgb.Booster(model_file=str(job.src))
    n_features = booster.num_feature()
    onnx_model, converter = _boosted_onnx("lightgbm", booster, n_features)
    path = _save_onnx(onnx_model, job)
    x = _sample((SAMPLE_ROWS, n_features))
    got = _onnx_run(path, {_onnx_input_names(path)[0]: x})
    parity = _booster_parity(booster.predict(x), got)
    return Converted(path, parity, "lightgbm", _framework_version("lightgbm"), converter)


def _booster_parity(expected: Any, got: dict[str, Any]) -> Parity:
    import numpy as np

    expected = np.asarray(expected)
    if "probabilities" in got:
        probs = got["probabilities"]
        if expected.ndim == 1 and probs.shape[1] == 2:
            probs = probs[:, 1]
        return _compare([expected], [probs], TREE_TOLERANCE, len(expected))
    return _compare([expected], [next(iter(got.values()))], TREE_TOLERANCE, len(expected))


# ---- PyTorch ----

def _torch_pickle(job: Job) -> Converted:
    _require("torch", "torch")
    import pickle

    import torch

    try:
        obj = torch.load(str(job.src), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc) or "weights_only" in str(exc):
            raise Impossible(PICKLED_MODULE_REASON) from None
        raise
    if isinstance(obj, dict):
        raise Impossible(STATE_DICT_REASON)
    raise Impossible(f"the file holds a {type(obj).__name__}, not a model; upload a torch.export (.pt2) or "
                     "TorchScript file")


def _user_input_shapes(job: Job, program: Any) -> list[tuple[tuple[int, ...], Any]]:
    """Shape and dtype of each user input of an ExportedProgram, from input_shape or its example inputs."""
    import torch

    user_input = torch.export.graph_signature.InputKind.USER_INPUT
    specs = [s for s in program.graph_signature.input_specs if s.kind == user_input]
    placeholders = {n.name: n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder"}
    shapes = []
    for i, spec in enumerate(specs):
        fake = placeholders.get(spec.arg.name)
        if fake is None or not hasattr(fake, "shape"):
            raise ValueError(f"input {spec.arg.name} is not a tensor; only tensor inputs are supported")
        if job.input_shape is not None and len(specs) == 1:
            shapes.append((job.input_shape, fake.dtype))
            continue
        example = (getattr(program, "example_inputs", None) or ((), {}))[0]
        if i < len(example) and isinstance(example[i], torch.Tensor):
            shapes.append((tuple(example[i].shape), fake.dtype))
            continue
        try:
            shapes.append((tuple(int(d) for d in fake.shape), fake.dtype))
        except (TypeError, ValueError):
            raise Impossible("the exported program has dynamic input dimensions and no example inputs; "
                             "re-upload with the `input_shape` form field, e.g. `1,3,32,32`") from None
    return shapes


def _torch_inputs(shapes: list[tuple[tuple[int, ...], Any]]) -> list[Any]:
    import torch

    return [torch.from_numpy(_sample(shape, str(dtype).replace("torch.", ""))) for shape, dtype in shapes]


def _flat_tensors(value: Any) -> list[Any]:
    import torch

    if isinstance(value, torch.Tensor):
        return [value.detach().numpy()]
    if isinstance(value, dict):
        return [t for k in value for t in _flat_tensors(value[k])]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flat_tensors(v)]
    return []


def _load_exported(job: Job) -> Any:
    _require("torch", "torch")
    import torch

    return torch.export.load(str(job.src))


def _exported_to_onnx(job: Job) -> Converted:
    _require("torch", "torch", "onnxscript")
    import torch

    program = _load_exported(job)
    inputs = _torch_inputs(_user_input_shapes(job, program))
    path = job.out_dir / "model.onnx"
    torch.onnx.export(program, tuple(inputs), str(path), dynamo=True, external_data=False,
                      opset_version=max(ONNX_OPSET, 18))
    with torch.no_grad():
        expected = _flat_tensors(program.module()(*inputs))
    got = _onnx_run(path, dict(zip(_onnx_input_names(path), (t.numpy() for t in inputs))))
    parity = _compare(expected, list(got.values()), FLOAT_TOLERANCE, len(inputs[0]) if inputs else 0)
    return Converted(path, parity, "pytorch", _framework_version("pytorch"), f"torch.onnx (dynamo) {_version('torch')}")


def _load_torchscript(job: Job) -> tuple[Any, tuple[int, ...]]:
    _require("torch", "torch")
    import torch

    if job.input_shape is None:
        raise Impossible(INPUT_SHAPE_REASON)
    return torch.jit.load(str(job.src), map_location="cpu").eval(), job.input_shape


def _torchscript_to_onnx(job: Job) -> Converted:
    import torch

    module, shape = _load_torchscript(job)
    x = torch.from_numpy(_sample(shape))
    path = job.out_dir / "model.onnx"
    # torch.export cannot trace a ScriptModule, so this is the TorchScript-based exporter.
    torch.onnx.export(module, (x,), str(path), dynamo=False, input_names=["input"], opset_version=ONNX_OPSET)
    with torch.no_grad():
        expected = _flat_tensors(module(x))
    got = _onnx_run(path, {"input": x.numpy()})
    parity = _compare(expected, list(got.values()), FLOAT_TOLERANCE, shape[0])
    converter = f"torch.onnx (TorchScript) {_version('torch')}"
    return Converted(path, parity, "pytorch", _framework_version("pytorch"), converter)


def _save_mlpackage(mlmodel: Any, job: Job) -> Path:
    package = job.scratch / "model.mlpackage"
    mlmodel.save(str(package))
    archive = shutil.make_archive(str(job.out_dir / "model.mlpackage"), "zip", root_dir=job.scratch,
                                  base_dir="model.mlpackage")
    return Path(archive)


def _coreml_result(mlmodel: Any, job: Job, rows: int, framework: str = "pytorch") -> Converted:
    path = _save_mlpackage(mlmodel, job)
    parity = Parity(None, FLOAT_TOLERANCE, None, rows, COREML_NOTE)
    return Converted(path, parity, framework, _framework_version(framework), f"coremltools {_version('coremltools')}")


def _exported_to_coreml(job: Job) -> Converted:
    _require("coreml", "torch", "coremltools")
    import coremltools as ct

    program = _load_exported(job)
    shapes = _user_input_shapes(job, program)
    mlmodel = ct.convert(program.run_decompositions({}), convert_to="mlprogram")
    return _coreml_result(mlmodel, job, shapes[0][0][0] if shapes and shapes[0][0] else 0)


def _torchscript_to_coreml(job: Job) -> Converted:
    _require("coreml", "torch", "coremltools")
    import coremltools as ct

    module, shape = _load_torchscript(job)
    mlmodel = ct.convert(module, inputs=[ct.TensorType(name="input", shape=shape)], convert_to="mlprogram")
    return _coreml_result(mlmodel, job, shape[0])


# ---- TensorFlow / Keras ----

def _check_zip(path: Path) -> zipfile.ZipFile:
    """Open a zip after checking its declared sizes and member names (zip bombs, path traversal)."""
    archive = zipfile.ZipFile(path)
    members = archive.infolist()
    if len(members) > MAX_ZIP_MEMBERS:
        raise ValueError(f"the zip has {len(members)} entries, over the {MAX_ZIP_MEMBERS} limit")
    total = sum(m.file_size for m in members)
    if total > MAX_UNZIPPED_BYTES:
        raise ValueError(f"the zip would expand to {total} bytes, over the {MAX_UNZIPPED_BYTES} byte limit")
    for m in members:
        parts = Path(m.filename).parts
        if m.filename.startswith(("/", "\\")) or ".." in parts or ":" in m.filename:
            raise ValueError(f"the zip entry {m.filename!r} points outside the archive")
        if stat.S_ISLNK(m.external_attr >> 16):
            raise ValueError(f"the zip entry {m.filename!r} is a symbolic link")
    return archive


def _extract_saved_model(job: Job) -> Path:
    target = job.scratch / "saved_model"
    with _check_zip(job.src) as archive:
        written = 0
        for member in archive.infolist():
            dest = target / member.filename
            if member.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as src, open(dest, "wb") as out:
                while chunk := src.read(1 << 20):
                    written += len(chunk)
                    if written > MAX_UNZIPPED_BYTES:
                        raise ValueError("the zip expands past the size limit")
                    out.write(chunk)
    found = sorted(p.parent for p in target.rglob("saved_model.pb"))
    if not found:
        raise ValueError("the zip holds no saved_model.pb; zip the SavedModel directory itself")
    return min(found, key=lambda p: len(p.parts))


def _load_keras(job: Job) -> tuple[Any, str | None]:
    _require("tensorflow", "tensorflow")
    import json

    import keras

    if job.kind == "keras":
        with _check_zip(job.src) as archive:
            meta = json.loads(archive.read("metadata.json")) if "metadata.json" in archive.namelist() else {}
        path = _with_suffix(job, ".keras")
    else:
        meta = {}
        path = _with_suffix(job, ".h5")
    # safe_mode refuses Lambda layers' marshalled bytecode; unknown custom classes fail to resolve.
    model = keras.saving.load_model(str(path), compile=False, safe_mode=True)
    return model, meta.get("keras_version") or _version("keras")


def _fixed_shapes(job: Job, shapes: list[list[int | None]]) -> list[list[int]]:
    """Concrete input shapes for Core ML: input_shape for a single input, else batch 1."""
    if job.input_shape is not None and len(shapes) == 1:
        return [list(job.input_shape)]
    fixed = []
    for shape in shapes:
        dims = [1, *shape[1:]] if shape else []
        if any(d is None for d in dims):
            raise Impossible("the model's input has unknown dimensions and Core ML needs them fixed; re-upload "
                             "with the `input_shape` form field, e.g. `1,224,224,3`")
        fixed.append([int(d) for d in dims if d is not None])
    return fixed


def _tf_to_coreml(function: Any, names: list[str], shapes: list[list[int]], job: Job) -> Converted:
    """Convert one concrete TensorFlow function with fixed input shapes to an ML program."""
    import coremltools as ct

    inputs = [ct.TensorType(name=n, shape=tuple(s)) for n, s in zip(names, shapes)]
    mlmodel = ct.convert([function], source="tensorflow", convert_to="mlprogram", inputs=inputs)
    return _coreml_result(mlmodel, job, shapes[0][0] if shapes[0] else 0, framework="tensorflow")


def _keras_to_coreml(job: Job) -> Converted:
    _require("coreml", "tensorflow", "coremltools")
    import tensorflow as tf

    model, _ = _load_keras(job)
    shapes = _fixed_shapes(job, [list(t.shape) for t in model.inputs])
    names = [f"input_{i}" for i in range(len(model.inputs))]
    signature = [tf.TensorSpec(s, t.dtype, name=n) for s, t, n in zip(shapes, model.inputs, names)]

    @tf.function(input_signature=signature)
    def call(*xs: Any) -> Any:
        return model(list(xs) if len(xs) > 1 else xs[0], training=False)

    return _tf_to_coreml(call.get_concrete_function(), names, shapes, job)


def _keras_sample_inputs(job: Job, model: Any, batch: int = 8) -> list[Any] | None:
    inputs = []
    for t in model.inputs:
        shape = list(t.shape)
        if job.input_shape is not None and len(model.inputs) == 1:
            shape = list(job.input_shape)
        shape[0] = shape[0] or batch
        if any(d is None for d in shape):
            return None
        inputs.append(_sample(shape, str(t.dtype)))
    return inputs


def _keras_expected(model: Any, inputs: list[Any]) -> list[Any]:
    import tensorflow as tf

    out = model(inputs if len(inputs) > 1 else inputs[0], training=False)
    return [t.numpy() for t in tf.nest.flatten(out)]


def _keras_to_onnx(job: Job) -> Converted:
    _require("tensorflow", "tensorflow", "tf2onnx")
    import tensorflow as tf
    import tf2onnx

    model, version = _load_keras(job)
    names = [f"input_{i}" for i in range(len(model.inputs))]
    signature = [tf.TensorSpec(t.shape, t.dtype, name=n) for t, n in zip(model.inputs, names)]

    @tf.function(input_signature=signature)
    def call(*xs: Any) -> Any:
        return model(list(xs) if len(xs) > 1 else xs[0], training=False)

    onnx_model, _ = tf2onnx.convert.from_function(call, input_signature=signature, opset=ONNX_OPSET)
    path = _save_onnx(onnx_model, job)
    inputs = _keras_sample_inputs(job, model)
    if inputs is None:
        parity = Parity(None, FLOAT_TOLERANCE, None, 0, "the input has unknown dimensions; give input_shape to check")
    else:
        got = _onnx_run(path, dict(zip(_onnx_input_names(path), inputs)))
        parity = _compare(_keras_expected(model, inputs), list(got.values()), FLOAT_TOLERANCE, len(inputs[0]))
    return Converted(path, parity, "tensorflow", version, f"tf2onnx {_version('tf2onnx')}")


def _tflite_run(path: Path, named_inputs: dict[str, Any] | list[Any]) -> dict[str, Any]:
    """Run a TFLite model; inputs by signature name, or in the interpreter's input order."""
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_path=str(path))
    if isinstance(named_inputs, dict):
        runner = interpreter.get_signature_runner()
        return dict(sorted(runner(**named_inputs).items()))
    details = interpreter.get_input_details()
    for d, x in zip(details, named_inputs):
        interpreter.resize_tensor_input(d["index"], x.shape)
    interpreter.allocate_tensors()
    for d, x in zip(details, named_inputs):
        interpreter.set_tensor(d["index"], x)
    interpreter.invoke()
    return {d["name"]: interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()}


def _tflite_signature_inputs(path: Path) -> list[str]:
    import tensorflow as tf

    runner = tf.lite.Interpreter(model_path=str(path)).get_signature_runner()
    return list(runner.get_input_details())


def _write_tflite(data: bytes, job: Job) -> Path:
    path = job.out_dir / "model.tflite"
    path.write_bytes(data)
    return path


def _keras_to_tflite(job: Job) -> Converted:
    _require("tensorflow", "tensorflow")
    import tensorflow as tf

    model, version = _load_keras(job)
    path = _write_tflite(tf.lite.TFLiteConverter.from_keras_model(model).convert(), job)
    inputs = _keras_sample_inputs(job, model)
    if inputs is None:
        parity = Parity(None, TFLITE_TOLERANCE, None, 0, "the input has unknown dimensions; give input_shape to check")
    else:
        names = _tflite_signature_inputs(path)
        keras_names = [t.name for t in model.inputs]
        if sorted(names) == sorted(keras_names):
            feeds = dict(zip(keras_names, inputs))
        else:
            feeds = dict(zip(names, inputs))
        got = _tflite_run(path, feeds)
        parity = _compare(_keras_expected(model, inputs), list(got.values()), TFLITE_TOLERANCE, len(inputs[0]))
    return Converted(path, parity, "tensorflow", version, f"tf.lite {_framework_version('tensorflow')}")


@dataclass
class SavedModel:
    """An extracted SavedModel and its serving signature; `loaded` owns the signature's variables."""

    directory: Path
    loaded: Any
    key: str
    names: list[str]
    specs: list[Any]

    def call(self, samples: list[Any]) -> list[Any]:
        """Run the signature; outputs in sorted key order, as the converted models give them."""
        import tensorflow as tf

        out = self.loaded.signatures[self.key](**{n: tf.constant(x) for n, x in zip(self.names, samples)})
        return [out[k].numpy() for k in sorted(out)]


def _load_saved_model(job: Job) -> SavedModel:
    _require("tensorflow", "tensorflow")
    import tensorflow as tf

    directory = _extract_saved_model(job)
    loaded = tf.saved_model.load(str(directory))
    if not loaded.signatures:
        raise ValueError("the SavedModel has no signatures; export it with a serving signature")
    key = "serving_default" if "serving_default" in loaded.signatures else min(loaded.signatures)
    specs = loaded.signatures[key].structured_input_signature[1]
    names = sorted(specs)
    return SavedModel(directory, loaded, key, names, [specs[n] for n in names])


def _saved_model_samples(job: Job, specs: list[Any]) -> list[Any] | None:
    samples = []
    for spec in specs:
        shape = list(job.input_shape) if job.input_shape is not None and len(specs) == 1 else list(spec.shape)
        if shape and shape[0] is None:
            shape[0] = 8
        if any(d is None for d in shape):
            return None
        samples.append(_sample(shape, spec.dtype.name))
    return samples


def _saved_model_to_onnx(job: Job) -> Converted:
    _require("tensorflow", "tensorflow", "tf2onnx")
    import tensorflow as tf
    import tf2onnx

    saved = _load_saved_model(job)
    function = saved.loaded.signatures[saved.key]
    signature = [tf.TensorSpec(s.shape, s.dtype, name=n) for s, n in zip(saved.specs, saved.names)]

    @tf.function(input_signature=signature)
    def call(*xs: Any) -> Any:
        out = function(**dict(zip(saved.names, xs)))
        return [out[k] for k in sorted(out)]

    onnx_model, _ = tf2onnx.convert.from_function(call, input_signature=signature, opset=ONNX_OPSET)
    path = _save_onnx(onnx_model, job)
    samples = _saved_model_samples(job, saved.specs)
    if samples is None:
        parity = Parity(None, FLOAT_TOLERANCE, None, 0, "the input has unknown dimensions; give input_shape to check")
    else:
        got = _onnx_run(path, dict(zip(_onnx_input_names(path), samples)))
        parity = _compare(saved.call(samples), list(got.values()), FLOAT_TOLERANCE, len(samples[0]))
    return Converted(path, parity, "tensorflow", _framework_version("tensorflow"),
                     f"tf2onnx {_version('tf2onnx')}")


def _saved_model_to_tflite(job: Job) -> Converted:
    import tensorflow as tf

    saved = _load_saved_model(job)
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved.directory), signature_keys=[saved.key])
    path = _write_tflite(converter.convert(), job)
    samples = _saved_model_samples(job, saved.specs)
    if samples is None:
        parity = Parity(None, TFLITE_TOLERANCE, None, 0, "the input has unknown dimensions; give input_shape to check")
    else:
        got = _tflite_run(path, dict(zip(saved.names, samples)))
        parity = _compare(saved.call(samples), list(got.values()), TFLITE_TOLERANCE, len(samples[0]))
    version = _framework_version("tensorflow")
    return Converted(path, parity, "tensorflow", version, f"tf.lite {version}")


def _saved_model_to_coreml(job: Job) -> Converted:
    _require("coreml", "tensorflow", "coremltools")
    saved = _load_saved_model(job)
    function = saved.loaded.signatures[saved.key]
    shapes = _fixed_shapes(job, [list(s.shape) for s in saved.specs])
    return _tf_to_coreml(function, saved.names, shapes, job)


def _tflite_to_onnx(job: Job) -> Converted:
    _require("tensorflow", "tensorflow", "tf2onnx")
    import tensorflow as tf
    import tf2onnx

    interpreter = tf.lite.Interpreter(model_path=str(job.src))
    details = interpreter.get_input_details()
    onnx_model, _ = tf2onnx.convert.from_tflite(str(job.src), opset=ONNX_OPSET)
    path = _save_onnx(onnx_model, job)
    samples = []
    for d in details:
        shape = [int(s) if s > 0 else 8 for s in d["shape_signature"]]
        if job.input_shape is not None and len(details) == 1:
            shape = list(job.input_shape)
        samples.append(_sample(shape, d["dtype"]))
    expected = _tflite_run(job.src, samples)
    onnx_names = _onnx_input_names(path)
    by_name = {d["name"]: x for d, x in zip(details, samples)}
    feeds = {n: by_name[n] for n in onnx_names} if set(onnx_names) == set(by_name) else dict(zip(onnx_names, samples))
    got = _onnx_run(path, feeds)
    ordered = [got[n] for n in expected] if set(expected) == set(got) else list(got.values())
    parity = _compare(list(expected.values()), ordered, TFLITE_TOLERANCE, len(samples[0]) if samples else 0)
    return Converted(path, parity, "tensorflow", _framework_version("tensorflow"), f"tf2onnx {_version('tf2onnx')}")


CONVERTERS: dict[tuple[str, str], Callable[[Job], Converted]] = {
    ("pickle", "onnx"): _pickled_estimator_to_onnx,
    ("joblib", "onnx"): _pickled_estimator_to_onnx,
    ("skops", "onnx"): _pickled_estimator_to_onnx,
    ("xgboost-json", "onnx"): _xgboost_native_to_onnx,
    ("xgboost-ubj", "onnx"): _xgboost_native_to_onnx,
    ("lightgbm-text", "onnx"): _lightgbm_text_to_onnx,
    ("torch-export", "onnx"): _exported_to_onnx,
    ("torch-export", "coreml"): _exported_to_coreml,
    ("torchscript", "onnx"): _torchscript_to_onnx,
    ("torchscript", "coreml"): _torchscript_to_coreml,
    ("keras", "onnx"): _keras_to_onnx,
    ("hdf5", "onnx"): _keras_to_onnx,
    ("keras", "tflite"): _keras_to_tflite,
    ("hdf5", "tflite"): _keras_to_tflite,
    ("savedmodel-zip", "onnx"): _saved_model_to_onnx,
    ("savedmodel-zip", "tflite"): _saved_model_to_tflite,
    ("keras", "coreml"): _keras_to_coreml,
    ("hdf5", "coreml"): _keras_to_coreml,
    ("savedmodel-zip", "coreml"): _saved_model_to_coreml,
    ("tflite", "onnx"): _tflite_to_onnx,
}
