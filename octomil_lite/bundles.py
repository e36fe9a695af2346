"""Bundles: a tar file moving models, their versions and artifacts between registries.

Format (version 1), an uncompressed POSIX tar (pax headers only where sizes need them):

    manifest.json              always the first member: Manifest below, UTF-8 JSON
    blobs/sha256/<64 hex>      one member per distinct file, named by its own sha256, never by user input

The manifest lists every file with its sha256 and size; versions and artifacts name their bytes by sha256.
An importer reads the manifest, then streams each blob member into the store's temp area, hashing it; nothing
becomes visible until every member listed has arrived with the right size and hash.
"""

from __future__ import annotations

import os
import re
import tarfile
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, BinaryIO, Literal

import msgspec

from . import __version__, formats
from .errors import BadRequest
from .schemas import UPLOAD_FORMATS
from .storage import BlobStore, Row, StagedBlob

FORMAT = "octomil-lite-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
BLOB_PREFIX = "blobs/sha256/"
MAX_MANIFEST_BYTES = 64 * 1024**2
CHUNK_BYTES = 1024 * 1024
BLOCK = tarfile.BLOCKSIZE

_BLOB_MEMBER = re.compile(r"blobs/sha256/([0-9a-f]{64})")
ARTIFACT_FORMATS = ("onnx", "tflite", "coreml")

Digest = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]
Size = Annotated[int, msgspec.Meta(ge=0, lt=2**62)]
Text = Annotated[str, msgspec.Meta(max_length=1000)]
Short = Annotated[str, msgspec.Meta(max_length=200)]


class File(msgspec.Struct, kw_only=True):
    sha256: Digest
    size: Size


class Artifact(File, kw_only=True):
    format: Literal["onnx", "tflite", "coreml"]
    converter: Short | None = None
    parity: dict[str, Any] | None = None
    signature: dict[str, Any] | None = None
    updated_at: Short


class Version(File, kw_only=True):
    number: Annotated[int, msgspec.Meta(ge=1, lt=2**31)]
    label: Annotated[str, msgspec.Meta(min_length=1, max_length=100)] | None = None
    format: Literal[UPLOAD_FORMATS]  # type: ignore[valid-type]
    kind: Short
    description: Text | None = None
    round_id: Short | None = None
    accuracy: float | None = None
    loss: float | None = None
    input_shape: list[Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]] | None = None
    uploaded_at: Short
    artifacts: list[Artifact] = []


class Model(msgspec.Struct, kw_only=True):
    id: Short
    name: Short | None = None
    use_case: Short | None = None
    framework: Short | None = None
    framework_version: Short | None = None
    description: Text | None = None
    is_baseline: bool = False
    round_id: Short | None = None
    accuracy: float | None = None
    loss: float | None = None
    created_at: Short
    versions: list[Version] = []


class Manifest(msgspec.Struct, kw_only=True):
    format: Literal["octomil-lite-bundle"]
    format_version: int
    created_at: str = ""
    octomil_lite_version: str = ""
    models: list[Model]
    files: list[File]


class BundleError(BadRequest):
    """A bundle that is not well-formed, is truncated, or whose bytes do not match its manifest."""


# writing


@dataclass(frozen=True)
class ExportPlan:
    """Everything to write, known before the first byte: the manifest and the (digest, size) of each blob."""

    manifest: bytes
    files: list[tuple[str, int]]
    mtime: int
    model_ids: list[str]

    def _header(self, name: str, size: int) -> bytes:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime, info.type = size, 0o444, self.mtime, tarfile.REGTYPE
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "strict")

    def length(self) -> int:
        """The exact size of the tar, so HTTP can send a Content-Length (a cut-off download is then detectable)."""
        total = len(self._header(MANIFEST, len(self.manifest))) + _padded(len(self.manifest))
        for digest, size in self.files:
            total += len(self._header(BLOB_PREFIX + digest, size)) + _padded(size)
        return total + 2 * BLOCK

    def chunks(self, open_blob: Callable[[str], int]) -> Iterator[bytes]:
        """The tar, piece by piece: blob bytes read from the store in 1 MiB chunks, never gathered in memory."""
        yield self._header(MANIFEST, len(self.manifest)) + self.manifest + _padding(len(self.manifest))
        for digest, size in self.files:
            yield self._header(BLOB_PREFIX + digest, size)
            fd = open_blob(digest)
            try:
                offset = 0
                while offset < size:
                    data = os.pread(fd, min(CHUNK_BYTES, size - offset), offset)
                    if not data:
                        raise OSError(f"blob {digest} is shorter than its recorded {size} bytes; run verify")
                    offset += len(data)
                    yield data
            finally:
                os.close(fd)
            yield _padding(size)
        yield b"\0" * (2 * BLOCK)


def _padded(size: int) -> int:
    return size + (-size % BLOCK)


