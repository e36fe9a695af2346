"""Recognise what an uploaded model file is from its first bytes (and a zip's directory), without running it."""

from __future__ import annotations

import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from .errors import BadRequest
from .schemas import UPLOAD_FORMATS


@dataclass(frozen=True)
class Kind:
    """One way a model is saved: its download extension, a name for people, the formats it can be."""

    ext: str
    label: str
    formats: tuple[str, ...]


KINDS: dict[str, Kind] = {
    "onnx": Kind(".onnx", "an ONNX model", ("onnx",)),
    "pickle": Kind(".pkl", "a Python pickle", ("sklearn", "xgboost", "lightgbm", "pytorch")),
    "joblib": Kind(".joblib", "a compressed joblib pickle", ("sklearn", "xgboost", "lightgbm")),
    "skops": Kind(".skops", "a skops archive", ("sklearn",)),
    "torch-zip": Kind(".pt", "a torch.save archive", ("pytorch",)),
    "torch-legacy": Kind(".pt", "a legacy torch.save file", ("pytorch",)),
    "torchscript": Kind(".pt", "a TorchScript archive", ("pytorch",)),
    "torch-export": Kind(".pt2", "a torch.export program", ("pytorch",)),
    "safetensors": Kind(".safetensors", "a safetensors weights file", ("pytorch",)),
    "keras": Kind(".keras", "a Keras archive", ("tensorflow",)),
    "hdf5": Kind(".h5", "an HDF5 (Keras) file", ("tensorflow",)),
    "savedmodel-zip": Kind(".zip", "a zipped TensorFlow SavedModel", ("tensorflow",)),
    "tflite": Kind(".tflite", "a TFLite flatbuffer", ("tensorflow",)),
    "xgboost-json": Kind(".json", "an XGBoost JSON model", ("xgboost",)),
    "xgboost-ubj": Kind(".ubj", "an XGBoost UBJSON model", ("xgboost",)),
    "lightgbm-text": Kind(".txt", "a LightGBM text model", ("lightgbm",)),
    "numpy-npz": Kind(".npz", "a NumPy .npz archive of weights", ("numpy",)),
}

_PICKLE_FRAMEWORKS = ((b"sklearn", "sklearn"), (b"xgboost", "xgboost"), (b"lightgbm", "lightgbm"),
                      (b"torch", "pytorch"))
_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."
_ONNX_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}
_MAX_ZIP_DIRECTORY = 16 * 1024 * 1024


@dataclass(frozen=True)
class Sniffed:
    """What the bytes look like: a kind (or None) and, for pickles, the framework they name."""

    kind: str | None
    framework: str | None = None


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7


def looks_like_onnx(head: bytes, size: int) -> bool:
    """Walk the top-level protobuf fields of a ModelProto as far as the head reaches."""
    pos, seen = 0, set()
    try:
        while pos < min(len(head), size):
            tag, pos = _varint(head, pos)
            field, wire = tag >> 3, tag & 7
            if _ONNX_FIELDS.get(field) != wire:
                return False
            seen.add(field)
            if wire == 0:
                _, pos = _varint(head, pos)
            else:
                length, pos = _varint(head, pos)
                pos += length
                if pos > size:
                    return False
    except ValueError:
        return False
    return bool(seen & {1, 7}) and (pos == size or pos >= len(head))


def _pickle_framework(data: bytes) -> str | None:
    found = [(data.find(needle), name) for needle, name in _PICKLE_FRAMEWORKS if needle in data]
    return min(found)[1] if found else None


