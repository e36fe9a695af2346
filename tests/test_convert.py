"""Conversion: real models saved the way users save them, converted, then run side by side with the original."""

from __future__ import annotations

import asyncio
import json
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import onnxruntime as ort
import pytest
from sklearn.ensemble import RandomForestRegressor
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from octomil_lite.convert.pool import TARGETS
from octomil_lite.convert.routes import available_conversions
from octomil_lite.convert.sandbox import JobFiles, Limits, Sandbox
from octomil_lite.convert.worker import run_job

ROWS = np.random.RandomState(7).standard_normal((10, 6)).astype(np.float32)


def convert(src: Path, kind: str, target: str, out_dir: Path, hint: str | None = None,
            input_shape: list[int] | None = None) -> dict[str, Any]:
    out_dir.mkdir(exist_ok=True)
    options = {"input_shape": input_shape} if input_shape else {}
    return run_job({"src": str(src), "kind": kind, "framework_hint": hint, "target": target,
                    "out_dir": str(out_dir), "options": options})


def in_sandbox(tmp_path: Path, src: Path, kind: str, target: str, hint: str | None = None) -> dict[str, Any]:
    """Convert through the server's real job sandbox; the output lands in sandbox-out/model.<target>."""
    sandbox = Sandbox(hidden=[])
    assert sandbox.probe().available, sandbox.isolation.reason
    out_dir = tmp_path / "sandbox-out"
    out_dir.mkdir()
    output = out_dir / f"model{TARGETS[target]}"
    payload = {"kind": kind, "framework_hint": hint, "target": target, "options": {}}
    result = asyncio.run(sandbox.run_task("convert", payload, Limits(timeout=300),
                                          JobFiles({"model": src}, output=output)))
    if result.get("status") == "done":
        result["path"] = str(output)
    else:
        output.unlink()
    return result


def assert_done(result: dict[str, Any], out_dir: Path, name: str) -> Path:
    assert result["status"] == "done", result
    assert result["path"] == str(out_dir / name)
    assert sorted(p.name for p in out_dir.iterdir()) == [name]
    parity = result["parity"]
    assert parity["inputs"] > 0
    assert parity["within"] is True, parity
    assert parity["max_abs_diff"] <= parity["tolerance"] * 10
    return Path(result["path"])


def onnx_outputs(path: Path, *inputs: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: x for i, x in zip(session.get_inputs(), inputs)})


