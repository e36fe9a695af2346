"""The registry's domain operations: no HTTP here, only OctomilError subclasses."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec

from . import formats, storage
from .config import Config
from .convert import routes
from .convert.pool import TARGETS, ConversionPool
from .convert.quantize import QUANTIZED
from .convert.sandbox import Limits, Sandbox
from .convert.warm import WarmPool
from .direct_uploads import DirectUploads
from .errors import BadRequest, Conflict, Forbidden, NotFound
from .federated import Federated
from .federations import Federations
from .keys import ApiKeys
from .lifecycle import Lifecycle, UploadedFile, metrics_of, version_summary
from .onnx_uploads import OnnxUploadChecks
from .optimize import Optimizer
from .schemas import (
    DOWNLOAD_FORMATS,
    CreateModel,
    EventCount,
    FormatStatus,
    Model,
    ModelDetail,
    ModelList,
    UpdateModel,
    UploadedVersion,
    UploadForm,
    VersionDetail,
)
from .storage import BlobStore, MetadataStore, Row, StagedBlob

PENDING_RETRY_AFTER = 2
ON_REQUEST = "converted on the first download request"
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


def _format_status(a: Row) -> FormatStatus:
    return FormatStatus(status=a["status"], reason=a["reason"], model_size_bytes=a["size"],
                        model_hash=f"sha256:{a['digest']}" if a["digest"] else None,
                        parity=json.loads(a["parity"]) if a["parity"] else None,
                        signature=json.loads(a["signature"]) if a["signature"] else None,
                        converter=a["converter"], updated_at=a["updated_at"])


class Registry(ApiKeys):
    """Models, versions, blobs, conversions and keys of one data directory."""

    def __init__(self, config: Config, db: MetadataStore, blobs: BlobStore):
        self.config = config
        self.db = db
        self.blobs = blobs
        self.sandbox = Sandbox(hidden=[config.data_dir], allow_unsafe=config.unsafe_conversions)
        self.warm = WarmPool(self.sandbox, config.warm_pool_size, config.warm_idle_timeout) \
            if config.warm_pool_size > 0 else None
        self.sandbox.warm = self.warm
        self.onnx_checks = OnnxUploadChecks(self.sandbox, blobs)
        self.pool = ConversionPool(db, blobs, self.sandbox, Limits(timeout=config.conversion_timeout,
                                                                   memory_bytes=config.conversion_memory_bytes),
                                   config.conversion_workers, utc_now, config.conversion_lease)
        self.training = Federated(self)
        self.direct = DirectUploads(db, blobs, config.data_dir)
        self.federations = Federations(db, utc_now)
        self.lifecycle = Lifecycle(self)
        self.optimizer = Optimizer(self, utc_now)

    @classmethod
    async def open(cls, config: Config) -> Registry:
        config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        db, blobs = await storage.open_stores(config)
        try:
            await db.link_secret()  # made at first open, so it exists before any link does
        except BaseException:
            await db.close()
            raise
        return cls(config, db, blobs)

    async def start(self) -> None:
        """Serving: sweep leftovers of a previous run and start converting."""
        self.blobs.sweep_tmp()
        await self.db.recover_direct_uploads()
        await asyncio.to_thread(self.sandbox.probe)
        await self.pool.start()

    def warm_pool_status(self) -> dict[str, Any]:
        """For /health: the warm workers idle per family and the memory they hold (bounded by --warm-pool-size)."""
        if self.warm is None:
            return {"enabled": False}
        memory = self.warm.memory_bytes()
        return {"enabled": True, "size_per_family": self.warm.size, "idle_timeout": self.warm.idle_timeout,
                "families": self.warm.idle_workers(), "memory_bytes": memory,
                "total_memory_bytes": sum(memory.values())}

    async def close(self) -> None:
        await self.pool.stop()
        if self.warm is not None:
            await self.warm.close()
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
            architecture=json.loads(row["architecture"]) if row["architecture"] else {},
        )

    async def model_row(self, ref: str) -> Row:
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

    def model_of(self, row: Row) -> Model:
        return self._model(row)

    async def create_model(self, req: CreateModel) -> tuple[Model, bool]:
        """Create a model; one with the same name and no contradicting field is returned instead (created False)."""
        if req.name is not None and (existing := await self.db.find_model_nocase(req.name)):
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
        return self._model({**row, "digest": None, "size": None, "architecture": None}), True

    async def update_model(self, model_id: str, req: UpdateModel) -> Model:
        row = await self.model_row(model_id)
        fields = {f: getattr(req, f) for f in req.__struct_fields__ if getattr(req, f) is not msgspec.UNSET}
        if "is_baseline" in fields:
            fields["is_baseline"] = int(fields["is_baseline"])
        try:
            await self.db.update_model(row["seq"], fields)
        except storage.Conflict:
            raise Conflict(f"A model named '{fields.get('name')}' already exists; names are unique.") from None
        return self._model({**row, **fields})

    async def delete_model(self, model_id: str) -> None:
        row = await self.model_row(model_id)
        if not await self.db.delete_model(row["seq"]):
            raise NotFound(f"No model with id '{model_id}'.")

    async def list_models(self, limit: int, offset: int, **filters: str | bool | None) -> ModelList:
        """A page of models, newest first; filters (framework, is_baseline, name, use_case) that are None match all."""
        given = {column: value for column, value in filters.items() if value is not None}
        rows, total = await self.db.list_models(limit, offset, given)
        return ModelList(models=[self._model(r) for r in rows], total=total, limit=limit, offset=offset)

    async def get_model(self, model_id: str) -> ModelDetail:
        row = await self.model_row(model_id)
        versions = await self.db.list_versions(row["seq"])
        events = {e["name"]: EventCount(count=e["count"], last_at=e["last_at"])
                  for e in await self.db.model_events(row["seq"])}
        model = self._model(row)
        return ModelDetail(**{f: getattr(model, f) for f in model.__struct_fields__},
                           versions=[version_summary(v) for v in versions], events=events)

    # versions

    async def version_rows(self, model_ref: str, ref: str | int | None) -> tuple[Row, Row]:
        """(model, version) for a version number, label, or None for the newest."""
        return await self.version_row(model_ref, "latest" if ref is None else str(ref))

    async def require_model(self, model_id: str) -> None:
        """Fail fast (before an upload body is read) when the model does not exist."""
        await self.model_row(model_id)

    def stage_upload(self) -> StagedBlob:
        return self.blobs.stage()

    async def upload_version(self, model_id: str, files: dict[str, UploadedFile], form: UploadForm,
                             uploader: str | None = None) -> UploadedVersion:
        """Turn finished, staged bytes into the model's next version (the caller discards the staged files).

        UPLOADER (the key's name) is whose turn its conversions wait for: jobs are claimed round-robin by key."""
        row = await self.model_row(model_id)
        upload = files["file"]
        staged = upload.staged
        if staged.size == 0:
            raise BadRequest("The uploaded file is empty.")
        sniffed = await asyncio.to_thread(formats.sniff, staged.head, staged.open_reader, staged.size,
                                          upload.filename)
        fmt = formats.resolve_format(form.format, sniffed)
        assert sniffed.kind is not None
        if form.label is not None and await self.db.get_version(row["seq"], label=form.label):
            raise Conflict(f"Model '{row['id']}' already has a version labelled '{form.label}'.")
        now = utc_now()
        impossible = routes.ruled_out(sniffed.kind, fmt)
        artifacts = [{"format": t, "status": "pending", "updated_at": now}
                     for t in form.targets if t != "onnx" and t not in impossible]
        if sniffed.kind == "onnx":
            staged, signature = await self.onnx_checks.checked(staged, files.get("onnx_data"))
            artifacts.append({"format": "onnx", "status": "ready", "digest": staged.digest, "size": staged.size,
                              "signature": json.dumps(signature), "converter": "original upload", "updated_at": now})
        elif "onnx_data" in files:
            raise BadRequest("An 'onnx_data' part only goes with an ONNX model in 'file'.")
        elif "onnx" not in impossible:
            artifacts.append({"format": "onnx", "status": "pending", "updated_at": now})
        version = {"label": form.label, "format": fmt, "kind": sniffed.kind, "digest": staged.digest,
                   "size": staged.size, "description": form.description, "round_id": form.round_id,
                   "accuracy": form.accuracy, "loss": form.loss, "uploaded_at": now, "uploaded_by": uploader,
                   "input_shape": json.dumps(form.input_shape) if form.input_shape else None,
                   "status": form.status, "metrics": json.dumps(form.metrics) if form.metrics else None}
        figures = {k: getattr(form, k) for k in ("round_id", "accuracy", "loss") if getattr(form, k) is not None}
        if form.architecture:
            figures["architecture"] = json.dumps(form.architecture)

        async def publish(record: storage.Recorder) -> None:
            await self.blobs.commit(staged, record)

        try:
            number = await self.db.insert_version(row["seq"], version, figures, artifacts, publish)
        except storage.Conflict:
            raise Conflict(f"Model '{row['id']}' already has a version labelled '{form.label}'.") from None
        finally:
            await staged.discard()
        if number is None:
            raise NotFound(f"Model '{model_id}' was deleted during the upload.")
        self.pool.wake()
        return UploadedVersion(model_id=row["id"], version=number, label=form.label, status=form.status, format=fmt,
                               model_path=self.blobs.uri(staged.digest), model_size_bytes=staged.size,
                               model_hash=f"sha256:{staged.digest}", description=form.description, uploaded_at=now,
                               formats={**dict.fromkeys(impossible, "impossible"),
                                        **{a["format"]: a["status"] for a in artifacts}})

    async def version_row(self, model_id: str, ref: str) -> tuple[Row, Row]:
        """(model, version) for a version number, label or 'latest'."""
        model = await self.model_row(model_id)
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
        model, v = await self.version_row(model_id, ref)
        statuses = {v["format"]: FormatStatus(status="ready", model_size_bytes=v["size"],
                                              model_hash=f"sha256:{v['digest']}", updated_at=v["uploaded_at"])}
        impossible = routes.ruled_out(v["kind"], v["format"])
        for target in TARGETS:
            why = impossible.get(target)
            statuses[target] = FormatStatus(status="impossible" if why else "on_request", reason=why or ON_REQUEST)
        statuses.update({a["format"]: _format_status(a) for a in await self.db.list_artifacts(v["seq"])})
        return VersionDetail(model_id=model["id"], version=v["number"], label=v["label"], status=v["status"],
                             format=v["format"],
                             model_path=self.blobs.uri(v["digest"]), model_size_bytes=v["size"],
                             model_hash=f"sha256:{v['digest']}", description=v["description"],
                             round_id=v["round_id"], accuracy=v["accuracy"], loss=v["loss"],
                             input_shape=json.loads(v["input_shape"]) if v["input_shape"] else None,
                             metrics=metrics_of(v), uploaded_at=v["uploaded_at"], formats=statuses)

    async def delete_version(self, model_id: str, ref: str) -> None:
        _, version = await self.version_row(model_id, ref)
        await self.db.delete_version(version["seq"])

    async def find_artifact(self, model_id: str, ref: str, fmt: str | None) -> Artifact:
        """The bytes to serve for (model, version, format), or a NotFound saying why (and when pending, when)."""
        fmt = _download_format(fmt)
        _, v = await self.version_row(model_id, ref)
        number = v["number"]
        if fmt in ("original", v["format"]):
            return Artifact(v["digest"], v["size"], f"model_v{number}{formats.KINDS[v['kind']].ext}")
        if fmt not in TARGETS and fmt not in QUANTIZED:
            raise NotFound(f"Version {number} is {formats.a_model(v['format'])}; it can be downloaded as original, "
                           f"{', '.join(TARGETS)}, not {fmt}.")
        artifact = await self.db.get_artifact(v["seq"], fmt)
        if artifact is None and fmt in QUANTIZED:  # made by optimize only, never on a download
            raise NotFound(f"Version {number} has no {fmt} form; make it with POST /models/{{id}}/optimize.")
        if artifact is None and (reason := routes.impossible_reason(v["kind"], fmt, v["format"])) is not None:
            raise NotFound(f"Version {number} cannot be downloaded as {fmt}: {reason}")
        artifact = artifact or await self.db.request_artifact(v["seq"], fmt, utc_now())
        status = artifact["status"]
        if status == "ready":
            return Artifact(artifact["digest"], artifact["size"], f"model_v{number}{({**TARGETS, **QUANTIZED})[fmt]}")
        if status in ("pending", "running"):
            self.pool.wake()
            raise NotFound(f"Version {number} is being converted to {fmt} ({status}); retry in a few seconds.",
                           headers={"Retry-After": str(PENDING_RETRY_AFTER)})
        raise NotFound(f"Version {number} cannot be downloaded as {fmt}: {artifact['reason']}")

    # signed download links: the local counterpart of a pre-signed S3 URL

    async def _signature(self, model_id: str, number: int, fmt: str, expires: int) -> str:
        message = f"{model_id}\n{number}\n{fmt}\n{expires}".encode()
        return hmac.new(await self.db.link_secret(), message, hashlib.sha256).hexdigest()

    async def rotate_link_secret(self) -> None:
        """A new download-link secret: every link signed so far stops working, on every process."""
        await self.db.rotate_link_secret()

    async def sign_download(self, model_id: str, ref: str, fmt: str | None, ttl: int) -> tuple[str, str]:
        """A key-less path (with query) to one version's format, valid for `ttl` seconds, and its expiry time;
        with pre-signed downloads on an object store, the object's own pre-signed URL instead."""
        fmt = _download_format(fmt)
        if ttl > self.config.max_link_age:
            raise BadRequest(f"Query parameter 'expires_in' must be at most {self.config.max_link_age} seconds "
                             f"(this server's limit on download links); got {ttl}.")
        model, version = await self.version_row(model_id, ref)
        expires = int(time.time()) + ttl
        if self.config.presigned_downloads:  # serve --presigned-downloads: the bucket serves the bytes itself
            artifact = await self.find_artifact(model_id, ref, fmt)
            if url := await self.blobs.presign(artifact.digest, ttl):
                return url, datetime.fromtimestamp(expires, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        signature = await self._signature(model["id"], version["number"], fmt, expires)
        path = (f"/signed/models/{model['id']}/versions/{version['number']}/download"
                f"?format={fmt}&expires={expires}&signature={signature}")
        return path, datetime.fromtimestamp(expires, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    async def check_signature(self, model_id: str, version: str, fmt: str, expires: str, signature: str) -> None:
        """Refuse a signed link that was altered, made for another file, or has expired."""
        if not (version.isdigit() and expires.isdigit() and len(version) < 10 and len(expires) < 12):
            raise Forbidden("This download link is malformed; ask for a new one with download-url.")
        expected = await self._signature(model_id, int(version), fmt, int(expires))
        if not hmac.compare_digest(expected, signature):
            raise Forbidden("This download link's signature does not match; ask for a new one with download-url.")
        now = time.time()
        if int(expires) < now:
            raise Forbidden("This download link has expired; ask for a new one with download-url.")
        # A link this server would never have made (e.g. minted with a stolen secret) is refused, not honoured.
        if int(expires) > now + self.config.max_link_age + LINK_CLOCK_SLACK:
            raise Forbidden("This download link outlives the server's limit on links; ask for a new one "
                            "with download-url.")

    async def open_artifact(self, artifact: Artifact) -> storage.BlobSource:
        """Where to read the artifact's bytes from (a local file or a bucket object)."""
        return await self.blobs.open_source(artifact.digest)
