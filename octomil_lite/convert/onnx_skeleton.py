"""Walk an uploaded ONNX file's protobuf structure without touching its weight payloads (runs in the server).

The walk reads only tags and lengths through an mmap, so its cost grows with the number of fields, not with the
bytes of the weights. It refuses external-data references and raw_data too short for its dims and type, and
returns a *skeleton*: the same model with every large raw_data payload dropped and its tensor made 0-element,
which a sandboxed job then parses and runs `onnx.checker` on. Every other byte is copied verbatim, so the job's
protobuf parser and the checker see exactly the original structure. Only plain integer arithmetic runs on the
untrusted bytes here; anything this walker cannot vouch for is either refused or left to the job.
"""

from __future__ import annotations

import mmap
from pathlib import Path

MAX_DEPTH = 64  # nested messages (graphs inside attributes inside nodes ...); protobuf's own limit is 100
ELIDE_BYTES = 1024  # raw_data at least this long is dropped from the skeleton (its size is checked here)
MAX_SKELETON_BYTES = 32 * 1024**2  # past this the caller checks the whole file instead
# Every field costs the server ~2 us of Python: past this many the caller checks the whole file in a job instead.
MAX_FIELDS = 2_000_000

# message type -> {field number: message type} for the fields that can (transitively) hold a TensorProto
_CHILDREN: dict[str, dict[int, str]] = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "function": {7: "node", 11: "attribute"},
    "sparse": {1: "tensor", 2: "tensor"},
}
# TensorProto.data_type -> bytes per element, for the byte-aligned types (sub-byte ones are never elided)
_ELEMENT_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 14: 8, 15: 16,
                  16: 2, 17: 1, 18: 1, 19: 1, 20: 1, 24: 1}
_TENSOR_VALUE_FIELDS = {4, 5, 6, 7, 10, 11}  # float/int32/string/int64/double/uint64_data
_HUGE = 1 << 64  # more elements than any file holds
_RAW_DATA, _DIMS, _DATA_TYPE, _NAME, _EXTERNAL_DATA, _DATA_LOCATION = 9, 1, 2, 8, 13, 14


class MalformedOnnx(ValueError):
    """The file is not a well-formed ONNX protobuf, or breaks a rule checked here; the message says which."""


class SkeletonTooLarge(Exception):
    """The structure without its large payloads is still big (e.g. weights in float_data): check the whole file."""


