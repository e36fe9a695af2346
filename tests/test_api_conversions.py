"""Issue 3, format conversion, through the API: real models are uploaded, their conversions downloaded and run.

On each storage backend (SQLite + directory, PostgreSQL + S3), one registry (in-process, two conversion workers)
takes every upload of the matrix at module start, so the conversions run while the test process builds the next
model and while the other backend's cells are checked; each test then waits for its own cells. A real
`octomil-lite serve` on each backend is used last, for staying responsive during a conversion and resuming jobs
after a kill.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.util
import io
import json
import os
import pickle
import signal
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import BACKENDS, Server, bearer, make_key, storage_env, storage_urls
from litestar.testing import TestClient

from octomil_lite.config import Config
from octomil_lite.server.app import create_app
from octomil_lite.storage import open_metadata

ROWS = np.random.RandomState(7).standard_normal((10, 6)).astype(np.float32)
IMAGES = np.random.RandomState(3).standard_normal((2, 3, 8, 8)).astype(np.float32)
FINAL = ("ready", "failed", "impossible", "unavailable")
WAIT = 300.0  # bound on any one wait: a hung job fails the test instead of hanging it
CONVERSION_WORKERS = 2  # per registry
TIMINGS: dict[str, dict[str, Any]] = {}  # "backend cell" -> what was measured, printed at the end of the module


# ---- a registry seen only through HTTP ----

class Registry:
    """Calls to one registry's HTTP API (an in-process TestClient or an httpx.Client on a real server)."""

    def __init__(self, client: httpx.Client, key: str, data_dir: Path):
        self.client = client
        self.headers = bearer(key)
        self.data_dir = data_dir

    def create_model(self, **body: Any) -> str:
        resp = self.client.post("/api/v1/models", json=body, headers=self.headers)
        assert resp.status_code == 201, resp.text
        return str(resp.json()["id"])

    def upload(self, model_id: str, content: bytes, filename: str, **fields: str) -> dict[str, Any]:
        resp = self.client.post(f"/api/v1/models/{model_id}/versions/upload", headers=self.headers,
                                files={"file": (filename, content)}, data=fields)
        assert resp.status_code == 201, resp.text
        return resp.json()  # type: ignore[no-any-return]

    def detail(self, model_id: str, version: int) -> dict[str, Any]:
        resp = self.client.get(f"/api/v1/models/{model_id}/versions/{version}", headers=self.headers)
        assert resp.status_code == 200, resp.text
        return resp.json()  # type: ignore[no-any-return]

    def download(self, model_id: str, version: int, fmt: str) -> httpx.Response:
        return self.client.get(f"/api/v1/models/{model_id}/versions/{version}/download", params={"format": fmt},
                               headers=self.headers)

    def wait(self, model_id: str, version: int, fmt: str, timeout: float = WAIT) -> dict[str, Any]:
        """Poll the version detail until `fmt` is ready, failed, impossible or unavailable."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.detail(model_id, version)["formats"][fmt]
            if status["status"] in FINAL:
                return status  # type: ignore[no-any-return]
            assert status["status"] in ("pending", "running"), status
            assert time.monotonic() < deadline, f"{fmt} of version {version} still {status['status']} after {timeout} s"
            time.sleep(0.25)


def have(*modules: str) -> bool:
    """Whether this install has every module (without importing any)."""
    return all(importlib.util.find_spec(m) is not None for m in modules)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def onnx_run(data: bytes, *inputs: np.ndarray) -> list[np.ndarray]:
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: x for i, x in zip(session.get_inputs(), inputs)})  # type: ignore[no-any-return]


def tflite_run(data: bytes, x: np.ndarray) -> list[np.ndarray]:
    tf = pytest.importorskip("tensorflow")
    runner = tf.lite.Interpreter(model_content=data).get_signature_runner()
    (name,) = runner.get_input_details()
    return list(runner(**{name: x}).values())


# ---- the models, built the way users build them ----

def xy(classes: int = 2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(0)
    x = rng.standard_normal((120, 6))
    return x, np.digitize(x[:, 0] + 0.3 * x[:, 1], np.linspace(-1, 1, classes - 1))


_NET: Any = None


def torch_net() -> Any:
    """A small conv net whose class lives in this module (so torch.save can pickle it by name)."""
    global _NET
    torch = pytest.importorskip("torch")
    if _NET is None:
        class Net(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.conv = torch.nn.Conv2d(3, 4, 3)
                self.head = torch.nn.Linear(4 * 6 * 6, 5)

            def forward(self, x: Any) -> Any:
                return self.head(torch.relu(self.conv(x)).flatten(1))

        Net.__qualname__ = "Net"
        globals()["Net"] = Net
        torch.manual_seed(0)
        _NET = Net().eval()
    return _NET


class _RunsCommand:
    """Unpickling this calls os.system(cmd)."""

    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.cmd,))


def zip_bomb_keras() -> bytes:
    """A .keras-looking zip whose entries each declare 3.75 GiB once inflated."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("metadata.json", json.dumps({"keras_version": "3.0.0"}))
        archive.writestr("config.json", bytes(1024))
        archive.writestr("model.weights.h5", bytes(1024))
    data = bytearray(buf.getvalue())
    pos = 0
    while (pos := data.find(b"PK\x01\x02", pos)) != -1:
        data[pos + 24:pos + 28] = (0xF0000000).to_bytes(4, "little")
        pos += 4
    return bytes(data)