def xy(n_features: int = 6, classes: int = 2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(0)
    x = rng.standard_normal((120, n_features))
    return x, (np.digitize(x[:, 0] + 0.3 * x[:, 1], np.linspace(-1, 1, classes - 1)))


# ---- scikit-learn ----

def test_sklearn_pipeline_pickle_converts_to_onnx_with_matching_probabilities(tmp_path: Path) -> None:
    x, y = xy(classes=3)
    model = make_pipeline(StandardScaler(), LogisticRegression()).fit(x, y)
    src = tmp_path / "model.pkl"
    src.write_bytes(pickle.dumps(model))
    result = convert(src, "pickle", "onnx", tmp_path / "out", hint="sklearn")
    path = assert_done(result, tmp_path / "out", "model.onnx")
    labels, probabilities = onnx_outputs(path, ROWS)
    np.testing.assert_allclose(probabilities, model.predict_proba(ROWS), atol=1e-5)
    np.testing.assert_array_equal(labels, model.predict(ROWS))
    assert result["framework"] == "sklearn"
    assert result["converter"].startswith("skl2onnx ")
    assert result["signature"]["inputs"] == [{"name": "input", "type": "float", "shape": [None, 6]}]


@pytest.mark.parametrize("compress", [0, 3])
def test_sklearn_regressor_joblib_converts_compressed_or_not(tmp_path: Path, compress: int) -> None:
    x, _ = xy()
    model = RandomForestRegressor(n_estimators=4, max_depth=4, random_state=0).fit(x, x[:, 2] * 2)
    src = tmp_path / "model.joblib"
    joblib.dump(model, src, compress=compress)
    result = convert(src, "joblib", "onnx", tmp_path / "out", hint="sklearn")
    path = assert_done(result, tmp_path / "out", "model.onnx")
    np.testing.assert_allclose(onnx_outputs(path, ROWS)[0].ravel(), model.predict(ROWS), atol=1e-4)
    assert result["parity"]["tolerance"] == 1e-3


def test_skops_file_converts_to_onnx(tmp_path: Path) -> None:
    skops_io = pytest.importorskip("skops.io")
    x, y = xy()
    model = make_pipeline(StandardScaler(), LogisticRegression()).fit(x, y)
    src = tmp_path / "model.skops"
    skops_io.dump(model, src)
    path = assert_done(convert(src, "skops", "onnx", tmp_path / "out", hint="sklearn"), tmp_path / "out", "model.onnx")
    np.testing.assert_allclose(onnx_outputs(path, ROWS)[1], model.predict_proba(ROWS), atol=1e-5)


def test_sklearn_to_tflite_is_impossible(tmp_path: Path) -> None:
    src = tmp_path / "model.pkl"
    src.write_bytes(pickle.dumps(LogisticRegression().fit(*xy())))
    result = convert(src, "pickle", "tflite", tmp_path / "out", hint="sklearn")
    assert result["status"] == "impossible"
    assert "ONNX" in result["reason"]


def test_pickle_of_something_that_is_not_a_model_fails(tmp_path: Path) -> None:
    src = tmp_path / "model.pkl"
    src.write_bytes(pickle.dumps({"weights": [1.0, 2.0]}))
    result = convert(src, "pickle", "onnx", tmp_path / "out", hint="sklearn")
    assert result["status"] == "failed"
    assert "builtins.dict" in result["reason"]


def test_truncated_pickle_fails_with_a_reason(tmp_path: Path) -> None:
    data = pickle.dumps(LogisticRegression().fit(*xy()))
    src = tmp_path / "model.pkl"
    src.write_bytes(data[: len(data) // 2])
    result = convert(src, "pickle", "onnx", tmp_path / "out", hint="sklearn")
    assert result["status"] == "failed"
    assert result["reason"]


# ---- XGBoost and LightGBM ----

@pytest.mark.parametrize("suffix", ["json", "ubj"])
def test_xgboost_native_booster_converts_to_onnx(tmp_path: Path, suffix: str) -> None:
    xgb = pytest.importorskip("xgboost")
    pytest.importorskip("onnxmltools")
    x, y = xy(classes=3)
    booster = xgb.train({"objective": "multi:softprob", "num_class": 3, "max_depth": 3},
                        xgb.DMatrix(x, y, feature_names=[f"col{i}" for i in range(6)]), 6)
    src = tmp_path / f"model.{suffix}"
    booster.save_model(str(src))
    result = convert(src, f"xgboost-{suffix}", "onnx", tmp_path / "out", hint="xgboost")
    path = assert_done(result, tmp_path / "out", "model.onnx")
    expected = booster.predict(xgb.DMatrix(ROWS, feature_names=[f"col{i}" for i in range(6)]))
    np.testing.assert_allclose(onnx_outputs(path, ROWS)[1], expected, atol=1e-5)
    assert result["framework_version"] == xgb.__version__


def test_xgboost_classifier_pickle_converts_to_onnx(tmp_path: Path) -> None:
    xgb = pytest.importorskip("xgboost")
    pytest.importorskip("onnxmltools")
    model = xgb.XGBClassifier(n_estimators=5, max_depth=3).fit(*xy())
    src = tmp_path / "model.pkl"
    src.write_bytes(pickle.dumps(model))
    path = assert_done(convert(src, "pickle", "onnx", tmp_path / "out", hint="xgboost"), tmp_path / "out", "model.onnx")
    np.testing.assert_allclose(onnx_outputs(path, ROWS)[1], model.predict_proba(ROWS), atol=1e-5)


def test_lightgbm_text_model_converts_to_onnx(tmp_path: Path) -> None:
    lgb = pytest.importorskip("lightgbm")
    pytest.importorskip("onnxmltools")
    x, y = xy()
    booster = lgb.train({"objective": "binary", "verbose": -1, "num_leaves": 7}, lgb.Dataset(x, y), 8)
    src = tmp_path / "model.txt"
    booster.save_model(str(src))
    path = assert_done(convert(src, "lightgbm-text", "onnx", tmp_path / "out", hint="lightgbm"),
                       tmp_path / "out", "model.onnx")
    np.testing.assert_allclose(onnx_outputs(path, ROWS)[1][:, 1], booster.predict(ROWS), atol=1e-5)


def test_lightgbm_regressor_joblib_converts_to_onnx(tmp_path: Path) -> None:
    lgb = pytest.importorskip("lightgbm")
    pytest.importorskip("onnxmltools")
    x, _ = xy()
    model = lgb.LGBMRegressor(n_estimators=8, num_leaves=7, verbose=-1).fit(x, x[:, 1] * 3)
    src = tmp_path / "model.joblib"
    joblib.dump(model, src)
    result = convert(src, "joblib", "onnx", tmp_path / "out", hint="lightgbm")
    path = assert_done(result, tmp_path / "out", "model.onnx")
    np.testing.assert_allclose(onnx_outputs(path, ROWS)[0].ravel(), model.predict(ROWS), atol=1e-4)


def test_missing_framework_is_reported_with_the_install_command(tmp_path: Path) -> None:
    pytest.importorskip("xgboost")
    src = tmp_path / "model.json"
    src.write_text("{}")
    out = tmp_path / "out"
    out.mkdir()
    # A child interpreter in which xgboost cannot be imported, as on an install without the extra.
    script = (
        "import json, sys\n"
        "sys.modules['xgboost'] = None\n"
        "from octomil_lite.convert.routes import available_conversions\n"
        "from octomil_lite.convert.worker import run_job\n"
        f"payload = {{'src': {str(src)!r}, 'kind': 'xgboost-json', 'framework_hint': 'xgboost', "
        f"'target': 'onnx', 'out_dir': {str(out)!r}, 'options': {{}}}}\n"
        "print(json.dumps([run_job(payload), available_conversions()]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    result, table = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["status"] == "unavailable"
    assert result["extra"] == "xgboost"
    assert 'pip install "octomil-lite[xgboost]"' in result["reason"]
    assert table["xgboost"] == []


# ---- PyTorch ----

def _torch_net() -> Any:
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.head = torch.nn.Linear(4 * 6 * 6, 5)

        def forward(self, x: Any) -> Any:
            return self.head(torch.relu(self.conv(x)).flatten(1))

    torch.manual_seed(0)
    return Net().eval()


@pytest.fixture
def pt2_file(tmp_path: Path) -> tuple[Path, Any]:
    torch = pytest.importorskip("torch")
    net = _torch_net()
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(net, (torch.randn(2, 3, 8, 8),)), str(path))
    return path, net


@pytest.fixture
def torchscript_file(tmp_path: Path) -> tuple[Path, Any]:
    torch = pytest.importorskip("torch")
    net = _torch_net()
    path = tmp_path / "model.ts"
    torch.jit.save(torch.jit.trace(net, torch.randn(2, 3, 8, 8)), str(path))
    return path, net


def test_torch_export_program_converts_to_onnx_without_its_class(tmp_path: Path, pt2_file: tuple[Path, Any]) -> None:
    pytest.importorskip("onnxscript")
    import torch

    src, net = pt2_file
    result = convert(src, "torch-export", "onnx", tmp_path / "out", hint="pytorch")
    path = assert_done(result, tmp_path / "out", "model.onnx")
    x = np.random.RandomState(3).standard_normal((2, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(onnx_outputs(path, x)[0], expected, atol=1e-5)
    assert result["signature"]["inputs"][0]["shape"] == [2, 3, 8, 8]
    assert result["converter"].startswith("torch.onnx")


def test_torchscript_without_input_shape_is_impossible(tmp_path: Path, torchscript_file: tuple[Path, Any]) -> None:
    result = convert(torchscript_file[0], "torchscript", "onnx", tmp_path / "out", hint="pytorch")
    assert result["status"] == "impossible"
    assert "input_shape" in result["reason"] and "1,3,32,32" in result["reason"]


def test_torchscript_with_input_shape_converts_to_onnx(tmp_path: Path, torchscript_file: tuple[Path, Any]) -> None:
    import torch

    src, net = torchscript_file
    result = convert(src, "torchscript", "onnx", tmp_path / "out", hint="pytorch", input_shape=[2, 3, 8, 8])
    path = assert_done(result, tmp_path / "out", "model.onnx")
    x = np.random.RandomState(4).standard_normal((2, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(onnx_outputs(path, x)[0], net(torch.from_numpy(x)).numpy(), atol=1e-5)


@pytest.mark.parametrize("zip_format", [True, False], ids=["torch-zip", "torch-legacy"])
def test_state_dict_is_impossible_to_convert(tmp_path: Path, zip_format: bool) -> None:
    torch = pytest.importorskip("torch")
    src = tmp_path / "weights.pt"
    torch.save(_torch_net().state_dict(), str(src), _use_new_zipfile_serialization=zip_format)
    result = convert(src, "torch-zip" if zip_format else "torch-legacy", "onnx", tmp_path / "out", hint="pytorch")
    assert result == {"status": "impossible", "reason": "a PyTorch state_dict holds only weights; re-export with "
                      "torch.export (.pt2) or TorchScript so the architecture travels with it"}


def test_pickled_whole_module_is_impossible_and_not_loaded(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    src = tmp_path / "model.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(3, 2)), str(src))
    result = convert(src, "torch-zip", "onnx", tmp_path / "out", hint="pytorch")
    assert result["status"] == "impossible"
    assert "whole nn.Module" in result["reason"]


@pytest.mark.parametrize("fixture", ["pt2_file", "torchscript_file"])
def test_pytorch_converts_to_a_zipped_coreml_package(tmp_path: Path, fixture: str, request: Any) -> None:
    pytest.importorskip("coremltools")
    src = request.getfixturevalue(fixture)[0]
    kind = "torch-export" if fixture == "pt2_file" else "torchscript"
    result = convert(src, kind, "coreml", tmp_path / "out", hint="pytorch", input_shape=[2, 3, 8, 8])
    assert result["status"] == "done", result
    assert result["path"] == str(tmp_path / "out" / "model.mlpackage.zip")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.mlpackage.zip"]
    assert result["parity"] == {"max_abs_diff": None, "tolerance": 1e-4, "within": None, "inputs": 2,
                                "note": "Core ML cannot run on Linux; not checked"}
    assert result["signature"] is None
    with zipfile.ZipFile(result["path"]) as archive:
        assert "model.mlpackage/Manifest.json" in archive.namelist()


# ---- TensorFlow / Keras ----

@pytest.fixture(scope="module")
def keras_model() -> Any:
    keras = pytest.importorskip("keras")
    pytest.importorskip("tensorflow")
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
                             keras.layers.Dense(3, activation="softmax")])


@pytest.mark.parametrize("suffix", ["keras", "h5"])
def test_keras_file_converts_to_onnx(tmp_path: Path, keras_model: Any, suffix: str) -> None:
    pytest.importorskip("tf2onnx")
    src = tmp_path / f"model.{suffix}"
    keras_model.save(src)
    result = convert(src.rename(tmp_path / "upload"), "keras" if suffix == "keras" else "hdf5", "onnx",
                     tmp_path / "out", hint="tensorflow")
    path = assert_done(result, tmp_path / "out", "model.onnx")
    np.testing.assert_allclose(onnx_outputs(path, ROWS)[0], keras_model(ROWS).numpy(), atol=1e-5)
    assert result["framework"] == "tensorflow"


def test_keras_file_converts_to_tflite(tmp_path: Path, keras_model: Any) -> None:
    import tensorflow as tf

    src = tmp_path / "model.keras"
    keras_model.save(src)
    result = convert(src, "keras", "tflite", tmp_path / "out", hint="tensorflow")
    path = assert_done(result, tmp_path / "out", "model.tflite")
    runner = tf.lite.Interpreter(model_path=str(path)).get_signature_runner()
    (name,) = runner.get_input_details()
    (out,) = runner(**{name: ROWS}).values()
    np.testing.assert_allclose(out, keras_model(ROWS).numpy(), atol=1e-4)
    assert result["signature"] is None


@pytest.fixture
def saved_model_zip(tmp_path: Path, keras_model: Any) -> Path:
    keras_model.export(str(tmp_path / "exported"), verbose=False)
    src = tmp_path / "saved_model.zip"
    with zipfile.ZipFile(src, "w") as archive:
        for f in (tmp_path / "exported").rglob("*"):
            archive.write(f, Path("exported") / f.relative_to(tmp_path / "exported"))
    return src


@pytest.mark.parametrize(("target", "name"), [("onnx", "model.onnx"), ("tflite", "model.tflite")])
def test_zipped_saved_model_converts(tmp_path: Path, saved_model_zip: Path, keras_model: Any, target: str,
                                     name: str) -> None:
    pytest.importorskip("tf2onnx")
    result = convert(saved_model_zip, "savedmodel-zip", target, tmp_path / "out", hint="tensorflow")
    path = assert_done(result, tmp_path / "out", name)
    if target == "onnx":
        got = onnx_outputs(path, ROWS)[0]
    else:
        import tensorflow as tf

        runner = tf.lite.Interpreter(model_path=str(path)).get_signature_runner()
        (got,) = runner(**{n: ROWS for n in runner.get_input_details()}).values()
    np.testing.assert_allclose(got, keras_model(ROWS).numpy(), atol=1e-4)


@pytest.mark.parametrize("kind", ["keras", "savedmodel-zip"])
def test_tensorflow_converts_to_a_zipped_coreml_package(tmp_path: Path, keras_model: Any, saved_model_zip: Path,
                                                        kind: str) -> None:
    pytest.importorskip("coremltools")
    src = saved_model_zip
    if kind == "keras":
        src = tmp_path / "model.keras"
        keras_model.save(src)
    result = convert(src, kind, "coreml", tmp_path / "out", hint="tensorflow")
    assert result["status"] == "done", result
    assert result["path"] == str(tmp_path / "out" / "model.mlpackage.zip")
    assert result["parity"]["within"] is None
    assert result["framework"] == "tensorflow"
    with zipfile.ZipFile(result["path"]) as archive:
        assert "model.mlpackage/Manifest.json" in archive.namelist()


@pytest.mark.parametrize("suffix", ["keras", "h5"])
def test_keras_lambda_layer_bytecode_is_refused(tmp_path: Path, suffix: str) -> None:
    keras = pytest.importorskip("keras")
    model = keras.Sequential([keras.Input((2,)), keras.layers.Lambda(lambda x: x * 2)])
    src = tmp_path / f"model.{suffix}"
    model.save(src)
    result = convert(src, "keras" if suffix == "keras" else "hdf5", "onnx", tmp_path / "out", hint="tensorflow")
    assert result["status"] == "failed"
    assert "safe_mode" in result["reason"]


def test_tflite_file_converts_to_onnx(tmp_path: Path, keras_model: Any) -> None:
    pytest.importorskip("tf2onnx")
    import tensorflow as tf

    src = tmp_path / "model.tflite"
    src.write_bytes(tf.lite.TFLiteConverter.from_keras_model(keras_model).convert())
    result = convert(src, "tflite", "onnx", tmp_path / "out", hint="tensorflow")
    path = assert_done(result, tmp_path / "out", "model.onnx")
    np.testing.assert_allclose(onnx_outputs(path, ROWS)[0], keras_model(ROWS).numpy(), atol=1e-4)


def test_keras_zip_bomb_fails_before_expanding(tmp_path: Path) -> None:
    pytest.importorskip("tensorflow")
    src = tmp_path / "bomb.keras"
    with zipfile.ZipFile(src, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("config.json", bytes(1024))
        archive.writestr("model.weights.h5", bytes(1024))
    # Each entry's central-directory record declares 3.75 GiB, as a bomb's would.
    data = bytearray(src.read_bytes())
    pos = 0
    while (pos := data.find(b"PK\x01\x02", pos)) != -1:
        data[pos + 24:pos + 28] = (0xF0000000).to_bytes(4, "little")
        pos += 4
    src.write_bytes(bytes(data))
    result = convert(src, "keras", "onnx", tmp_path / "out", hint="tensorflow")
    assert result["status"] == "failed"
    assert "over the 4294967296 byte limit" in result["reason"]


def test_saved_model_zip_with_path_traversal_fails_and_writes_nothing_outside(tmp_path: Path) -> None:
    pytest.importorskip("tensorflow")
    src = tmp_path / "evil.zip"
    with zipfile.ZipFile(src, "w") as archive:
        archive.writestr("../../escaped.txt", "x")
        archive.writestr("saved_model.pb", "not a graph")
    result = convert(src, "savedmodel-zip", "onnx", tmp_path / "out", hint="tensorflow")
    assert result["status"] == "failed"
    assert "outside the archive" in result["reason"]
    assert not (tmp_path / "escaped.txt").exists()
    assert list((tmp_path / "out").iterdir()) == []


# ---- any source ----

@pytest.mark.parametrize("kind", ["pickle", "joblib", "xgboost-json", "xgboost-ubj", "lightgbm-text", "torch-zip",
                                  "torch-export", "keras", "hdf5", "savedmodel-zip", "tflite"])
def test_garbage_bytes_fail_with_a_reason(tmp_path: Path, kind: str) -> None:
    src = tmp_path / "upload"
    src.write_bytes(b"PK\x03\x04 this is not a model at all" * 10)
    result = convert(src, kind, "onnx", tmp_path / "out", input_shape=[1, 3])
    assert result["status"] in ("failed", "unavailable"), result
    assert result["reason"]
    assert list((tmp_path / "out").iterdir()) == []


def test_joblib_array_declaring_an_enormous_shape_fails_as_out_of_memory(tmp_path: Path) -> None:
    from joblib.numpy_pickle import NumpyArrayWrapper

    src = tmp_path / "model.joblib"
    src.write_bytes(pickle.dumps(NumpyArrayWrapper(np.ndarray, (2**40,), "C", np.dtype("float64"))))
    result = convert(src, "joblib", "onnx", tmp_path / "out", hint="sklearn")
    assert result["status"] == "failed"
    assert result["reason"].startswith("ran out of memory")


def test_missing_out_dir_fails_instead_of_raising(tmp_path: Path) -> None:
    result = run_job({"src": str(tmp_path / "x"), "kind": "pickle", "framework_hint": "sklearn", "target": "onnx",
                      "out_dir": str(tmp_path / "absent"), "options": {}})
    assert result["status"] == "failed"


def test_enormous_input_shape_fails_without_allocating(tmp_path: Path, torchscript_file: tuple[Path, Any]) -> None:
    result = convert(torchscript_file[0], "torchscript", "onnx", tmp_path / "out", input_shape=[1, 3, 100000, 100000])
    assert result["status"] == "failed"
    assert "input_shape" in result["reason"]


@pytest.mark.parametrize("target", ["tflite", "coreml"])
def test_onnx_to_other_formats_is_impossible_with_a_route(tmp_path: Path, target: str) -> None:
    src = tmp_path / "model.onnx"
    src.write_bytes(b"")
    result = convert(src, "onnx", target, tmp_path / "out")
    assert result["status"] == "impossible"
    assert "upload the original" in result["reason"]


def test_available_conversions_imports_no_framework() -> None:
    code = ("import json, sys\nfrom octomil_lite.convert.routes import available_conversions\n"
            "table = available_conversions()\n"
            "heavy = ('torch', 'tensorflow', 'xgboost', 'sklearn'); "
            "print(json.dumps([table, sorted(m for m in heavy if m in sys.modules)]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    table, imported = json.loads(done.stdout)
    assert imported == []
    assert table == available_conversions()
    assert table["sklearn"] == ["onnx"]
    assert table["onnx"] == []


# ---- through the real sandbox ----

def test_sandbox_converts_a_sklearn_pickle(tmp_path: Path) -> None:
    model = make_pipeline(StandardScaler(), LogisticRegression()).fit(*xy())
    src = tmp_path / "model.pkl"
    src.write_bytes(pickle.dumps(model))
    result = in_sandbox(tmp_path, src, "pickle", "onnx", hint="sklearn")
    path = assert_done(result, tmp_path / "sandbox-out", "model.onnx")
    np.testing.assert_allclose(onnx_outputs(path, ROWS)[1], model.predict_proba(ROWS), atol=1e-5)


def test_sandbox_refuses_a_pickle_that_runs_a_command(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    src = tmp_path / "model.pkl"
    src.write_bytes(b"cposix\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    result = in_sandbox(tmp_path, src, "pickle", "onnx", hint="sklearn")
    assert result["status"] == "failed"
    assert result["reason"].startswith("refused to unpickle posix.system")
    assert not marker.exists()


def test_sandbox_converts_a_torch_export_program(tmp_path: Path, pt2_file: tuple[Path, Any]) -> None:
    pytest.importorskip("onnxscript")
    result = in_sandbox(tmp_path, pt2_file[0], "torch-export", "onnx", hint="pytorch")
    assert_done(result, tmp_path / "sandbox-out", "model.onnx")


def test_sandbox_converts_keras_to_tflite(tmp_path: Path, keras_model: Any) -> None:
    src = tmp_path / "upload"
    keras_model.save(tmp_path / "model.keras")
    (tmp_path / "model.keras").rename(src)
    result = in_sandbox(tmp_path, src, "keras", "tflite", hint="tensorflow")
    assert_done(result, tmp_path / "sandbox-out", "model.tflite")

