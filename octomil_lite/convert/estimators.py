"""scikit-learn, XGBoost and LightGBM models to ONNX (skl2onnx, onnxmltools); frameworks imported lazily."""

from __future__ import annotations

import warnings
from typing import Any

from .job import Converted, Job, Parity, dist_version, framework_version, require
from .outputs import save_onnx
from .parity import FLOAT_TOLERANCE, SAMPLE_ROWS, TREE_TOLERANCE, compare, onnx_input_names, onnx_run, sample

ESTIMATOR_KINDS = ("pickle", "joblib", "skops", "xgboost-json", "xgboost-ubj", "lightgbm-text")


def _load_estimator(job: Job) -> tuple[Any, str | None]:
    """Unpickle through the allowlist; return the object and the scikit-learn version that wrote it, if recorded."""
    from . import safe_pickle

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if job.kind == "skops":
            model = safe_pickle.load_skops(job.src)
        else:
            # Plain pickles too: joblib.dump without compression writes a pickle with array bytes inline, which
            # the sniffer cannot tell from pickle.dumps; joblib's unpickler reads both, through the allowlist.
            model = safe_pickle.load_joblib(job.src)
    written_by = next((str(w.message.original_sklearn_version) for w in caught
                       if hasattr(w.message, "original_sklearn_version")), None)
    return model, written_by


def _estimator_framework(model: Any) -> str:
    top = type(model).__module__.split(".")[0]
    if top in ("xgboost", "lightgbm", "sklearn"):
        return top
    raise ValueError(f"the file holds a {type(model).__module__}.{type(model).__name__}, not a fitted model")


def pickled_estimator_to_onnx(job: Job) -> Converted:
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
    x = sample((SAMPLE_ROWS, int(n_features)))
    if framework == "sklearn":
        onnx_model, converter = _sklearn_onnx(model, int(n_features))
    else:
        onnx_model, converter = _boosted_onnx(framework, model, int(n_features))
    path = save_onnx(onnx_model, job)
    got = onnx_run(path, {onnx_input_names(path)[0]: x})
    tolerance = TREE_TOLERANCE if framework != "sklearn" or _is_tree_based(model) else FLOAT_TOLERANCE
    parity = _estimator_parity(model, x.astype(np.float64), got, tolerance)
    return Converted(path, parity, framework, written_by or framework_version(framework), converter)


def _sklearn_onnx(model: Any, n_features: int) -> tuple[Any, str]:
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    options = {"zipmap": False} if hasattr(model, "predict_proba") else None
    onnx_model = to_onnx(model, initial_types=[("input", FloatTensorType([None, n_features]))], options=options)
    return onnx_model, f"skl2onnx {dist_version('skl2onnx')}"


def _boosted_onnx(framework: str, model: Any, n_features: int) -> tuple[Any, str]:
    require(framework, framework, "onnxmltools")
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
    return onnx_model, f"onnxmltools {dist_version('onnxmltools')}"


def _is_tree_based(model: Any) -> bool:
    steps = [s for _, s in getattr(model, "steps", [])] or [model]
    return any(type(s).__module__.startswith(("sklearn.tree", "sklearn.ensemble")) for s in steps)


def _estimator_parity(model: Any, x: Any, got: dict[str, Any], tolerance: float) -> Parity:
    import numpy as np

    rows = len(x)
    if hasattr(model, "predict_proba") and "probabilities" in got:
        parity = compare([model.predict_proba(x)], [got["probabilities"]], tolerance, rows)
        if "label" in got:
            mismatched = int(np.sum(np.asarray(model.predict(x)).reshape(-1) != np.asarray(got["label"]).reshape(-1)))
            if mismatched:
                parity.within = False
                parity.note = f"{mismatched} of {rows} predicted labels differ"
        return parity
    first = next(iter(got.values()))
    if hasattr(model, "predict"):
        return compare([model.predict(x)], [first], tolerance, rows)
    return compare([model.transform(x)], [first], tolerance, rows)


def xgboost_native_to_onnx(job: Job) -> Converted:
    import json

    require("xgboost", "xgboost", "onnxmltools")
    import xgboost as xgb

    booster = xgb.Booster()
    booster.load_model(str(job.src))
    config = json.loads(booster.save_config())
    n_features = booster.num_features()
    onnx_model, converter = _boosted_onnx("xgboost", booster, n_features)
    path = save_onnx(onnx_model, job)
    x = sample((SAMPLE_ROWS, n_features))
    got = onnx_run(path, {onnx_input_names(path)[0]: x})
    parity = _booster_parity(booster.predict(xgb.DMatrix(x)), got)
    version = ".".join(str(v) for v in config.get("version", [])) or framework_version("xgboost")
    return Converted(path, parity, "xgboost", version, converter)


def lightgbm_text_to_onnx(job: Job) -> Converted:
    require("lightgbm", "lightgbm", "onnxmltools")
    import lightgbm as lgb

    booster = lgb.Booster(model_file=str(job.src))
    n_features = booster.num_feature()
    onnx_model, converter = _boosted_onnx("lightgbm", booster, n_features)
    path = save_onnx(onnx_model, job)
    x = sample((SAMPLE_ROWS, n_features))
    got = onnx_run(path, {onnx_input_names(path)[0]: x})
    parity = _booster_parity(booster.predict(x), got)
    return Converted(path, parity, "lightgbm", framework_version("lightgbm"), converter)


def _booster_parity(expected: Any, got: dict[str, Any]) -> Parity:
    import numpy as np

    expected = np.asarray(expected)
    if "probabilities" in got:
        probs = got["probabilities"]
        if expected.ndim == 1 and probs.shape[1] == 2:
            probs = probs[:, 1]
        return compare([expected], [probs], TREE_TOLERANCE, len(expected))
    return compare([expected], [next(iter(got.values()))], TREE_TOLERANCE, len(expected))
