"""Three-step uploads of newer Octomil SDKs: upload-url, one PUT of the bytes, confirm-upload.

The local store's counterpart of a pre-signed S3 PUT: the URL is signed (HMAC of model, label, storage key and
expiry) and points at this server. An S3 blob store would hand out a pre-signed PUT to a staging object instead,
and `received` would read its size and digest from the bucket; confirm-upload is the same either way.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import secrets
import time
from datetime import UTC, datetime
from pathlib import Path

from .errors import BadRequest, Conflict, Forbidden, NotFound
from .storage import BlobStore, MetadataStore, Row, StagedBlob

_KEY_PREFIX = "upload-"
UPLOAD_URL_TTL = 3600

# States of a direct upload: one PUT (awaiting -> receiving -> received), then one confirm (received -> confirming).
AWAITING, RECEIVING, RECEIVED, CONFIRMING = "awaiting", "receiving", "received", "confirming"


def _rfc3339(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def is_storage_key(value: str) -> bool:
    rest = value.removeprefix(_KEY_PREFIX)
    return value.startswith(_KEY_PREFIX) and len(rest) == 32 and all(c in "0123456789abcdef" for c in rest)


class DirectUploads:
    """Pending direct uploads: a row each in the metadata store, received bytes under data/uploads/."""

    def __init__(self, db: MetadataStore, blobs: BlobStore, data_dir: Path):
        self.db = db
        self.blobs = blobs
        self.dir = data_dir / "uploads"
        self.dir.mkdir(mode=0o700, exist_ok=True)

    async def _signature(self, model_id: str, label: str, storage_key: str, expires: int) -> str:
        message = f"put\n{model_id}\n{label}\n{storage_key}\n{expires}".encode()
        return hmac.new(await self.db.link_secret(), message, hashlib.sha256).hexdigest()

    async def create(self, model: Row, label: str, filename: str) -> tuple[str, str, str]:
        """A new pending upload for (model, label): (storage key, signed PUT path with query, expiry time)."""
        storage_key = _KEY_PREFIX + secrets.token_hex(16)
        expires = int(time.time()) + UPLOAD_URL_TTL
        await self.db.insert_direct_upload({"storage_key": storage_key, "model_seq": model["seq"], "label": label,
                                            "filename": filename, "expires": expires, "state": AWAITING})
        signature = await self._signature(model["id"], label, storage_key, expires)
        path = f"/signed/models/{model['id']}/uploads/{storage_key}?expires={expires}&signature={signature}"
        return storage_key, path, _rfc3339(expires)

    async def check_put(self, model: Row, storage_key: str, expires: str, signature: str) -> Row:
        """The pending upload a signed PUT URL names, claimed for receiving; 403/409 for a bad, old or used URL."""
        row = await self.db.get_direct_upload(storage_key) if is_storage_key(storage_key) else None
        if row is None or row["model_seq"] != model["seq"] or not (
                expires.isdigit() and len(expires) < 12 and int(expires) == row["expires"]):
            raise Forbidden("This upload URL is unknown or altered; ask for a new one with upload-url.")
        expected = await self._signature(model["id"], row["label"], storage_key, row["expires"])
        if not hmac.compare_digest(expected, signature):
            raise Forbidden("This upload URL's signature does not match; ask for a new one with upload-url.")
        if row["expires"] < time.time():
            raise Forbidden("This upload URL has expired; ask for a new one with upload-url.")
        if not await self.db.move_direct_upload(storage_key, AWAITING, RECEIVING):
            raise Conflict("This upload URL was already used; an upload URL accepts one PUT.")
        return row

    async def received(self, storage_key: str, staged: StagedBlob) -> None:
        """Keep a finished PUT's bytes (outside tmp/, which a restart sweeps) until confirm-upload."""
        try:
            await asyncio.to_thread(os.replace, staged.path, self.dir / storage_key)
        except BaseException:
            await self.failed(storage_key)
            raise
        await self.db.move_direct_upload(storage_key, RECEIVING, RECEIVED,
                                         {"digest": staged.digest, "size": staged.size})

    async def failed(self, storage_key: str) -> None:
        """A PUT that did not finish stored nothing: the URL may be used again."""
        await self.db.move_direct_upload(storage_key, RECEIVING, AWAITING)

    async def claim(self, model: Row, storage_key: str) -> tuple[Row, StagedBlob]:
        """Take a received upload of `model` for confirming: its row and its bytes, staged under tmp/ again.

        The caller discards the staged bytes and calls `finish` whatever happens: a confirm is single-use.
        """
        row = await self.db.get_direct_upload(storage_key) if is_storage_key(storage_key) else None
        if row is None or row["model_seq"] != model["seq"]:
            raise NotFound(f"Model '{model['id']}' has no pending upload '{storage_key[:100]}'; "
                           "ask for one with upload-url.")
        if row["expires"] < time.time() and row["state"] == AWAITING:
            await self.finish(storage_key)
            raise BadRequest("This upload expired before its bytes were PUT; ask for a new upload-url.")
        if row["state"] in (AWAITING, RECEIVING):
            raise BadRequest("The bytes of this upload have not been received; PUT the file to the upload_url "
                             "first, then confirm.")
        if not await self.db.move_direct_upload(storage_key, RECEIVED, CONFIRMING):
            raise Conflict("This upload was already confirmed (or is being confirmed now).")
        staging = self.blobs.tmp / f"confirm-{storage_key}"
        try:
            await asyncio.to_thread(os.replace, self.dir / storage_key, staging)
        except FileNotFoundError:
            await self.finish(storage_key)
            raise BadRequest("The received bytes of this upload are gone (removed by gc); upload again.") from None
        return row, await self.blobs.stage_file(staging)  # hashed again: the bytes are checked, not trusted

    async def finish(self, storage_key: str) -> None:
        await self.db.delete_direct_upload(storage_key)
        (self.dir / storage_key).unlink(missing_ok=True)

    async def sweep(self, grace: float) -> int:
        """Drop uploads expired for `grace` seconds and received files no upload names; return the count."""
        count = 0
        for row in await self.db.expired_direct_uploads(int(time.time() - grace)):
            if row["state"] != CONFIRMING:
                await self.finish(row["storage_key"])
                count += 1
        known = await self.db.direct_upload_keys()
        cutoff = time.time() - grace
        for entry in self.dir.iterdir():
            if entry.name not in known and entry.lstat().st_mtime < cutoff:
                entry.unlink(missing_ok=True)
                count += 1
        return count