def _padding(size: int) -> bytes:
    return b"\0" * (-size % BLOCK)


def _loads(text: str | None) -> Any:
    return msgspec.json.decode(text) if text else None


def artifact_formats(value: str | None) -> list[str]:
    """The artifact formats named in a comma-separated list (None: all); 'original' is always carried."""
    if not value:
        return list(ARTIFACT_FORMATS)
    wanted = [part.strip().lower() for part in value.split(",") if part.strip()]
    if unknown := [f for f in wanted if f not in ("original", *ARTIFACT_FORMATS)]:
        raise BadRequest(f"A bundle's formats are original, {', '.join(ARTIFACT_FORMATS)}; not '{unknown[0][:50]}'.")
    return [f for f in ARTIFACT_FORMATS if f in wanted]


def plan_export(models: list[Row], versions: list[Row], artifacts: list[Row]) -> ExportPlan:
    """The manifest for rows read by MetadataStore.bundle_rows (artifacts already filtered to the formats wanted)."""
    by_version: dict[int, list[Artifact]] = {}
    files: dict[str, int] = {}
    for a in artifacts:
        by_version.setdefault(a["version_seq"], []).append(Artifact(
            format=a["format"], sha256=a["digest"], size=a["size"], converter=a["converter"],
            parity=_loads(a["parity"]), signature=_loads(a["signature"]), updated_at=a["updated_at"]))
    by_model: dict[int, list[Version]] = {}
    for v in versions:
        files.setdefault(v["digest"], v["size"])
        by_model.setdefault(v["model_seq"], []).append(Version(
            number=v["number"], label=v["label"], format=v["format"], kind=v["kind"], sha256=v["digest"],
            size=v["size"], description=v["description"], round_id=v["round_id"], accuracy=v["accuracy"],
            loss=v["loss"], input_shape=_loads(v["input_shape"]), uploaded_at=v["uploaded_at"],
            artifacts=by_version.get(v["seq"], [])))
    for a in artifacts:
        files.setdefault(a["digest"], a["size"])
    entries = [Model(id=m["id"], name=m["name"], use_case=m["use_case"], framework=m["framework"],
                     framework_version=m["framework_version"], description=m["description"],
                     is_baseline=bool(m["is_baseline"]), round_id=m["round_id"], accuracy=m["accuracy"],
                     loss=m["loss"], created_at=m["created_at"], versions=by_model.get(m["seq"], []))
               for m in models]
    now = int(time.time())
    manifest = Manifest(format=FORMAT, format_version=FORMAT_VERSION,
                        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
                        octomil_lite_version=__version__, models=entries,
                        files=[File(sha256=d, size=s) for d, s in files.items()])
    return ExportPlan(msgspec.json.encode(manifest), list(files.items()), now, [m.id for m in entries])


# reading


def _check(manifest: Manifest) -> None:
    """What the types cannot say: ids, unique numbers and labels, known kinds, every file listed once."""
    if manifest.format_version != FORMAT_VERSION:
        raise BundleError(f"This bundle has format version {manifest.format_version}; this octomil-lite reads "
                          f"version {FORMAT_VERSION}.")
    sizes: dict[str, int] = {}
    for f in manifest.files:
        if f.sha256 in sizes:
            raise BundleError(f"The manifest lists file {f.sha256} twice.")
        sizes[f.sha256] = f.size
    used: set[str] = set()
    ids: set[str] = set()
    names = [m.name for m in manifest.models if m.name is not None]
    if len(set(names)) != len(names):
        raise BundleError("The manifest lists two models with the same name.")
    for m in manifest.models:
        try:
            canonical = str(uuid.UUID(m.id))
        except ValueError:
            canonical = ""
        if canonical != m.id:
            raise BundleError(f"Model id '{m.id[:100]}' in the manifest is not a lower-case UUID.")
        if m.id in ids:
            raise BundleError(f"The manifest lists model {m.id} twice.")
        ids.add(m.id)
        numbers: set[int] = set()
        labels: set[str] = set()
        for v in m.versions:
            where = f"model {m.id} version {v.number}"
            if v.number in numbers:
                raise BundleError(f"The manifest lists {where} twice.")
            numbers.add(v.number)
            if v.label is not None:
                if v.label in labels or v.label.isdigit() or v.label == "latest" or "/" in v.label:
                    raise BundleError(f"{where} has a label ('{v.label[:50]}') that is repeated or not a label.")
                labels.add(v.label)
            if v.kind not in formats.KINDS or v.format not in formats.KINDS[v.kind].formats:
                raise BundleError(f"{where} is a {v.format} model of unknown kind '{v.kind[:50]}'.")
            if len({a.format for a in v.artifacts}) != len(v.artifacts):
                raise BundleError(f"{where} lists an artifact format twice.")
            for item in (v, *v.artifacts):
                if sizes.get(item.sha256) != item.size:
                    raise BundleError(f"{where} names file {item.sha256}, which the manifest's files list does "
                                      "not hold with that size.")
                used.add(item.sha256)
    if unused := set(sizes) - used:
        raise BundleError(f"The manifest lists file {min(unused)}, which no version uses.")