def enormous_joblib() -> bytes:
    """A joblib (zlib-compressed, as joblib.dump(compress=...) writes) whose one array declares 8 TiB."""
    from joblib.numpy_pickle import NumpyArrayWrapper

    return zlib.compress(pickle.dumps(NumpyArrayWrapper(np.ndarray, (2**40,), "C", np.dtype("float64"))))


# ---- the matrix: every source uploaded once, at module start ----

Check = Callable[[bytes], None]


@dataclass
class Cell:
    """One (source, target) of the issue's matrix and what must come of it."""

    source: str
    target: str
    expect: str  # ready, impossible or failed
    check: Check | None = None  # runs the downloaded bytes against the original model
    reason: tuple[str, ...] = ()  # substrings the reason must hold

    @property
    def id(self) -> str:
        return f"{self.source}->{self.target}"


@dataclass
class Source:
    model_id: str
    version: int
    uploaded: dict[str, Any]
    requested_at: dict[str, float] = field(default_factory=dict)


@dataclass
class Matrix:
    backend: str
    reg: Registry
    sources: dict[str, Source]
    cells: dict[str, Cell]
    seen: dict[str, Any]  # observations made right after uploading, before anything could finish
    marker: Path  # what the os.system pickle would create


def onnx_check(expected: Callable[[], np.ndarray], output: int = 0, x: np.ndarray = ROWS, atol: float = 1e-4,
               column: int | None = None) -> Check:
    def check(data: bytes) -> None:
        got = onnx_run(data, x)[output]
        if column is not None:
            got = got[:, column]
        np.testing.assert_allclose(np.asarray(got).reshape(np.shape(expected())), expected(), atol=atol)
    return check


def tflite_check(expected: Callable[[], np.ndarray]) -> Check:
    def check(data: bytes) -> None:
        (got,) = tflite_run(data, ROWS)
        np.testing.assert_allclose(got, expected(), atol=1e-4)
    return check


def coreml_check(data: bytes) -> None:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = archive.namelist()
        assert "model.mlpackage/Manifest.json" in names, names
        assert json.loads(archive.read("model.mlpackage/Manifest.json"))["itemInfoEntries"]
        assert archive.testzip() is None


ESTIMATOR_ONLY = ("convert to ONNX only",)
TORCH_NO_TFLITE = ("not TFLite",)


