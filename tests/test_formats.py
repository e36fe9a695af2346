"""Format sniffing on real files: what each framework writes is recognised without running it."""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import joblib
import numpy as np
import pytest
from sklearn.tree import DecisionTreeClassifier

from octomil_lite.errors import BadRequest
from octomil_lite.formats import Sniffed, looks_like_onnx, pickle_classes, resolve_format, sniff


def sniff_bytes(tmp_path: Path, data: bytes, name: str = "upload") -> Sniffed:
    path = tmp_path / "f"
    path.write_bytes(data)
    return sniff(data[: 64 * 1024], lambda: open(path, "rb"), len(data), name)


@pytest.fixture(scope="module")
def tree() -> DecisionTreeClassifier:
    return DecisionTreeClassifier().fit(np.random.RandomState(0).rand(30, 3), [0, 1, 2] * 10)


def test_sklearn_pickle_and_joblib_are_recognised(tmp_path: Path, tree: DecisionTreeClassifier) -> None:
    assert sniff_bytes(tmp_path, pickle.dumps(tree)) == Sniffed(
        "pickle", "sklearn", ("sklearn.tree._classes.DecisionTreeClassifier", "sklearn.tree._tree.Tree"))
    for compress in (0, 3):
        buf = io.BytesIO()
        joblib.dump(tree, buf, compress=compress)
        assert sniff_bytes(tmp_path, buf.getvalue(), "m.joblib").framework == "sklearn"
    buf = io.BytesIO()
    joblib.dump(tree, buf, compress=("gzip", 3))
    assert sniff_bytes(tmp_path, buf.getvalue()).kind == "joblib"


def test_onnx_is_recognised_and_truncation_or_noise_is_not(tmp_path: Path, onnx_bytes: bytes) -> None:
    assert sniff_bytes(tmp_path, onnx_bytes).kind == "onnx"
    assert not looks_like_onnx(b"hello world", 11)
    assert not looks_like_onnx(onnx_bytes[:40], 40)
    assert sniff_bytes(tmp_path, bytes(range(256)) * 10).kind is None


def _zip(names: list[str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name in names:
            zf.writestr(name, b"{}")
    return buf.getvalue()


@pytest.mark.parametrize(("names", "kind"), [
    (["archive/data.pkl", "archive/version", "archive/data/0"], "torch-zip"),
    (["archive/data.pkl", "archive/constants.pkl", "archive/code/__torch__/m.py"], "torchscript"),
    (["model/archive_format", "model/models/model.json"], "torch-export"),
    (["config.json", "metadata.json", "model.weights.h5"], "keras"),
    (["schema.json", "0123.npy"], "skops"),
    (["export/saved_model.pb", "export/variables/variables.index"], "savedmodel-zip"),
    (["readme.txt"], None),
])
def test_zip_containers_are_told_apart_by_their_members(tmp_path: Path, names: list[str], kind: str | None) -> None:
    assert sniff_bytes(tmp_path, _zip(names)).kind == kind


def test_other_signatures(tmp_path: Path) -> None:
    assert sniff_bytes(tmp_path, b"\x89HDF\r\n\x1a\n" + b"\0" * 50).kind == "hdf5"
    assert sniff_bytes(tmp_path, b"\x1c\0\0\0TFL3" + b"\0" * 50).kind == "tflite"
    assert sniff_bytes(tmp_path, b"tree\nversion=v4\n").kind == "lightgbm-text"
    assert sniff_bytes(tmp_path, b'{"learner":{},"version":[2,1,0]}').kind == "xgboost-json"
    assert sniff_bytes(tmp_path, b"{L\x00\x00\x00\x00\x00\x00\x00\x07learner{").kind == "xgboost-ubj"
    header = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    data = len(header).to_bytes(8, "little") + header + b"\0\0\0\0"
    assert sniff_bytes(tmp_path, data).kind == "safetensors"
    legacy = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.\x80\x02M\xe9\x03."
    assert sniff_bytes(tmp_path, legacy) == Sniffed("torch-legacy", "pytorch")


def test_resolve_format_prefers_given_and_refuses_contradictions() -> None:
    assert resolve_format(None, Sniffed("pickle", "xgboost")) == "xgboost"
    assert resolve_format("sklearn", Sniffed("pickle", "xgboost")) == "sklearn"
    assert resolve_format(None, Sniffed("keras")) == "tensorflow"
    for given, sniffed in (("onnx", Sniffed("pickle", "sklearn")), ("xgboost", Sniffed("onnx")),
                           ("caffe", Sniffed("onnx")), (None, Sniffed(None)), ("pytorch", Sniffed(None))):
        with pytest.raises(BadRequest):
            resolve_format(given, sniffed)


@pytest.mark.parametrize("protocol", [0, 2, 3, 4, 5])
def test_pickle_classes_are_read_from_opcodes_of_any_protocol_and_a_truncated_prefix(
        protocol: int, tree: DecisionTreeClassifier) -> None:
    data = pickle.dumps({"a": tree, "b": tree.tree_}, protocol=protocol)
    classes = pickle_classes(data)
    assert "sklearn.tree._classes.DecisionTreeClassifier" in classes and "sklearn.tree._tree.Tree" in classes
    assert pickle_classes(data[: len(data) // 2])[0] == classes[0]  # a prefix ends the scan, never raises
    assert pickle_classes(b"not a pickle at all") == []


def test_a_pickle_whose_classes_contradict_format_is_refused_naming_both(tmp_path: Path,
                                                                         tree: DecisionTreeClassifier) -> None:
    sniffed = sniff_bytes(tmp_path, pickle.dumps(tree), "model.pt")
    assert sniffed.framework == "sklearn"
    with pytest.raises(BadRequest, match="says pytorch.*sklearn classes.*DecisionTreeClassifier"):
        resolve_format("pytorch", sniffed)
    assert resolve_format("sklearn", sniffed) == "sklearn"
    plain = sniff_bytes(tmp_path, pickle.dumps({"weights": np.zeros(3)}))  # no framework class: format decides
    assert plain.classes == () and resolve_format("pytorch", plain) == "pytorch"