def _zip_names(path: Path) -> list[str] | None:
    """The member names of a zip, or None if its directory is missing or too large to list safely."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - 66 * 1024))
        tail = f.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < 22:
        return None
    directory_size = struct.unpack_from("<I", tail, at + 12)[0]
    if directory_size > _MAX_ZIP_DIRECTORY:
        return None
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return None


def _zip_kind(path: Path, filename: str) -> str | None:
    names = _zip_names(path)
    if names is None:
        return None
    base = {n.rsplit("/", 1)[-1] for n in names}
    top = set(names)
    if "archive_format" in base or filename.endswith(".pt2"):
        return "torch-export" if "data.pkl" in base or "archive_format" in base else None
    if "constants.pkl" in base or any("/code/" in n for n in names):
        return "torchscript"
    if "data.pkl" in base:
        return "torch-zip"
    if "schema.json" in top:
        return "skops"
    if {"config.json", "metadata.json"} <= top:
        return "keras"
    if "saved_model.pb" in base or "saved_model.pbtxt" in base:
        return "savedmodel-zip"
    if names and all(n.endswith(".npy") for n in names):
        return "numpy-npz"
    return None


def sniff(head: bytes, path: Path, size: int, filename: str) -> Sniffed:
    """Recognise a model file from its first bytes; a zip is recognised by its member names."""
    name = filename.lower()
    ext = os.path.splitext(name)[1]
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return Sniffed(_zip_kind(path, name))
    if head.startswith(_TORCH_LEGACY_MAGIC):
        return Sniffed("torch-legacy", "pytorch")
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        framework = _pickle_framework(head) or ("pytorch" if ext in (".pt", ".pth") else "sklearn")
        return Sniffed("pickle", framework)
    if head.startswith((b"\x78\x01", b"\x78\x5e", b"\x78\x9c", b"\x78\xda", b"\x1f\x8b")):
        try:
            inflated = zlib.decompressobj(zlib.MAX_WBITS | 32).decompress(head, 64 * 1024)
        except zlib.error:
            inflated = b""
        if inflated[:1] == b"\x80":
            return Sniffed("joblib", _pickle_framework(inflated) or "sklearn")
        return Sniffed(None)
    if head.startswith((b"BZh", b"\xfd7zXZ\x00", b"\x04\x22\x4d\x18")) and ext == ".joblib":
        return Sniffed("joblib", "sklearn")
    if any(head[o : o + 8] == b"\x89HDF\r\n\x1a\n" for o in (0, 512, 1024, 2048)):
        return Sniffed("hdf5")
    if head[4:8] == b"TFL3":
        return Sniffed("tflite")
    if head.startswith(b"tree\n") and b"version=v" in head[:64]:
        return Sniffed("lightgbm-text")
    stripped = head.lstrip()
    if stripped.startswith(b"{") and b'"learner"' in stripped[:4096]:
        return Sniffed("xgboost-json")
    if head.startswith(b"{") and head[1:2] in b"LiUlI" and b"learner" in head[:64]:
        return Sniffed("xgboost-ubj")
    if len(head) >= 10 and head[8:10] == b'{"':
        header_len = struct.unpack_from("<Q", head)[0]
        if 2 <= header_len <= size - 8:
            return Sniffed("safetensors")
    if looks_like_onnx(head, size):
        return Sniffed("onnx")
    return Sniffed(None)


def resolve_format(given: str | None, sniffed: Sniffed) -> str:
    """The version's format: the one given if the bytes agree, else the one the bytes show."""
    if given is not None and given not in UPLOAD_FORMATS:
        raise BadRequest(f"Field 'format' must be one of {', '.join(UPLOAD_FORMATS)}; got '{given}'.")
    if sniffed.kind is None:
        if given is None:
            raise BadRequest("Could not tell the model format from the file; pass the 'format' field "
                             f"({', '.join(UPLOAD_FORMATS)}).")
        raise BadRequest(f"The file does not look like a {given} model: its content matches no {given} "
                         "file layout this registry knows.")
    kind = KINDS[sniffed.kind]
    if given is None:
        return sniffed.framework if sniffed.framework in kind.formats else kind.formats[0]
    if given not in kind.formats:
        raise BadRequest(f"Field 'format' says {given}, but the file's content is {kind.label} "
                         f"({' or '.join(kind.formats)}).")
    return given