class Uploader:
    """Uploads sources to one registry and records what the matrix expects of each (source, target) cell."""

    def __init__(self, reg: Registry, tmp: Path):
        self.reg = reg
        self.tmp = tmp
        self.sources: dict[str, Source] = {}
        self.cells: dict[str, Cell] = {}
        self.seen: dict[str, Any] = {}
        self.models: dict[str, str] = {}

    def upload(self, name: str, framework: str | None, content: bytes, filename: str, **fields: str) -> Source:
        group = framework or "other"
        if group not in self.models:
            self.models[group] = self.reg.create_model(**({"framework": framework} if framework else {}))
        started = time.monotonic()
        body = self.reg.upload(self.models[group], content, filename, **fields)
        self.sources[name] = Source(self.models[group], body["version"], body, {"onnx": started})
        return self.sources[name]

    def request(self, name: str, *targets: str) -> None:
        """Ask for a download: TFLite and Core ML are converted on the first request."""
        src = self.sources[name]
        for target in targets:
            src.requested_at[target] = time.monotonic()
            resp = self.reg.download(src.model_id, src.version, target)
            self.seen[f"first request {name}->{target}"] = (resp.status_code, resp.json(), dict(resp.headers))

    def cell(self, source: str, target: str, expect: str, check: Check | None = None, *reason: str) -> None:
        c = Cell(source, target, expect, check, reason)
        self.cells[c.id] = c

    # Quick conversions first, so they run while the slow frameworks are imported and their models built here.

    def sklearn(self) -> None:
        import joblib
        from sklearn.ensemble import RandomForestRegressor
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        x, y = xy(classes=3)
        pipe = make_pipeline(StandardScaler(), LogisticRegression()).fit(x, y)
        src = self.upload("sklearn-pipeline.pkl", "sklearn", pickle.dumps(pipe), "pipeline.pkl")
        self.seen["sklearn detail after upload"] = self.reg.detail(src.model_id, src.version)
        pending = self.reg.download(src.model_id, src.version, "onnx")
        self.seen["sklearn onnx while pending"] = (pending.status_code, pending.json(), dict(pending.headers))
        self.request("sklearn-pipeline.pkl", "tflite", "coreml")
        self.cell("sklearn-pipeline.pkl", "onnx", "ready",
                  onnx_check(lambda: pipe.predict_proba(ROWS), output=1, atol=1e-5))
        self.cell("sklearn-pipeline.pkl", "tflite", "impossible", None, *ESTIMATOR_ONLY)
        self.cell("sklearn-pipeline.pkl", "coreml", "impossible", None, *ESTIMATOR_ONLY)

        forest = RandomForestRegressor(n_estimators=4, max_depth=4, random_state=0).fit(x, x[:, 2] * 2)
        buf = io.BytesIO()
        joblib.dump(forest, buf, compress=3)
        self.upload("sklearn-forest.joblib", "sklearn", buf.getvalue(), "forest.joblib")
        self.cell("sklearn-forest.joblib", "onnx", "ready", onnx_check(lambda: forest.predict(ROWS)))

        logreg = LogisticRegression().fit(*xy())
        plain = self.tmp / "logreg.joblib"
        joblib.dump(logreg, plain)  # compress=0, the default: a pickle with the raw array bytes inline
        self.upload("sklearn-logreg.joblib(uncompressed)", "sklearn", plain.read_bytes(), "logreg.joblib")
        self.cell("sklearn-logreg.joblib(uncompressed)", "onnx", "ready",
                  onnx_check(lambda: logreg.predict_proba(ROWS), output=1, atol=1e-5))

        import skops.io

        skops.io.dump(pipe, self.tmp / "pipeline.skops")
        self.upload("sklearn-pipeline.skops", "sklearn", (self.tmp / "pipeline.skops").read_bytes(), "pipeline.skops")
        self.cell("sklearn-pipeline.skops", "onnx", "ready",
                  onnx_check(lambda: pipe.predict_proba(ROWS), output=1, atol=1e-5))

    def hostile(self) -> None:
        """An attack and broken files, early: their failures must not wait behind the slow conversions."""
        from sklearn.linear_model import LogisticRegression

        self.seen["marker"] = marker = self.tmp / "pwned"
        self.upload("os.system.pkl", None, pickle.dumps(_RunsCommand(f"touch {marker}"), protocol=4), "model.pkl")
        self.cell("os.system.pkl", "onnx", "failed", None, "refused to unpickle posix.system")
        truncated = pickle.dumps(LogisticRegression().fit(*xy()))
        self.upload("truncated.pkl", "sklearn", truncated[: len(truncated) // 2], "model.pkl")
        self.cell("truncated.pkl", "onnx", "failed")
        self.upload("enormous.joblib", "sklearn", enormous_joblib(), "model.joblib")
        self.cell("enormous.joblib", "onnx", "failed", None, "ran out of memory")

    def onnx(self) -> None:
        from skl2onnx import to_onnx
        from sklearn.linear_model import LinearRegression

        x, _ = xy()
        linear = LinearRegression().fit(x, x @ np.arange(6.0))
        self.seen["onnx bytes"] = onnx_bytes = to_onnx(linear, ROWS[:1]).SerializeToString()
        self.upload("model.onnx", None, onnx_bytes, "model.onnx")
        self.request("model.onnx", "tflite", "coreml")
        self.cell("model.onnx", "onnx", "ready", onnx_check(lambda: linear.predict(ROWS), atol=1e-3))
        self.cell("model.onnx", "tflite", "impossible", None, "upload the original")
        self.cell("model.onnx", "coreml", "impossible", None, "upload the original")

    def xgboost(self) -> None:
        import xgboost as xgb

        x, y = xy(classes=3)
        booster = xgb.train({"objective": "multi:softprob", "num_class": 3, "max_depth": 3}, xgb.DMatrix(x, y), 6)
        for suffix in ("json", "ubj"):
            path = self.tmp / f"booster.{suffix}"
            booster.save_model(str(path))
            self.upload(f"xgboost.{suffix}", "xgboost", path.read_bytes(), path.name)
            self.cell(f"xgboost.{suffix}", "onnx", "ready",
                      onnx_check(lambda: booster.predict(xgb.DMatrix(ROWS)), output=1, atol=1e-5))
        classifier = xgb.XGBClassifier(n_estimators=5, max_depth=3).fit(*xy())
        self.upload("xgboost-classifier.pkl", "xgboost", pickle.dumps(classifier), "classifier.pkl")
        self.cell("xgboost-classifier.pkl", "onnx", "ready",
                  onnx_check(lambda: classifier.predict_proba(ROWS), output=1, atol=1e-5))

    def lightgbm(self) -> None:
        import lightgbm as lgb

        x, y = xy()
        booster = lgb.train({"objective": "binary", "verbose": -1, "num_leaves": 7}, lgb.Dataset(x, y), 8)
        self.upload("lightgbm.txt", None, booster.model_to_string().encode(), "model.txt")
        self.cell("lightgbm.txt", "onnx", "ready",
                  onnx_check(lambda: booster.predict(ROWS), output=1, column=1, atol=1e-5))
        regressor = lgb.LGBMRegressor(n_estimators=8, num_leaves=7, verbose=-1).fit(x, x[:, 1] * 3)
        self.upload("lightgbm-regressor.pkl", None, pickle.dumps(regressor), "regressor.pkl")
        self.cell("lightgbm-regressor.pkl", "onnx", "ready", onnx_check(lambda: regressor.predict(ROWS)))

    def torch(self, coreml: bool) -> None:
        import torch

        net = torch_net()
        with torch.no_grad():
            out = net(torch.from_numpy(IMAGES)).numpy()
        pt2 = self.tmp / "model.pt2"
        torch.export.save(torch.export.export(net, (torch.randn(2, 3, 8, 8),)), str(pt2))
        self.upload("torch-export.pt2", "pytorch", pt2.read_bytes(), "model.pt2")
        script = self.tmp / "model.pt"
        torch.jit.save(torch.jit.trace(net, torch.randn(2, 3, 8, 8)), str(script))
        self.upload("torchscript.pt+input_shape", "pytorch", script.read_bytes(), "model.pt", input_shape="2,3,8,8")
        for name in ("torch-export.pt2", "torchscript.pt+input_shape"):
            self.request(name, *(("coreml", "tflite") if coreml else ("tflite",)))
            self.cell(name, "onnx", "ready", onnx_check(lambda: out, x=IMAGES, atol=1e-5))
            self.cell(name, "tflite", "impossible", None, *TORCH_NO_TFLITE)
            if coreml:
                self.cell(name, "coreml", "ready", coreml_check)
        self.upload("torchscript.pt", "pytorch", script.read_bytes(), "model.pt")
        self.cell("torchscript.pt", "onnx", "impossible", None, "input_shape", "1,3,32,32")

        torch.save(net.state_dict(), str(self.tmp / "weights.pt"))
        self.upload("state_dict.pt", "pytorch", (self.tmp / "weights.pt").read_bytes(), "weights.pt")
        self.cell("state_dict.pt", "onnx", "impossible", None, "state_dict", "architecture", "torch.export")
        torch.save(net, str(self.tmp / "whole.pt"))  # pickles the class by name: test_api_conversions.Net
        self.upload("pickled-module.pt", "pytorch", (self.tmp / "whole.pt").read_bytes(), "whole.pt")
        self.cell("pickled-module.pt", "onnx", "impossible", None, "nn.Module", "class", "torch.export")
        self.upload("pickled-module.pkl", "pytorch", pickle.dumps(net), "model.pkl", format="pytorch")
        self.cell("pickled-module.pkl", "onnx", "impossible", None, "nn.Module", "class", "torch.export")

    def tensorflow(self, coreml: bool) -> None:
        import keras

        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
                                  keras.layers.Dense(3, activation="softmax")])
        out = model(ROWS).numpy()
        later = ("tflite", "coreml") if coreml else ("tflite",)
        model.save(self.tmp / "model.keras")
        k = self.upload("keras.keras", "tensorflow", (self.tmp / "model.keras").read_bytes(), "model.keras")
        self.seen["keras detail after upload"] = self.reg.detail(k.model_id, k.version)
        pending = self.reg.download(k.model_id, k.version, "onnx")
        self.seen["keras onnx while pending"] = (pending.status_code, pending.json(), dict(pending.headers))
        self.request("keras.keras", *later)
        self.seen["keras detail after requests"] = self.reg.detail(k.model_id, k.version)
        model.save(self.tmp / "model.h5")
        self.upload("keras.h5", "tensorflow", (self.tmp / "model.h5").read_bytes(), "model.h5")
        self.request("keras.h5", *later)
        model.export(str(self.tmp / "exported"), verbose=False)
        with zipfile.ZipFile(self.tmp / "saved_model.zip", "w") as archive:
            for f in (self.tmp / "exported").rglob("*"):
                archive.write(f, Path("exported") / f.relative_to(self.tmp / "exported"))
        self.upload("savedmodel.zip", "tensorflow", (self.tmp / "saved_model.zip").read_bytes(), "saved_model.zip")
        self.request("savedmodel.zip", *later)
        for name in ("keras.keras", "keras.h5", "savedmodel.zip"):
            self.cell(name, "onnx", "ready", onnx_check(lambda: out, atol=1e-5))
            self.cell(name, "tflite", "ready", tflite_check(lambda: out))
            if coreml:
                self.cell(name, "coreml", "ready", coreml_check)
        self.upload("zip-bomb.keras", "tensorflow", zip_bomb_keras(), "model.keras")
        self.cell("zip-bomb.keras", "onnx", "failed", None, "over the 4294967296 byte limit")


