"""Version lifecycle (status, metrics, listing), create_version, and the registry side of the three-step upload."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .direct_uploads import is_storage_key
from .errors import BadRequest, Conflict
from .schemas import (
    MAX_METRICS,
    VERSION_STATUSES,
    CreateVersion,
    UpdateMetrics,
    UploadedVersion,
    UploadForm,
    VersionDetail,
    VersionList,
    VersionSummary,
)
from .storage import Row, StagedBlob

if TYPE_CHECKING:
    from .registry import Registry


@dataclass
class UploadedFile:
    """One file part of an upload: its staged bytes and the file name the client gave."""

    staged: StagedBlob
    filename: str


def metrics_of(v: Row) -> dict[str, float]:
    return json.loads(v["metrics"]) if v["metrics"] else {}


def version_summary(v: Row) -> VersionSummary:
    return VersionSummary(version=v["number"], label=v["label"], status=v["status"], format=v["format"],
                          model_size_bytes=v["size"], model_hash=f"sha256:{v['digest']}",
                          description=v["description"], round_id=v["round_id"], accuracy=v["accuracy"],
                          loss=v["loss"], metrics=metrics_of(v), uploaded_at=v["uploaded_at"])


def label_of(value: str | None) -> str | None:
    """A version label (such as 1.0.0) as given at upload, or None; never a number, 'latest' or a path."""
    label = value.strip() if value else None
    if not label:
        return None
    if len(label) > 100:
        raise BadRequest("Field 'version' must be at most 100 characters.")
    if label.isdigit() or label == "latest" or "/" in label:
        raise BadRequest(f"Form field 'version' is a label such as 1.0.0; '{label[:50]}' would clash with version "
                         "numbers, 'latest' or paths.")
    return label


def _checked_metrics(metrics: dict[str, float | None]) -> None:
    for name, value in metrics.items():
        if value is not None and not math.isfinite(value):
            raise BadRequest(f"Metric '{name}' must be a finite number.")


def _digest_of(checksum: str) -> str:
    digest = checksum.strip().lower().removeprefix("sha256:")
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise BadRequest("Field 'checksum' must be the file's sha256, as 64 hex digits or sha256:<hex>.")
    return digest


class Lifecycle:
    """Status draft -> published -> deprecated (in any order; the same status again is a no-op), metrics of any
    name, and versions registered from bytes already stored."""

    def __init__(self, registry: Registry):
        self.registry = registry

    async def list_versions(self, model_id: str, limit: int, offset: int, status: str | None) -> VersionList:
        """A page of versions, newest first, optionally of one status."""
        model = await self.registry.model_row(model_id)
        rows, total = await self.registry.db.page_versions(model["seq"], limit, offset, status)
        return VersionList(versions=[version_summary(v) for v in rows], total=total, limit=limit, offset=offset)

    async def set_status(self, model_id: str, ref: str, status: str) -> VersionDetail:
        """Publish or deprecate a version; its bytes stay (deprecated versions still download by number or label)."""
        assert status in VERSION_STATUSES
        _, version = await self.registry.version_row(model_id, ref)
        if version["status"] != status:
            await self.registry.db.update_version(version["seq"], {"status": status})
        return await self.registry.get_version(model_id, str(version["number"]))

    async def update_metrics(self, model_id: str, ref: str, req: UpdateMetrics) -> VersionDetail:
        """Merge metrics of any name into a version's; a null value removes that metric."""
        _checked_metrics(req.metrics)
        _, version = await self.registry.version_row(model_id, ref)
        merged = {**metrics_of(version), **req.metrics}
        kept = {name: value for name, value in merged.items() if value is not None}
        if len(kept) > MAX_METRICS:
            raise BadRequest(f"A version keeps at most {MAX_METRICS} metrics.")
        await self.registry.db.update_version(version["seq"], {"metrics": json.dumps(kept) if kept else None})
        return await self.registry.get_version(model_id, str(version["number"]))

    async def create_version(self, model_id: str, req: CreateVersion, uploader: str | None = None) -> UploadedVersion:
        """Register bytes already in the store as a version, after checking their size and checksum.

        `storage_path` is the storage_key of a direct upload whose PUT is done, or a stored blob: its model_path
        URI, sha256:<hex> or <hex>.
        """
        _checked_metrics(dict(req.metrics or {}))
        if req.metrics and len(req.metrics) > MAX_METRICS:
            raise BadRequest(f"A version keeps at most {MAX_METRICS} metrics.")
        model = await self.registry.model_row(model_id)
        digest = _digest_of(req.checksum)
        form = UploadForm(format=req.format, label=label_of(req.version), description=req.description,
                          status=req.status, metrics=dict(req.metrics) if req.metrics else None)
        if is_storage_key(req.storage_path):
            return await self.confirm_upload(model_id, req.storage_path, req.size_bytes, form, digest, uploader)
        stored = req.storage_path.rsplit("/", 1)[-1].lower().removeprefix("sha256:")
        if not re.fullmatch(r"[0-9a-f]{64}", stored) or not await self.registry.blobs.has(stored):
            raise BadRequest("Field 'storage_path' must name bytes already in this registry: a storage_key from "
                             "upload-url (after its PUT) or a stored blob (model_path, sha256:<hex>).")
        if stored != digest:
            raise BadRequest(f"Field 'checksum' (sha256:{digest}) does not match the stored bytes (sha256:{stored}).")
        blobs = self.registry.blobs
        link = blobs.tmp / f"register-{stored}-{secrets.token_hex(4)}"
        async with blobs.local_copy(stored) as source:  # the blob itself (directory) or a download (bucket)
            await asyncio.to_thread(os.link, source, link)  # discarding the link never touches the blob
        staged = await blobs.stage_file(link)
        try:
            if staged.size != req.size_bytes:
                raise BadRequest(f"Field 'size_bytes' ({req.size_bytes}) does not match the stored bytes "
                                 f"({staged.size} bytes).")
            return await self.registry.upload_version(model["id"], {"file": UploadedFile(staged, "")}, form, uploader)
        finally:
            await staged.discard()

    # three-step upload (newer Octomil SDKs): upload-url, PUT, confirm-upload

    async def upload_url(self, model_id: str, label: str | None, filename: str) -> tuple[str, str, str]:
        """(storage_key, signed PUT path, expiry) for one upload of the model's version `label`."""
        model = await self.registry.model_row(model_id)
        label = label_of(label)
        if label is None:
            raise BadRequest("Form field 'version' (a label such as 1.0.0) is required for upload-url.")
        if await self.registry.db.get_version(model["seq"], label=label):
            raise Conflict(f"Model '{model['id']}' already has a version labelled '{label}'.")
        return await self.registry.direct.create(model, label, filename[:255])

    async def confirm_upload(self, model_id: str, storage_key: str, file_size: int | None, form: UploadForm,
                             digest: str | None = None, uploader: str | None = None) -> UploadedVersion:
        """Turn a received direct upload into a version, with the checks and conversions of a multipart upload."""
        model = await self.registry.model_row(model_id)
        row, staged = await self.registry.direct.claim(model, storage_key)
        try:
            if form.label is not None and form.label != row["label"]:
                raise BadRequest(f"This upload was made for version '{row['label']}', not '{form.label}'.")
            if file_size is not None and file_size != staged.size:
                raise BadRequest(f"'file_size' says {file_size} bytes but {staged.size} were received; "
                                 "ask for a new upload-url and upload again.")
            if digest is not None and digest != staged.digest:
                raise BadRequest(f"The checksum sha256:{digest} does not match the received bytes "
                                 f"(sha256:{staged.digest}).")
            form.label = row["label"]
            upload = UploadedFile(staged, row["filename"])
            return await self.registry.upload_version(model["id"], {"file": upload}, form, uploader)
        finally:
            await staged.discard()
            await self.registry.direct.finish(storage_key)