def skeleton_of(path: Path) -> bytes:
    """The ONNX file at PATH without its large raw_data payloads; raises MalformedOnnx or SkeletonTooLarge."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size == 0:
            raise MalformedOnnx("the file is empty")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            walker = _Walker(data)
            out = walker.message("model", 0, size, 0)
            if out is None and size > MAX_SKELETON_BYTES:
                raise SkeletonTooLarge
            return out if out is not None else data[:]


def _varint(data: mmap.mmap, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end:
            raise MalformedOnnx("truncated: a number runs past the end of its message")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if value >= 1 << 64:
                raise MalformedOnnx("a number is larger than 64 bits")
            return value, pos
        shift += 7
        if shift >= 70:
            raise MalformedOnnx("a number is longer than 10 bytes")


def encode_varint(value: int) -> bytes:
    """VALUE as a protobuf varint (the tests and the bench build ONNX files with it too)."""
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


class _Walker:
    def __init__(self, data: mmap.mmap):
        self.data = data
        self.kept = 0  # bytes of the skeleton copied so far
        self.fields = 0  # fields and packed numbers read so far (MAX_FIELDS)

    def _count(self) -> None:
        self.fields += 1
        if self.fields > MAX_FIELDS:
            raise SkeletonTooLarge

    def _copy(self, start: int, end: int) -> bytes:
        self.kept += end - start
        if self.kept > MAX_SKELETON_BYTES:
            raise SkeletonTooLarge
        return self.data[start:end]

    def _fields(self, start: int, end: int):
        pos = start
        while pos < end:
            field_start = pos
            self._count()
            key, pos = _varint(self.data, pos, end)
            number, wire = key >> 3, key & 7
            if number == 0:
                raise MalformedOnnx("a field has number 0")
            if wire == 0:
                _, value_end = _varint(self.data, pos, end)
            elif wire == 1:
                value_end = pos + 8
            elif wire == 5:
                value_end = pos + 4
            elif wire == 2:
                length, pos = _varint(self.data, pos, end)
                value_end = pos + length
            else:
                raise MalformedOnnx(f"field {number} uses protobuf wire type {wire}, which ONNX never uses")
            if value_end > end:
                raise MalformedOnnx("truncated: a field runs past the end of its message (or of the file)")
            yield number, wire, field_start, pos, value_end
            pos = value_end

    def message(self, kind: str, start: int, end: int, depth: int) -> bytes | None:
        """The rewritten bytes of one message, or None when nothing in it changed."""
        if depth > MAX_DEPTH:
            raise MalformedOnnx(f"messages are nested more than {MAX_DEPTH} deep")
        if kind == "tensor":
            return self.tensor(start, end)
        children = _CHILDREN[kind]
        parts: list[bytes] = []
        changed = False
        copied_from = start
        for number, wire, field_start, value_start, value_end in self._fields(start, end):
            child = children.get(number) if wire == 2 else None
            if child is None:
                continue
            inner = self.message(child, value_start, value_end, depth + 1)
            if inner is None:
                continue
            changed = True
            parts.append(self._copy(copied_from, field_start))
            parts.append(encode_varint(number << 3 | 2) + encode_varint(len(inner)) + inner)
            copied_from = value_end
        if not changed:
            return None
        parts.append(self._copy(copied_from, end))
        return b"".join(parts)

    def tensor(self, start: int, end: int) -> bytes | None:
        # dims are not kept: their count, whether one is <= 0, and their product (capped: a product of many huge
        # dims costs quadratic time, and its decimal form overflows int->str conversion)
        ndims, count, nonpositive = 0, 1, False
        data_type = None
        name = b""
        raw: tuple[int, int, int] | None = None  # field start, value start, value end
        other_values = False
        for number, wire, field_start, value_start, value_end in self._fields(start, end):
            if number in (_EXTERNAL_DATA, _DATA_LOCATION):
                if number == _EXTERNAL_DATA or (wire == 0 and _varint(self.data, value_start, value_end)[0] != 0):
                    label = name.decode(errors="replace")[:100]
                    raise MalformedOnnx(f"tensor '{label}' references external data; upload a self-contained model")
            elif number == _DIMS and wire in (0, 2):  # one, or packed
                pos = value_start
                while pos < value_end:
                    self._count()
                    value, pos = _varint(self.data, pos, value_end)
                    ndims, nonpositive = ndims + 1, nonpositive or _signed(value) <= 0
                    count = min(count * value, _HUGE)
            elif number == _DATA_TYPE and wire == 0:
                data_type = _varint(self.data, value_start, value_end)[0]
            elif number == _NAME and wire == 2:
                name = self.data[value_start:min(value_end, value_start + 200)]
            elif number == _RAW_DATA and wire == 2:
                raw = (field_start, value_start, value_end)
            elif number in _TENSOR_VALUE_FIELDS:
                other_values = True
        if (raw is None or raw[2] - raw[1] < ELIDE_BYTES or other_values or data_type not in _ELEMENT_BYTES
                or not ndims or nonpositive):
            return None  # onnx.checker judges it in the job
        if count * _ELEMENT_BYTES[data_type] > raw[2] - raw[1]:
            label = name.decode(errors="replace")[:100]
            need = f"need {count * _ELEMENT_BYTES[data_type]}" if count < _HUGE else "need more than 2**64"
            raise MalformedOnnx(f"tensor '{label}' raw_data holds {raw[2] - raw[1]} bytes, but its dims and type "
                                f"{need}")
        # The skeleton keeps every field but the dims and the payload: a 0-element tensor of the same rank and type.
        kept = bytearray()
        for number, wire, field_start, _, value_end in self._fields(start, end):
            if number != _DIMS and not (number == _RAW_DATA and wire == 2):
                self.kept += value_end - field_start  # counted before copying: a huge doc_string stops here
                if self.kept > MAX_SKELETON_BYTES:
                    raise SkeletonTooLarge
                kept += self.data[field_start:value_end]
        self.kept += 2 * ndims
        if self.kept > MAX_SKELETON_BYTES:
            raise SkeletonTooLarge
        kept += (encode_varint(_DIMS << 3) + b"\x00") * ndims
        return bytes(kept)