@pytest.fixture(scope="module")
def matrices(request: pytest.FixtureRequest,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Matrix | str]]:
    """Every source of the matrix uploaded to one registry per backend the selected tests use; optional frameworks
    only when installed. The registries all take their uploads at module start, step by step in turn, so every
    backend's conversions run while the next model is built and while the first backend's cells are checked.
    A backend whose service is missing here maps to why (its cells skip; under CI=true that is a failure)."""
    wanted = [b for b in BACKENDS if any(item.module is request.module and hasattr(item, "callspec")
                                         and item.callspec.params.get("matrix") == b for item in request.session.items)]
    found: dict[str, Matrix | str] = {}
    with contextlib.ExitStack() as stack:
        uploaders = {}
        for backend in wanted:
            try:
                urls = storage_urls(request, backend)
            except pytest.skip.Exception as missing:
                found[backend] = missing.msg
                continue
            tmp = tmp_path_factory.mktemp("conversions")
            config = Config(data_dir=tmp / "data", rate_limit=0, conversion_workers=CONVERSION_WORKERS, **urls)
            client = stack.enter_context(TestClient(app=create_app(config), timeout=60))
            registry = client.app.state.registry
            key = client.blocking_portal.call(registry.create_key, "conversions", "admin")
            uploaders[backend] = Uploader(Registry(client, key, config.data_dir), tmp)
        coreml = have("coremltools")
        steps: list[Callable[[Uploader], None]] = [Uploader.sklearn, Uploader.hostile, Uploader.onnx]
        if have("xgboost", "onnxmltools"):
            steps.append(Uploader.xgboost)
        if have("lightgbm", "onnxmltools"):
            steps.append(Uploader.lightgbm)
        if have("torch", "onnxscript"):
            steps.append(lambda up: up.torch(coreml))
        if have("keras", "tensorflow", "tf2onnx"):
            steps.append(lambda up: up.tensorflow(coreml))
        for step in steps:
            for up in uploaders.values():
                step(up)
        for backend, up in uploaders.items():
            found[backend] = Matrix(backend, up.reg, up.sources, up.cells, up.seen, up.tmp / "pwned")
        yield found


