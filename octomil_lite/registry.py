"""The registry's domain operations: no HTTP here, only OctomilError subclasses."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import re
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from . import auth, formats, storage
from .config import Config
from .convert.pool import TARGETS, ConversionPool
from .convert.sandbox import CHECK_LIMITS, IsolationUnavailable, JobFiles, Limits, Sandbox, SandboxError
from .errors import BadRequest, Conflict, Forbidden, NotFound, OctomilError, ServiceUnavailable
from .schemas import (
    DOWNLOAD_FORMATS,
    CreateModel,
    FormatStatus,
    Model,
    ModelDetail,
    ModelList,
    UpdateModel,
    UploadedVersion,
    UploadForm,
    VersionDetail,
    VersionSummary,
)
from .storage import BlobStore, MetadataStore, Row, StagedBlob

_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
PENDING_RETRY_AFTER = 2
LINK_CLOCK_SLACK = 60  # seconds a link's expiry may exceed the limit (clock steps between signing and use)


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


@dataclass
class UploadedFile:
    """One file part of an upload: its staged bytes and the file name the client gave."""

    staged: StagedBlob
    filename: str


@dataclass(frozen=True)
class KeyInfo:
    name: str
    scope: str


def _download_format(fmt: str | None) -> str:
    if fmt is None:
        return "original"
    if fmt not in DOWNLOAD_FORMATS:
        raise BadRequest(f"Query parameter 'format' must be one of {', '.join(DOWNLOAD_FORMATS)}; got '{fmt[:50]}'.")
    return fmt


def _canonical_uuid(value: str) -> str | None:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None


def _summary(v: Row) -> VersionSummary:
    return VersionSummary(version=v["number"], label=v["label"], format=v["format"], model_size_bytes=v["size"],
                          model_hash=f"sha256:{v['digest']}", description=v["description"], round_id=v["round_id"],
                          accuracy=v["accuracy"], loss=v["loss"], uploaded_at=v["uploaded_at"])


def _format_status(a: Row) -> FormatStatus:
    return FormatStatus(status=a["status"], reason=a["reason"], model_size_bytes=a["size"],
                        model_hash=f"sha256:{a['digest']}" if a["digest"] else None,
                        parity=json.loads(a["parity"]) if a["parity"] else None,
                        signature=json.loads(a["signature"]) if a["signature"] else None,
                        converter=a["converter"], updated_at=a["updated_at"])


class Registry:
    """Models, versions, blobs, conversions and keys of one data directory."""

    def __init__(self, config: Config, db: MetadataStore, blobs: BlobStore, secret: auth.LinkSecret):
        self.config = config
        self.db = db
        self.blobs = blobs
        self._secret = secret
        self.sandbox = Sandbox(hidden=[config.data_dir], allow_unsafe=config.unsafe_conversions)
        limits = Limits(timeout=config.conversion_timeout, memory_bytes=config.conversion_memory_bytes)
        self.pool = ConversionPool(db, blobs, self.sandbox, limits, config.conversion_workers, utc_now)

    @classmethod
    async def open(cls, config: Config) -> Registry:
        config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        db, blobs = await storage.open_stores(config.data_dir)
        secret = auth.LinkSecret(config.data_dir / "secret.key")
        secret.current()  # made at first open, so it exists before any link does
        return cls(config, db, blobs, secret)

    async def start(self) -> None:
        """Serving: sweep leftovers of a previous run and start converting."""
        self.blobs.sweep_tmp()
        await asyncio.to_thread(self.sandbox.probe)
        await self.pool.start()

    async def close(self) -> None:
        await self.pool.stop()
        await self.db.close()

    # models

    def _model(self, row: Row) -> Model:
        digest = row["digest"]
        return Model(
            id=row["id"], name=row["name"], use_case=row["use_case"], round_id=row["round_id"],
            model_path=self.blobs.uri(digest) if digest else None,
            model_size_bytes=row["size"], model_hash=f"sha256:{digest}" if digest else None,
            framework=row["framework"], framework_version=row["framework_version"],
            accuracy=row["accuracy"], loss=row["loss"], is_baseline=bool(row["is_baseline"]),
            description=row["description"], created_at=row["created_at"],
        )

    async def _model_row(self, ref: str) -> Row:
        """A model by its id or (Octomil SDK style) its unique name."""
        model_id = _canonical_uuid(ref)
        row = None
        if model_id is not None:
            row = await self.db.get_model(model_id)
        elif len(ref) <= 200:
            row = await self.db.get_model(name=ref)
        if row is None:
            raise NotFound(f"No model with id or name '{ref[:100]}'.")
        return row

    async def create_model(self, req: CreateModel) -> tuple[Model, bool]:
        """Create a model; one with the same name and no contradicting field is returned instead (created False)."""
        if req.name is not None and (existing := await self.db.get_model(name=req.name)):
            clashes = [f for f in ("framework", "use_case") if getattr(req, f) not in (None, existing[f])]
            if clashes:
                raise Conflict(f"A model named '{req.name}' already exists with a different {clashes[0]}; "
                               "names are unique.")
            return self._model(existing), False
        row = {f: getattr(req, f) for f in req.__struct_fields__}
        row.update(id=str(uuid.uuid4()), is_baseline=int(bool(req.is_baseline)), created_at=utc_now())
        try:
            await self.db.insert_model(row)
        except storage.Conflict:
            raise Conflict(f"A model named '{req.name}' was created at the same moment; retry.") from None
        return self._model({**row, "digest": None, "size": None}), True

    async def update_model(self, model_id: str, req: UpdateModel) -> Model:
        row = await self._model_row(model_id)
        fields = {f: getattr(req, f) for f in req.__struct_fields__ if getattr(req, f) is not msgspec.UNSET}
        if "is_baseline" in fields:
            fields["is_baseline"] = int(fields["is_baseline"])
        try:
            await self.db.update_model(row["seq"], fields)
        except storage.Conflict:
            raise Conflict(f"A model named '{fields.get('name')}' already exists; names are unique.") from None
        return self._model({**row, **fields})

    async def delete_model(self, model_id: str) -> None:
        row = await self._model_row(model_id)
        if not await self.db.delete_model(row["seq"]):
            raise NotFound(f"No model with id '{model_id}'.")

    async def list_models(self, limit: int, offset: int, **filters: str | bool | None) -> ModelList:
        """A page of models, newest first; filters (framework, is_baseline, name, use_case) that are None match all."""
        given = {column: value for column, value in filters.items() if value is not None}
        rows, total = await self.db.list_models(limit, offset, given)
        return ModelList(models=[self._model(r) for r in rows], total=total, limit=limit, offset=offset)

    async def get_model(self, model_id: str) -> ModelDetail:
        row = await self._model_row(model_id)
        versions = await self.db.list_versions(row["seq"])
        model = self._model(row)
        return ModelDetail(**{f: getattr(model, f) for f in model.__struct_fields__},
                           versions=[_summary(v) for v in versions])

    # versions

    async def require_model(self, model_id: str) -> None:
        """Fail fast (before an upload body is read) when the model does not exist."""
        await self._model_row(model_id)

    def stage_upload(self) -> StagedBlob:
        return self.blobs.stage()

    async def upload_version(self, model_id: str, files: dict[str, UploadedFile], form: UploadForm,
                             uploader: str | None = None) -> UploadedVersion:
        """Turn staged bytes into the model's next version (the caller discards them); UPLOADER is the key's name."""
        row = await self._model_row(model_id)
        upload = files["file"]
        staged = upload.staged
        if staged.size == 0:
            raise BadRequest("The uploaded file is empty.")
        sniffed = await asyncio.to_thread(formats.sniff, staged.head, staged.path, staged.size, upload.filename)
        fmt = formats.resolve_format(form.format, sniffed)
        assert sniffed.kind is not None
        if form.label is not None and await self.db.get_version(row["seq"], label=form.label):
            raise Conflict(f"Model '{row['id']}' already has a version labelled '{form.label}'.")
        now = utc_now()
        artifacts = [{"format": t, "status": "pending", "updated_at": now} for t in form.targets if t != "onnx"]
        if sniffed.kind == "onnx":
            staged, signature = await self._checked_onnx(staged, files.get("onnx_data"))
            artifacts.append({"format": "onnx", "status": "ready", "digest": staged.digest, "size": staged.size,
                              "signature": json.dumps(signature), "converter": "original upload", "updated_at": now})
        elif "onnx_data" in files:
            raise BadRequest("An 'onnx_data' part only goes with an ONNX model in 'file'.")
        else:
            artifacts.append({"format": "onnx", "status": "pending", "updated_at": now})
        version = {"label": form.label, "format": fmt, "kind": sniffed.kind, "digest": staged.digest,
                   "size": staged.size, "description": form.description, "round_id": form.round_id,
                   "accuracy": form.accuracy, "loss": form.loss, "uploaded_at": now, "uploaded_by": uploader,
                   "input_shape": json.dumps(form.input_shape) if form.input_shape else None}
        figures = {k: getattr(form, k) for k in ("round_id", "accuracy", "loss") if getattr(form, k) is not None}

        async def publish() -> None:
            await self.blobs.commit(staged)

        try:
            number = await self.db.insert_version(row["seq"], version, figures, artifacts, publish)
        except storage.Conflict:
            raise Conflict(f"Model '{row['id']}' already has a version labelled '{form.label}'.") from None
        finally:
            await staged.discard()
        if number is None:
            raise NotFound(f"Model '{model_id}' was deleted during the upload.")
        self.pool.wake()
        return UploadedVersion(model_id=row["id"], version=number, label=form.label, format=fmt,
                               model_path=self.blobs.uri(staged.digest), model_size_bytes=staged.size,
                               model_hash=f"sha256:{staged.digest}", description=form.description, uploaded_at=now,
                               formats={a["format"]: a["status"] for a in artifacts})

    async def _checked_onnx(self, staged: StagedBlob, data: UploadedFile | None) -> tuple[StagedBlob, Any]:
        """Validate an ONNX upload in a child; with external weights, fold them into one self-contained file."""
        if data is None:
            result = await self._sandboxed("check-onnx", {}, {"model": staged.path})
            return staged, result.get("signature")
        folded = self.blobs.tmp / f"{staged.path.name}.folded.onnx"
        name = os.path.basename(data.filename.replace("\\", "/"))
        try:
            inputs = {"model": staged.path, f"data/{name}": data.staged.path}
            result = await self._sandboxed("fold-onnx", {"data_name": name}, inputs, folded)
            return await self.blobs.stage_file(folded), result.get("signature")
        except BaseException:
            folded.unlink(missing_ok=True)
            raise

    async def _sandboxed(self, task: str, payload: Row, inputs: dict[str, Path], out: Path | None = None) -> Row:
        for path in inputs.values():
            path.chmod(0o444)  # a root server's job runs as another uid; a committed blob is 0444 anyway
        try:
            result = await self.sandbox.run_task(task, payload, CHECK_LIMITS, JobFiles(inputs, out))
        except IsolationUnavailable as exc:
            raise ServiceUnavailable(f"ONNX uploads are checked in an isolated job, and {exc}.") from exc
        except SandboxError as exc:
            raise BadRequest(f"The ONNX model could not be checked: {exc}.") from exc
        if not result.get("ok"):
            raise BadRequest(f"The file is not a valid ONNX model: {result.get('reason')}.")
        return result

    async def _version_row(self, model_id: str, ref: str) -> tuple[Row, Row]:
        """(model, version) for a version number, label or 'latest'."""
        model = await self._model_row(model_id)
        if ref == "latest":
            version = await self.db.get_version(model["seq"])
        elif ref.isdigit() and len(ref) < 10:
            version = await self.db.get_version(model["seq"], number=int(ref))
        elif len(ref) <= 100:
            version = await self.db.get_version(model["seq"], label=ref)
        else:
            version = None
        if version is None:
            raise NotFound(f"Model '{model['id']}' has no version '{ref[:100]}'.")
        return model, version

    async def get_version(self, model_id: str, ref: str) -> VersionDetail:
        model, v = await self._version_row(model_id, ref)
        statuses = {v["format"]: FormatStatus(status="ready", model_size_bytes=v["size"],
                                              model_hash=f"sha256:{v['digest']}", updated_at=v["uploaded_at"])}
        for target in TARGETS:
            statuses[target] = FormatStatus(status="on_request", reason="converted on the first download request")
        statuses.update({a["format"]: _format_status(a) for a in await self.db.list_artifacts(v["seq"])})
        return VersionDetail(model_id=model["id"], version=v["number"], label=v["label"], format=v["format"],
                             model_path=self.blobs.uri(v["digest"]), model_size_bytes=v["size"],
                             model_hash=f"sha256:{v['digest']}", description=v["description"],
                             round_id=v["round_id"], accuracy=v["accuracy"], loss=v["loss"],
                             input_shape=json.loads(v["input_shape"]) if v["input_shape"] else None,
                             uploaded_at=v["uploaded_at"], formats=statuses)

    async def delete_version(self, model_id: str, ref: str) -> None:
        _, version = await self._version_row(model_id, ref)
        await self.db.delete_version(version["seq"])

    async def find_artifact(self, model_id: str, ref: str, fmt: str | None) -> Artifact:
        """The bytes to serve for (model, version, format), or a NotFound saying why (and when pending, when)."""
        fmt = _download_format(fmt)
        _, v = await self._version_row(model_id, ref)
        number = v["number"]
        if fmt in ("original", v["format"]):
            return Artifact(v["digest"], v["size"], f"model_v{number}{formats.KINDS[v['kind']].ext}")
        if fmt not in TARGETS:
            raise NotFound(f"Version {number} is a {v['format']} model; it can be downloaded as original, "
                           f"{', '.join(TARGETS)}, not {fmt}.")
        artifact = (await self.db.get_artifact(v["seq"], fmt)
                    or await self.db.request_artifact(v["seq"], fmt, utc_now()))
        status = artifact["status"]
        if status == "ready":
            return Artifact(artifact["digest"], artifact["size"], f"model_v{number}{TARGETS[fmt]}")
        if status in ("pending", "running"):
            self.pool.wake()
            raise NotFound(f"Version {number} is being converted to {fmt} ({status}); retry in a few seconds.",
                           headers={"Retry-After": str(PENDING_RETRY_AFTER)})
        raise NotFound(f"Version {number} cannot be downloaded as {fmt}: {artifact['reason']}")

    # signed download links: the local counterpart of a pre-signed S3 URL

    def _signature(self, model_id: str, number: int, fmt: str, expires: int) -> str:
        message = f"{model_id}\n{number}\n{fmt}\n{expires}".encode()
        return hmac.new(self._secret.current(), message, hashlib.sha256).hexdigest()

    async def sign_download(self, model_id: str, ref: str, fmt: str | None, ttl: int) -> tuple[str, str]:
        """A key-less path (with query) to one version's format, valid for `ttl` seconds, and its expiry time."""
        fmt = _download_format(fmt)
        if ttl > self.config.max_link_age:
            raise BadRequest(f"Query parameter 'expires_in' must be at most {self.config.max_link_age} seconds "
                             f"(this server's limit on download links); got {ttl}.")
        model, version = await self._version_row(model_id, ref)
        expires = int(time.time()) + ttl
        signature = self._signature(model["id"], version["number"], fmt, expires)
        path = (f"/signed/models/{model['id']}/versions/{version['number']}/download"
                f"?format={fmt}&expires={expires}&signature={signature}")
        return path, datetime.fromtimestamp(expires, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    def check_signature(self, model_id: str, version: str, fmt: str, expires: str, signature: str) -> None:
        """Refuse a signed link that was altered, made for another file, or has expired."""
        if not (version.isdigit() and expires.isdigit() and len(version) < 10 and len(expires) < 12):
            raise Forbidden("This download link is malformed; ask for a new one with download-url.")
        expected = self._signature(model_id, int(version), fmt, int(expires))
        if not hmac.compare_digest(expected, signature):
            raise Forbidden("This download link's signature does not match; ask for a new one with download-url.")
        now = time.time()
        if int(expires) < now:
            raise Forbidden("This download link has expired; ask for a new one with download-url.")
        # A link this server would never have made (e.g. minted with a stolen secret) is refused, not honoured.
        if int(expires) > now + self.config.max_link_age + LINK_CLOCK_SLACK:
            raise Forbidden("This download link outlives the server's limit on links; ask for a new one "
                            "with download-url.")

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
        except storage.Conflict:
            raise Conflict(f"An active key named '{name}' already exists; revoke it or pick another name.") from None
        return key

    async def list_keys(self) -> list[Row]:
        return await self.db.list_keys()

    async def revoke_key(self, name: str) -> None:
        if not await self.db.revoke_key(name, utc_now()):
            raise NotFound(f"No active key named '{name}'.")

    async def first_admin_key(self) -> str | None:
        """On a registry with no active key, make one admin key (returned once); otherwise None."""
        if await self.db.count_active_keys() > 0:
            return None
        return await self.create_key("admin", "admin")

    async def authenticate(self, key: str) -> KeyInfo | None:
        if not key.startswith(auth.KEY_PREFIX) or len(key) > 128:
            return None
        digest = auth.hash_key(key)
        row = await self.db.find_key(digest)
        if row is None or not hmac.compare_digest(row["key_hash"], digest):
            return None
        return KeyInfo(row["name"], row["scope"])
