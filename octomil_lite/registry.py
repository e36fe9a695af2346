"""The registry's domain operations: no HTTP here, only OctomilError subclasses."""

from __future__ import annotations

import asyncio
import hmac
import re
import sqlite3
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from . import auth, formats
from .blobstore import BlobStore, StagedBlob
from .config import Config
from .db import Database, Row
from .errors import BadRequest, Conflict, NotFound, OctomilError
from .sandbox import Limits, SandboxError, run_task
from .schemas import (
    DOWNLOAD_FORMATS,
    CreateModel,
    Model,
    ModelDetail,
    ModelList,
    UploadedVersion,
    UploadForm,
    VersionSummary,
)

_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ONNX_CHECK_LIMITS = Limits(timeout=300.0, memory_bytes=8 * 1024**3, cpu_seconds=300)


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Artifact:
    """Bytes ready to serve: which blob, how large, and the file name a client should save it as."""

    digest: str
    size: int
    filename: str

    @property
    def hash(self) -> str:
        return f"sha256:{self.digest}"


@dataclass(frozen=True)
class KeyInfo:
    name: str
    scope: str


def _model_id(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise NotFound(f"No model with id '{value[:100]}'.") from None


class Registry:
    """Models, versions, blobs and keys of one data directory."""

    def __init__(self, config: Config, db: Database, blobs: BlobStore):
        self.config = config
        self.db = db
        self.blobs = blobs

    @classmethod
    async def open(cls, config: Config) -> Registry:
        config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        blobs = BlobStore(config.data_dir)
        blobs.sweep_tmp()
        db = await Database.open(config.data_dir / "registry.sqlite3")
        return cls(config, db, blobs)

    async def close(self) -> None:
        await self.db.close()

    # models

    def _model(self, row: Row) -> Model:
        digest = row["digest"]
        return Model(
            id=row["id"], round_id=row["round_id"],
            model_path=self.blobs.uri(digest) if digest else None,
            model_size_bytes=row["size"], model_hash=f"sha256:{digest}" if digest else None,
            framework=row["framework"], framework_version=row["framework_version"],
            accuracy=row["accuracy"], loss=row["loss"], is_baseline=bool(row["is_baseline"]),
            description=row["description"], created_at=row["created_at"],
        )

    async def _model_row(self, model_id: str) -> Row:
        row = await self.db.get_model(_model_id(model_id))
        if row is None:
            raise NotFound(f"No model with id '{model_id}'.")
        return row

    async def create_model(self, req: CreateModel) -> Model:
        row = {
            "id": str(uuid.uuid4()), "framework": req.framework, "framework_version": req.framework_version,
            "description": req.description, "is_baseline": int(bool(req.is_baseline)), "created_at": utc_now(),
        }
        await self.db.insert_model(row)
        return self._model({**row, "round_id": None, "accuracy": None, "loss": None, "digest": None, "size": None})

    async def list_models(self, limit: int, offset: int, framework: str | None, is_baseline: bool | None) -> ModelList:
        rows, total = await self.db.list_models(limit, offset, framework, is_baseline)
        return ModelList(models=[self._model(r) for r in rows], total=total, limit=limit, offset=offset)

    async def get_model(self, model_id: str) -> ModelDetail:
        row = await self._model_row(model_id)
        versions = await self.db.list_versions(row["seq"])
        model = self._model(row)
        return ModelDetail(
            **{f: getattr(model, f) for f in model.__struct_fields__},
            versions=[VersionSummary(version=v["number"], format=v["format"], model_size_bytes=v["size"],
                                     model_hash=f"sha256:{v['digest']}", description=v["description"],
                                     uploaded_at=v["uploaded_at"]) for v in versions],
        )

    # versions

    async def require_model(self, model_id: str) -> None:
        """Fail fast (before an upload body is read) when the model does not exist."""
        await self._model_row(model_id)

    def stage_upload(self) -> StagedBlob:
        return self.blobs.stage()

    async def upload_version(self, model_id: str, staged: StagedBlob, filename: str, form: UploadForm) -> UploadedVersion:
        """Turn finished, staged bytes into the model's next version (the caller discards `staged` on error)."""
        row = await self._model_row(model_id)
        if form.description is not None and len(form.description) > 1000:
            raise BadRequest("Field 'description' must be at most 1000 characters.")
        if staged.size == 0:
            raise BadRequest("The uploaded file is empty.")
        sniffed = await asyncio.to_thread(formats.sniff, staged.head, staged.path, staged.size, filename)
        fmt = formats.resolve_format(form.format, sniffed)
        assert sniffed.kind is not None
        if sniffed.kind == "onnx":
            await self._check_onnx(staged)
        digest = await self.blobs.commit(staged)
        uploaded_at = utc_now()
        number = await self.db.insert_version(row["seq"], {
            "format": fmt, "kind": sniffed.kind, "digest": digest, "size": staged.size,
            "description": form.description, "uploaded_at": uploaded_at,
        })
        if number is None:
            raise NotFound(f"Model '{model_id}' was deleted during the upload.")
        return UploadedVersion(model_id=row["id"], version=number, format=fmt, model_path=self.blobs.uri(digest),
                               model_size_bytes=staged.size, model_hash=f"sha256:{digest}",
                               description=form.description, uploaded_at=uploaded_at)

    async def _check_onnx(self, staged: StagedBlob) -> dict[str, Any]:
        try:
            result = await run_task("check-onnx", {"path": str(staged.path)}, ONNX_CHECK_LIMITS, self.blobs.tmp)
        except SandboxError as exc:
            raise BadRequest(f"The ONNX model could not be checked: {exc}.") from exc
        if not result.get("ok"):
            raise BadRequest(f"The file is not a valid ONNX model: {result.get('reason')}.")
        return result

    async def find_artifact(self, model_id: str, version: str, fmt: str | None) -> Artifact:
        """The bytes to serve for (model, version, format), or a NotFound saying why."""
        fmt = fmt or "original"
        if fmt not in DOWNLOAD_FORMATS:
            raise BadRequest(f"Query parameter 'format' must be one of {', '.join(DOWNLOAD_FORMATS)}; got '{fmt[:50]}'.")
        row = await self._model_row(model_id)
        number = int(version) if version.isdigit() and len(version) < 10 else None
        found = await self.db.get_version(row["seq"], number) if number else None
        if found is None:
            raise NotFound(f"Model '{row['id']}' has no version '{version[:50]}'.")
        kind = formats.KINDS[found["kind"]]
        if fmt in ("original", found["format"]) or (fmt == "onnx" and found["kind"] == "onnx"):
            return Artifact(found["digest"], found["size"], f"model_v{number}{kind.ext}")
        raise NotFound(f"Version {number} is not available as {fmt}: conversion to {fmt} is not supported yet.")

    def open_artifact(self, artifact: Artifact) -> int:
        """A read-only descriptor on the artifact's blob."""
        try:
            return self.blobs.open(artifact.digest)
        except OSError as exc:
            raise OctomilError(f"The stored bytes of {artifact.filename} are missing or unreadable ({exc.strerror}); "
                               "run 'octomil-lite verify'.") from None

    # api keys

    async def create_key(self, name: str, scope: str) -> str:
        if not _KEY_NAME.fullmatch(name):
            raise BadRequest("A key name is 1-64 characters: letters, digits, '.', '_' or '-'.")
        if scope not in auth.SCOPES:
            raise BadRequest(f"A key's scope is one of {', '.join(auth.SCOPES)}.")
        key = auth.new_key()
        try:
            await self.db.insert_key({"name": name, "key_hash": auth.hash_key(key), "prefix": key[:8],
                                      "scope": scope, "created_at": utc_now()})
        except sqlite3.IntegrityError:
            raise Conflict(f"An active key named '{name}' already exists; revoke it or pick another name.") from None
        return key

    async def list_keys(self) -> list[Row]:
        return await self.db.list_keys()

    async def revoke_key(self, name: str) -> None:
        if not await self.db.revoke_key(name, utc_now()):
            raise NotFound(f"No active key named '{name}'.")

    async def has_keys(self) -> bool:
        return await self.db.count_active_keys() > 0

    async def authenticate(self, key: str) -> KeyInfo | None:
        if not key.startswith(auth.KEY_PREFIX) or len(key) > 128:
            return None
        digest = auth.hash_key(key)
        row = await self.db.find_key(digest)
        if row is None or not hmac.compare_digest(row["key_hash"], digest):
            return None
        return KeyInfo(row["name"], row["scope"])