@pytest.fixture(scope="module", params=BACKENDS)
def matrix(request: pytest.FixtureRequest, matrices: dict[str, Matrix | str]) -> Matrix:
    """One backend's registry with the whole matrix uploaded."""
    found = matrices[request.param]
    if isinstance(found, str):
        pytest.skip(found)
    return found


@pytest.fixture(scope="module", autouse=True)
def report_timings() -> Iterator[None]:
    yield
    _print_timings()


def _print_timings() -> None:
    if not TIMINGS:
        return
    lines = ["", "conversion through the API (seconds from upload or first download request; includes queueing "
                 f"behind other jobs, {CONVERSION_WORKERS} workers per backend):"]
    for name, t in TIMINGS.items():
        p = t.get("parity") or {}
        lines.append(f"  {name:<55} {t['status']:<10} {t['seconds']:7.2f} s  max_abs_diff={p.get('max_abs_diff')} "
                     f"tolerance={p.get('tolerance')} within={p.get('within')}")
    print("\n".join(lines))


CELLS = [
    "sklearn-pipeline.pkl->onnx", "sklearn-pipeline.pkl->tflite", "sklearn-pipeline.pkl->coreml",
    "sklearn-forest.joblib->onnx", "sklearn-logreg.joblib(uncompressed)->onnx", "sklearn-pipeline.skops->onnx",
    "model.onnx->onnx", "model.onnx->tflite", "model.onnx->coreml",
    "xgboost.json->onnx", "xgboost.ubj->onnx", "xgboost-classifier.pkl->onnx",
    "lightgbm.txt->onnx", "lightgbm-regressor.pkl->onnx",
    "torch-export.pt2->onnx", "torch-export.pt2->tflite", "torch-export.pt2->coreml",
    "torchscript.pt+input_shape->onnx", "torchscript.pt+input_shape->tflite", "torchscript.pt+input_shape->coreml",
    "torchscript.pt->onnx", "state_dict.pt->onnx", "pickled-module.pt->onnx", "pickled-module.pkl->onnx",
    "keras.keras->onnx", "keras.keras->tflite", "keras.keras->coreml",
    "keras.h5->onnx", "keras.h5->tflite", "keras.h5->coreml",
    "savedmodel.zip->onnx", "savedmodel.zip->tflite", "savedmodel.zip->coreml",
]


def settle(matrix: Matrix, cell: Cell) -> dict[str, Any]:
    src = matrix.sources.get(cell.source)
    if src is None:
        pytest.skip(f"{cell.source} was not uploaded")
    status = matrix.reg.wait(src.model_id, src.version, cell.target)
    TIMINGS[f"{matrix.backend} {cell.id}"] = {
        "status": status["status"], "parity": status["parity"],
        "seconds": time.monotonic() - src.requested_at.get(cell.target, src.requested_at["onnx"])}
    return status


