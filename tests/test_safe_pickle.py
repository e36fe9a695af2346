"""The allowlist unpickler: real model pickles load, pickles that would run code are refused before anything runs."""

from __future__ import annotations

import builtins
import io
import os
import pickle
import subprocess
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.feature_selection import SelectKBest, f_classif
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from octomil_lite.convert import safe_pickle
from octomil_lite.convert.safe_pickle import RefusedGlobal
from octomil_lite.convert.worker import run_job


class Reduces:
    """Pickles as a call of `func(*args)`, the way a malicious upload does."""

    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.func, self.args


def _xy() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(0)
    x = rng.rand(60, 5)
    return x, (x[:, 0] + rng.rand(60) * 0.3 > 0.6).astype(int)


def _fitted_models() -> list[Any]:
    x, y = _xy()
    return [
        make_pipeline(StandardScaler(), SelectKBest(f_classif, k=3), LogisticRegression()).fit(x, y),
        RandomForestClassifier(n_estimators=3, random_state=np.random.RandomState(1)).fit(x, y),
        HistGradientBoostingClassifier(max_iter=3).fit(x, y),
        make_pipeline(FunctionTransformer(np.log1p), LogisticRegression()).fit(x, y),
    ]


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_sklearn_models_round_trip_through_the_allowlist(protocol: int) -> None:
    x, _ = _xy()
    for model in _fitted_models():
        loaded = safe_pickle.load(io.BytesIO(pickle.dumps(model, protocol=protocol)))
        np.testing.assert_array_equal(loaded.predict_proba(x), model.predict_proba(x))


@pytest.mark.parametrize("compress", [0, 3])
def test_joblib_pipeline_loads_compressed_or_not(tmp_path: Path, compress: int) -> None:
    x, _ = _xy()
    model = _fitted_models()[0]
    path = tmp_path / "model.joblib"
    joblib.dump(model, path, compress=compress)
    np.testing.assert_array_equal(safe_pickle.load_joblib(path).predict_proba(x), model.predict_proba(x))


def test_xgboost_and_lightgbm_estimators_load() -> None:
    xgb = pytest.importorskip("xgboost")
    lgb = pytest.importorskip("lightgbm")
    x, y = _xy()
    models = (xgb.XGBClassifier(n_estimators=3).fit(x, y), lgb.LGBMClassifier(n_estimators=3, verbose=-1).fit(x, y))
    for model in models:
        loaded = safe_pickle.load(io.BytesIO(pickle.dumps(model)))
        np.testing.assert_allclose(loaded.predict_proba(x), model.predict_proba(x))


def test_numpy_1_pickle_names_resolve() -> None:
    assert safe_pickle.find_allowed_class("numpy.core.multiarray", "_reconstruct") is not None
    assert safe_pickle.find_allowed_class("numpy.core.numeric", "_frombuffer") is not None