def manifest_rows(manifest: Manifest) -> list[Row]:
    """Models as rows for Database.import_models: each with its 'versions', each with its 'artifacts'."""
    return [{
        "id": m.id, "name": m.name, "use_case": m.use_case, "framework": m.framework,
        "framework_version": m.framework_version, "description": m.description, "is_baseline": int(m.is_baseline),
        "round_id": m.round_id, "accuracy": m.accuracy, "loss": m.loss, "created_at": m.created_at,
        "versions": [{
            "number": v.number, "label": v.label, "format": v.format, "kind": v.kind, "digest": v.sha256,
            "size": v.size, "description": v.description, "round_id": v.round_id, "accuracy": v.accuracy,
            "loss": v.loss, "input_shape": msgspec.json.encode(v.input_shape).decode() if v.input_shape else None,
            "uploaded_at": v.uploaded_at,
            "artifacts": [{
                "format": a.format, "status": "ready", "digest": a.sha256, "size": a.size,
                "parity": msgspec.json.encode(a.parity).decode() if a.parity is not None else None,
                "signature": msgspec.json.encode(a.signature).decode() if a.signature is not None else None,
                "converter": a.converter, "updated_at": a.updated_at} for a in v.artifacts],
        } for v in m.versions],
    } for m in manifest.models]


_READ_ERRORS = (tarfile.TarError, EOFError, zlib.error)


class BundleReader:
    """Reads a bundle front to back from a stream (no seeking): the manifest, then every blob it lists.

    Synchronous (run it in a thread); member names are only ever matched, never used as paths.
    """

    def __init__(self, source: BinaryIO):
        try:
            self._tar = tarfile.open(fileobj=source, mode="r|*")  # noqa: SIM115 - read member by member, later
        except _READ_ERRORS:
            raise BundleError("The bundle is not a tar file (or it is empty).") from None

    def _next(self, after: str) -> tarfile.TarInfo | None:
        try:
            return self._tar.next()
        except _READ_ERRORS as exc:
            raise BundleError(f"The bundle is damaged or truncated after member '{after}' ({exc}).") from None

    def read_manifest(self) -> Manifest:
        member = self._next("(start)")
        if member is None or member.name != MANIFEST or not member.isreg():
            raise BundleError(f"The bundle's first member must be {MANIFEST}.")
        if member.size > MAX_MANIFEST_BYTES:
            raise BundleError(f"The bundle's {MANIFEST} is larger than {MAX_MANIFEST_BYTES // 1024**2} MiB.")
        reader = self._tar.extractfile(member)
        assert reader is not None
        try:
            data = reader.read()
        except _READ_ERRORS:
            raise BundleError(f"The bundle is truncated inside member '{MANIFEST}'.") from None
        try:
            manifest = msgspec.json.decode(data, type=Manifest, strict=True)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise BundleError(f"The bundle's {MANIFEST} is not valid: {exc}.") from None
        _check(manifest)
        return manifest

    def receive_files(self, manifest: Manifest, blobs: BlobStore) -> list[StagedBlob]:
        """Stage every file the manifest lists, each checked against its size and sha256; all or nothing."""
        expected = {f.sha256: f.size for f in manifest.files}
        staged: list[StagedBlob] = []
        try:
            last = MANIFEST
            while (member := self._next(last)) is not None:
                name = member.name
                match = _BLOB_MEMBER.fullmatch(name)
                if not match or not member.isreg():
                    raise BundleError(f"The bundle holds an unexpected member '{name[:200]}'; only {MANIFEST} and "
                                      f"{BLOB_PREFIX}<sha256> files belong in one.")
                digest = match[1]
                if digest not in expected:
                    raise BundleError(f"Member '{name}' is not in the manifest, or appears twice.")
                size = expected.pop(digest)
                if member.size != size:
                    raise BundleError(f"Member '{name}' has {member.size} bytes; the manifest says {size}.")
                source = self._tar.extractfile(member)
                assert source is not None
                try:
                    blob = blobs.receive(source, size)
                except _READ_ERRORS:
                    raise BundleError(f"The bundle is truncated inside member '{name}'.") from None
                staged.append(blob)
                if blob.digest != digest:
                    raise BundleError(f"Member '{name}' is damaged or was tampered with: its bytes hash to "
                                      f"{blob.digest}.")
                last = name
            if expected:
                raise BundleError(f"The bundle is truncated: member '{BLOB_PREFIX}{min(expected)}' "
                                  f"(and {len(expected) - 1} more) listed in the manifest is missing.")
        except BaseException:
            for blob in staged:
                blob.path.unlink(missing_ok=True)
            raise
        return staged