@pytest.mark.parametrize("cell_id", CELLS)
def test_matrix_cell(matrix: Matrix, cell_id: str) -> None:
    """Upload, wait, download, run: the converted model gives the original's outputs (or a clear reason why not)."""
    if cell_id not in matrix.cells:
        pytest.skip("a framework this cell needs is not installed")
    cell = matrix.cells[cell_id]
    src = matrix.sources[cell.source]
    status = settle(matrix, cell)
    assert status["status"] == cell.expect, status
    resp = matrix.reg.download(src.model_id, src.version, cell.target)
    if cell.expect != "ready":
        for words in cell.reason:
            assert words in status["reason"], status["reason"]
        assert resp.status_code == 404
        assert resp.json()["error"] == "not_found"
        message = resp.json()["message"]
        assert status["reason"] in message and f"cannot be downloaded as {cell.target}" in message
        assert "retry-after" not in resp.headers
        assert status["model_hash"] is None and status["model_size_bytes"] is None
        return
    assert resp.status_code == 200, resp.text
    ext = {"onnx": ".onnx", "tflite": ".tflite", "coreml": ".mlpackage.zip"}[cell.target]
    assert resp.headers["content-disposition"] == f'attachment; filename="model_v{src.version}{ext}"'
    assert resp.headers["x-model-hash"] == sha256(resp.content) == status["model_hash"]
    assert int(resp.headers["content-length"]) == len(resp.content) == status["model_size_bytes"]
    assert status["reason"] is None and status["converter"]
    assert cell.check is not None
    cell.check(resp.content)
    parity = status["parity"]
    if cell.source == "model.onnx":
        assert status["converter"] == "original upload" and parity is None
        assert resp.content == matrix.seen["onnx bytes"]
    elif cell.target == "coreml":
        assert parity["within"] is None and parity["max_abs_diff"] is None
        assert parity["note"] == "Core ML cannot run on Linux; not checked"
    else:
        assert parity["within"] is True, parity
        assert 0 <= parity["max_abs_diff"] <= parity["tolerance"], parity
        assert parity["inputs"] > 0
    if cell.target == "onnx":
        signature = status["signature"]
        assert signature["inputs"] and signature["outputs"], signature
        for io_ in signature["inputs"] + signature["outputs"]:
            assert set(io_) == {"name", "type", "shape"} and isinstance(io_["name"], str), io_
            assert isinstance(io_["shape"], list), io_
        assert all(i["type"] == "float" for i in signature["inputs"])
        want = [2, 3, 8, 8] if "torch" in cell.source else 6
        shape = signature["inputs"][0]["shape"]
        assert shape == want if isinstance(want, list) else shape[-1] == want, signature
    else:
        assert status["signature"] is None


def test_parity_and_signature_are_shown_per_format(matrix: Matrix) -> None:
    """The version detail lists every format with status, reason, size, hash, parity and (ONNX) the signature."""
    src = matrix.sources["sklearn-pipeline.pkl"]
    for target in ("onnx", "tflite", "coreml"):
        matrix.reg.wait(src.model_id, src.version, target)
    detail = matrix.reg.detail(src.model_id, src.version)
    assert set(detail["formats"]) == {"sklearn", "onnx", "tflite", "coreml"}
    original = detail["formats"]["sklearn"]
    assert original["status"] == "ready" and original["model_hash"] == detail["model_hash"]
    onnx = detail["formats"]["onnx"]
    assert set(onnx) >= {"status", "reason", "model_size_bytes", "model_hash", "parity", "signature"}
    assert onnx["status"] == "ready" and onnx["reason"] is None
    assert onnx["model_size_bytes"] > 0 and onnx["model_hash"].startswith("sha256:")
    assert set(onnx["parity"]) >= {"max_abs_diff", "tolerance", "within"}
    assert onnx["parity"]["tolerance"] == 1e-4 and onnx["parity"]["within"] is True
    assert onnx["signature"] == {
        "inputs": [{"name": "input", "type": "float", "shape": [None, 6]}],
        "outputs": [{"name": "label", "type": "int64", "shape": [None]},
                    {"name": "probabilities", "type": "float", "shape": [None, 3]}],
    }
    for target in ("tflite", "coreml"):
        assert detail["formats"][target]["status"] == "impossible"
        assert detail["formats"][target]["reason"]
        assert detail["formats"][target]["model_hash"] is None and detail["formats"][target]["parity"] is None
    # Tree ensembles get the looser float32-threshold tolerance.
    forest = matrix.sources["sklearn-forest.joblib"]
    assert matrix.reg.wait(forest.model_id, forest.version, "onnx")["parity"]["tolerance"] == 1e-3


def upload_answer_formats(name: str) -> dict[str, str]:
    """What an upload answers for each source: ONNX started, and what its kind can never become impossible."""
    if name == "model.onnx":
        return {"onnx": "ready", "tflite": "impossible", "coreml": "impossible"}
    if name == "pickled-module.pkl":  # a pickle declared pytorch: a whole nn.Module, convertible to nothing
        return {"onnx": "impossible", "tflite": "impossible", "coreml": "impossible"}
    if name.startswith(("torch-export", "torchscript")):
        return {"onnx": "pending", "tflite": "impossible"}
    if name.startswith(("state_dict", "pickled-module", "keras", "savedmodel", "zip-bomb")):
        return {"onnx": "pending"}
    return {"onnx": "pending", "tflite": "impossible", "coreml": "impossible"}  # the estimators