def test_os_system_pickle_is_refused_and_creates_no_file(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    data = pickle.dumps(Reduces(os.system, f"touch {marker}"))
    with pytest.raises(RefusedGlobal, match=r"refused to unpickle (os|posix)\.system"):
        safe_pickle.load(io.BytesIO(data))
    assert not marker.exists()


def test_os_system_pickle_through_run_job_fails_naming_the_type(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    src = tmp_path / "model.pkl"
    src.write_bytes(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    out = tmp_path / "out"
    out.mkdir()
    result = run_job({"src": str(src), "kind": "pickle", "framework_hint": "sklearn", "target": "onnx",
                      "out_dir": str(out), "options": {}})
    assert result["status"] == "failed"
    assert "refused to unpickle os.system" in result["reason"]
    assert not marker.exists()
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("make", [
    lambda p: Reduces(builtins.open, str(p), "w"),
    lambda p: Reduces(eval, f"open({str(p)!r}, 'w')"),
    lambda p: Reduces(exec, f"open({str(p)!r}, 'w')"),
    lambda p: Reduces(subprocess.Popen, ["touch", str(p)]),
    lambda p: Reduces(np.save, str(p), np.zeros(1)),
    lambda p: Reduces(np.savetxt, str(p), np.zeros(1)),
    lambda p: Reduces(np.memmap, str(p), np.uint8, "w+", 0, (1,)),
    lambda p: Reduces(joblib.dump, 1, str(p)),
], ids=["builtins.open", "builtins.eval", "builtins.exec", "subprocess.Popen", "numpy.save", "numpy.savetxt",
        "numpy.memmap", "joblib.dump"])
def test_callables_that_write_files_are_refused(tmp_path: Path, make: Any) -> None:
    marker = tmp_path / "pwned"
    data = pickle.dumps(make(marker))
    with pytest.raises(RefusedGlobal) as refused:
        safe_pickle.load(io.BytesIO(data))
    assert "refused to unpickle" in str(refused.value)
    assert not marker.exists()


@pytest.mark.parametrize(("module", "name"), [
    ("builtins", "getattr"), ("builtins", "__import__"), ("importlib", "import_module"), ("pickle", "loads"),
    ("sys", "modules"), ("io", "FileIO"), ("shutil", "rmtree"), ("posix", "system"),
    ("numpy", "load"), ("numpy", "fromfile"), ("numpy.lib.npyio", "load"), ("numpy.testing", "assert_equal"),
    ("numpy", "testing"), ("numpy", "f2py"), ("numpy.ctypeslib", "load_library"), ("numpy", "ndarray.tofile"),
    ("numpy", "__builtins__"), ("numpy.lib.stride_tricks", "as_strided"), ("numpy", "char.os"),
    ("scipy.io", "loadmat"), ("sklearn.datasets", "fetch_openml"), ("sklearn.utils._testing", "assert_allclose"),
    ("sklearn.utils.validation", "check_memory"), ("joblib", "load"), ("joblib", "Memory"),
    ("joblib.externals.cloudpickle", "loads"), ("xgboost.tracker", "RabitTracker"), ("lightgbm", "Dataset"),
])
def test_dangerous_globals_are_refused_by_name(module: str, name: str) -> None:
    with pytest.raises(RefusedGlobal, match=f"refused to unpickle {module}.{name}"):
        safe_pickle.find_allowed_class(module, name)


def test_refused_global_inside_a_joblib_object_array_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = np.empty(1, dtype=object)
    payload[0] = Reduces(os.system, f"touch {marker}")
    path = tmp_path / "model.joblib"
    joblib.dump({"coef": np.ones(3), "extra": payload}, path)
    with pytest.raises(RefusedGlobal, match=r"(os|posix)\.system"):
        safe_pickle.load_joblib(path)
    assert not marker.exists()


def test_truncated_pickle_raises_an_unpickling_error() -> None:
    data = pickle.dumps(_fitted_models()[0])
    with pytest.raises((pickle.UnpicklingError, EOFError)):
        safe_pickle.load(io.BytesIO(data[: len(data) // 2]))


# ---- opcode checks: what a listed global may be used for ----

def _g(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _s(text: str) -> bytes:
    return b"X" + len(text.encode()).to_bytes(4, "little") + text.encode()


def _load_bytes(body: bytes) -> Any:
    return safe_pickle.load(io.BytesIO(b"\x80\x02" + body + b"."))


@pytest.mark.parametrize(("body", "words"), [
    # a stored pure function may be referenced, never called while loading
    (_g("numpy", "log1p") + b"(K\x01tR", "calling it while unpickling"),
    # a listed class whose constructor reads a file may only be created by NEWOBJ
    (_g("lightgbm.basic", "Booster") + b"(NN" + _s("/etc/hostname") + b"tR", "calling it while unpickling"),
    # BUILD on a class object would monkeypatch it
    (_g("sklearn.linear_model._logistic", "LogisticRegression") + b"}" + _s("predict") + _g("numpy", "log1p")
     + b"sb", "setting state on it"),
    # a partial may wrap only the listed pure functions
    (_g("functools", "partial") + b"(" + _g("sklearn.linear_model._logistic", "LogisticRegression") + b"tR",
     "a partial may only wrap"),
    # a defaultdict's factory runs on a missing key
    (_g("collections", "defaultdict") + b"(" + _g("numpy", "log1p") + b"tR", "factory"),
    # the random-state reconstructor is given a callable to call
    (_g("numpy.random._pickle", "__randomstate_ctor") + b"(" + _s("MT19937") + _g("numpy", "log1p") + b"tR",
     "named bit generator"),
    # numpy's array reconstructor builds plain arrays only
    (_g("numpy._core.multiarray", "_reconstruct") + b"(" + _g("sklearn.pipeline", "Pipeline") + b"(K\x00t"
     + _s("b") + b"tR", "only plain numpy arrays"),
])
def test_listed_globals_cannot_be_used_as_call_gadgets(body: bytes, words: str) -> None:
    with pytest.raises(RefusedGlobal, match=words):
        _load_bytes(body)


def test_a_huge_global_name_gives_a_short_message() -> None:
    with pytest.raises(RefusedGlobal) as refused:
        _load_bytes(_g("numpy", "x" * 100_000))
    assert len(str(refused.value)) < 250


def test_bounded_reason_is_one_short_printable_line() -> None:
    from octomil_lite.errors import MAX_REASON_CHARS, bounded_reason

    reason = bounded_reason("could not convert string 'PLANTED\x00\x1b[31m' to float\n" + "secret " * 1000)
    assert len(reason) <= MAX_REASON_CHARS and "\n" not in reason and "\x1b" not in reason and reason.isprintable()


def test_a_broad_set_of_fitted_estimators_loads_with_every_protocol(tmp_path: Path) -> None:
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import GradientBoostingClassifier
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import OneHotEncoder
    from sklearn.svm import SVC

    x, y = _xy()
    binned = np.c_[(x[:, :1] * 3).round(), x[:, 1:]]
    models = [
        GradientBoostingClassifier(n_estimators=3, random_state=0).fit(x, y), SVC(probability=True).fit(x, y),
        KNeighborsClassifier().fit(x, y), MLPClassifier(max_iter=20, random_state=0).fit(x, y),
        make_pipeline(ColumnTransformer([("s", StandardScaler(), [0, 1]),
                                         ("o", OneHotEncoder(handle_unknown="ignore"), [2])],
                                        remainder="passthrough"), LogisticRegression()).fit(x, y),
        HistGradientBoostingClassifier(max_iter=3, categorical_features=[0]).fit(binned, y),
    ]
    for model in models:
        features = binned if isinstance(model, HistGradientBoostingClassifier) else x
        for protocol in range(6):
            loaded = safe_pickle.load(io.BytesIO(pickle.dumps(model, protocol=protocol)))
            np.testing.assert_array_equal(loaded.predict(features), model.predict(features))
        path = tmp_path / "m.joblib"
        joblib.dump(model, path, compress=("lzma", 1))
        np.testing.assert_array_equal(safe_pickle.load_joblib(path).predict(features), model.predict(features))