def test_onnx_starts_at_upload_and_tflite_coreml_on_first_download(matrix: Matrix) -> None:
    seen = matrix.seen
    for name, src in matrix.sources.items():
        assert src.uploaded["formats"] == upload_answer_formats(name), (name, src.uploaded)
    # Right after an upload: ONNX queued; TFLite and Core ML not started until someone asks for them, or
    # impossible with the route table's reason when the source kind can never become them.
    if "keras detail after upload" in seen:
        before = seen["keras detail after upload"]["formats"]
        assert before["onnx"]["status"] in ("pending", "running"), before
        assert before["tflite"]["status"] == before["coreml"]["status"] == "on_request", before
        assert before["tflite"]["reason"] == "converted on the first download request"
    before = seen["sklearn detail after upload"]["formats"]
    assert before["onnx"]["status"] in ("pending", "running"), before
    for target in ("tflite", "coreml"):
        assert before[target]["status"] == "impossible" and "ONNX only" in before[target]["reason"], before
    # A first request for what cannot be made: 404 with the reason at once. For the rest, while pending: 404
    # not_found saying so, with Retry-After.
    requests = {w: w.removeprefix("first request ").rsplit("->", 1) for w in seen if w.startswith("first request")}
    ruled_out = [w for w, (name, target) in requests.items() if upload_answer_formats(name).get(target)]
    assert {"first request sklearn-pipeline.pkl->tflite", "first request model.onnx->coreml"} <= set(ruled_out)
    for what in ruled_out:
        code, body, headers = seen[what]
        assert code == 404 and "cannot be downloaded as" in body["message"] and "retry-after" not in headers
    pending = [w for w in seen if w.endswith("while pending") or (w in requests and w not in ruled_out)]
    assert "sklearn onnx while pending" in pending
    for what in pending:
        code, body, headers = seen[what]
        assert code == 404 and body["error"] == "not_found", (what, body)
        assert "being converted" in body["message"] and "retry" in body["message"].lower(), body
        assert int(headers["retry-after"]) > 0
    if "keras detail after requests" in seen:
        after = seen["keras detail after requests"]["formats"]
        assert {after["tflite"]["status"], after["coreml"]["status"]} <= {"pending", "running"}, after
    # Formats nobody asked for are never converted: the estimators' are impossible from the start.
    for name in ("sklearn-forest.joblib", "sklearn-pipeline.skops", "xgboost.json", "lightgbm.txt"):
        if name in matrix.sources:
            src = matrix.sources[name]
            matrix.reg.wait(src.model_id, src.version, "onnx")
            formats = matrix.reg.detail(src.model_id, src.version)["formats"]
            assert formats["tflite"]["status"] == formats["coreml"]["status"] == "impossible", formats


def test_a_pickle_reaching_for_os_system_fails_and_runs_nothing(matrix: Matrix) -> None:
    src = matrix.sources["os.system.pkl"]
    status = matrix.reg.wait(src.model_id, src.version, "onnx")
    assert status["status"] == "failed"
    assert status["reason"].startswith("refused to unpickle posix.system"), status
    assert not matrix.marker.exists()
    resp = matrix.reg.download(src.model_id, src.version, "onnx")
    assert resp.status_code == 404 and "posix.system" in resp.json()["message"]
    assert "retry-after" not in resp.headers


@pytest.mark.parametrize("name", ["truncated.pkl", "enormous.joblib", "zip-bomb.keras"])
def test_bad_model_files_end_as_failed_conversions(matrix: Matrix, name: str) -> None:
    if f"{name}->onnx" not in matrix.cells:
        pytest.skip("a framework this file needs is not installed")
    cell = matrix.cells[f"{name}->onnx"]
    src = matrix.sources[name]
    status = settle(matrix, cell)
    assert status["status"] == "failed", status
    assert status["reason"]
    for words in cell.reason:
        assert words in status["reason"], status["reason"]
    resp = matrix.reg.download(src.model_id, src.version, "onnx")
    assert resp.status_code == 404 and status["reason"] in resp.json()["message"]
    assert "retry-after" not in resp.headers
    assert matrix.reg.client.get("/health").status_code == 200


def leftovers(data_dir: Path) -> list[str]:
    """What stays in <data>/tmp (a worker removes its directory just after recording the outcome: allow it 10 s)."""
    deadline = time.monotonic() + 10
    while (names := sorted(p.name for p in (data_dir / "tmp").iterdir())) and time.monotonic() < deadline:
        time.sleep(0.1)
    return names


def test_nothing_is_left_in_tmp_once_every_job_has_ended(matrix: Matrix) -> None:
    for src in matrix.sources.values():
        formats = matrix.reg.detail(src.model_id, src.version)["formats"]
        for target in ("onnx", "tflite", "coreml"):
            if formats[target]["status"] != "on_request":
                matrix.reg.wait(src.model_id, src.version, target)
    assert leftovers(matrix.reg.data_dir) == []


# ---- a real server: responsive during a conversion, jobs resumed after a kill ----

def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def statuses(config: Config, model_id: str) -> dict[str, str]:
    """The conversion jobs of the model's version 1 as its metadata store holds them (opened here, not via HTTP)."""
    async def read() -> dict[str, str]:
        db = await open_metadata(config)
        try:
            model = await db.get_model(model_id)
            assert model is not None, model_id
            version = await db.get_version(model["seq"], number=1)
            assert version is not None, model_id
            return {a["format"]: a["status"] for a in await db.list_artifacts(version["seq"])}
        finally:
            await db.close()

    return asyncio.run(read())


def timed(client: httpx.Client, path: str, headers: dict[str, str]) -> float:
    start = time.perf_counter()
    resp = client.get(path, headers=headers)
    elapsed = time.perf_counter() - start
    assert resp.status_code == 200, resp.text
    return elapsed


def measure_while_running(reg: Registry, model_id: str, seconds: float) -> list[float]:
    """Latencies of /health and /api/v1/models, each taken while the ONNX job is still running."""
    latencies: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if reg.detail(model_id, 1)["formats"]["onnx"]["status"] != "running":
            break
        latencies.append(timed(reg.client, "/health", {}))
        latencies.append(timed(reg.client, "/api/v1/models", reg.headers))
        time.sleep(0.05)
    return latencies


@pytest.mark.backends
def test_real_server_answers_during_a_conversion_and_resumes_jobs_after_a_kill(tmp_path: Path, backend: str,
                                                                                config: Config) -> None:
    keras = pytest.importorskip("keras")
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")
    keras.utils.set_random_seed(1)
    kmodel = keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(2)])
    expected = kmodel(ROWS).numpy()
    kmodel.save(tmp_path / "model.keras")
    data_dir, env = config.data_dir, storage_env(config)
    key = make_key(data_dir, env=env)
    server = Server(data_dir, env=env)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            reg = Registry(client, key, data_dir)
            model_id = reg.create_model(framework="tensorflow")
            uploaded_at = time.monotonic()
            assert reg.upload(model_id, (tmp_path / "model.keras").read_bytes(), "model.keras")["formats"] == {
                "onnx": "pending"}
            deadline = time.monotonic() + 60
            while reg.detail(model_id, 1)["formats"]["onnx"]["status"] == "pending":
                assert time.monotonic() < deadline
                time.sleep(0.1)
            # The server does not wait on the conversion child.
            latencies = measure_while_running(reg, model_id, 2.0)
            assert len(latencies) >= 8, latencies
            assert max(latencies) < 0.5, latencies
            TIMINGS[f"{backend} real server: latency during conversion"] = {
                "status": f"n={len(latencies)}", "seconds": max(latencies), "parity": None}
            pending = reg.download(model_id, 1, "tflite")
            assert pending.status_code == 404 and int(pending.headers["retry-after"]) > 0
            assert statuses(config, model_id) == {"onnx": "running", "tflite": "pending"}
            workers = children(server.proc.pid)
            assert workers, "no conversion child was running"
        server.proc.kill()  # a crash: no graceful shutdown
        server.proc.wait()
        for pid in workers:  # the sandboxed child is its own session leader; stop it by its id
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        # Durable: the jobs are in the metadata store, as the dead server left them.
        assert statuses(config, model_id) == {"onnx": "running", "tflite": "pending"}

        server = Server(data_dir, env=env)
        with httpx.Client(base_url=server.url, timeout=30) as client:
            reg = Registry(client, key, data_dir)
            deadline = time.monotonic() + 60
            while reg.detail(model_id, 1)["formats"]["onnx"]["status"] == "pending":
                assert time.monotonic() < deadline
                time.sleep(0.1)
            latencies = measure_while_running(reg, model_id, 2.0)
            assert latencies and max(latencies) < 0.5, latencies
            onnx = reg.wait(model_id, 1, "onnx")
            tflite = reg.wait(model_id, 1, "tflite")
            TIMINGS[f"{backend} real server: keras->onnx, resumed"] = {
                "status": onnx["status"], "seconds": time.monotonic() - uploaded_at, "parity": onnx["parity"]}
            assert onnx["status"] == "ready" and tflite["status"] == "ready", (onnx, tflite)
            assert onnx["parity"]["within"] is True and tflite["parity"]["within"] is True
            got = reg.download(model_id, 1, "onnx")
            assert got.status_code == 200 and got.headers["x-model-hash"] == sha256(got.content)
            np.testing.assert_allclose(onnx_run(got.content, ROWS)[0], expected, atol=1e-5)
            got = reg.download(model_id, 1, "tflite")
            assert got.status_code == 200 and got.headers["x-model-hash"] == sha256(got.content)
            np.testing.assert_allclose(tflite_run(got.content, ROWS)[0], expected, atol=1e-4)
        assert statuses(config, model_id) == {"onnx": "ready", "tflite": "ready"}
        assert "resuming 1 conversion(s)" in server.output()
        assert leftovers(data_dir) == []
    finally:
        server.stop()
