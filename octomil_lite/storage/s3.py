"""Blobs in an S3-compatible bucket (the `scale` extra): each upload its own object, digest -> key in the database.

Bytes stream into a multipart upload with the sha256 computed on the way; nothing is copied afterwards. An object
is registered as pending before its first byte, and leaves that state only in the transaction that maps its
digest to it, so gc (which reads the listing first and the tables second) never takes an object a commit needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import io
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from . import StorageError
from .aws import AwsSettings, BucketApi

MiB = 1024 * 1024
PART_BYTES = 16 * MiB
HEAD_BYTES = 64 * 1024


def _s3_error(exc: Exception, doing: str = "write to") -> StorageError:
    return StorageError(f"The registry could not {doing} its object store ({str(exc).splitlines()[0][:300]}).")


class _ObjectReader(io.RawIOBase):
    """obstore's ranged reader as a standard binary file (zipfile wants bytes, not obstore's Bytes)."""

    def __init__(self, reader: Any):
        self._reader = reader

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = memoryview(self._reader.read(len(buffer)))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return int(self._reader.seek(offset, whence))

    def tell(self) -> int:
        return int(self._reader.tell())

    def close(self) -> None:
        self._reader.close()
        super().close()


class S3StagedBlob:
    """An upload on its way into the bucket: a multipart upload to its own key, hashed as it streams."""

    def __init__(self, blobs: S3BlobStore):
        self._blobs = blobs
        self.key = blobs.new_key()
        self.size = 0
        self.digest = ""
        self.head = b""
        self._sha = hashlib.sha256()
        self._writer: Any = None
        self._started = False

    async def _start(self) -> None:
        import obstore

        await self._blobs.db.add_pending_object(self.key)
        self._started = True
        self._writer = obstore.open_writer_async(self._blobs.store, self._blobs.object_path(self.key),
                                                 buffer_size=PART_BYTES, max_concurrency=4)

    async def write(self, data: bytes) -> None:
        if not self._started:
            await self._start()
        if len(self.head) < HEAD_BYTES:
            self.head += data[: HEAD_BYTES - len(self.head)]
        self.size += len(data)
        # Hashing (GIL released) overlaps the part uploads already in flight.
        await asyncio.to_thread(self._sha.update, data) if len(data) >= MiB else self._sha.update(data)
        try:
            await self._writer.write(data)
        except Exception as exc:  # obstore raises its own hierarchy and OSError subclasses
            raise _s3_error(exc) from exc

    async def finish(self) -> str:
        """Complete the multipart upload (the object is durable from here on); return the hex digest."""
        if not self._started:
            await self._start()
        try:
            await self._writer.close()
        except Exception as exc:
            raise _s3_error(exc) from exc
        self.digest = self._sha.hexdigest()
        return self.digest

    async def discard(self) -> None:
        """Remove the object unless a committed row maps its digest to it; gc reclaims what this misses."""
        if not self._started:
            return
        with contextlib.suppress(Exception):  # called after the row's transaction ended, either way
            mapped = await self._blobs.db.object_key(self.digest) if self.digest else None
            if mapped is not None and mapped["key"] == self.key:
                return
        with contextlib.suppress(Exception):
            if self._writer is not None and not await self._writer.closed():
                await self._writer.close()
        with contextlib.suppress(Exception):
            await self._blobs.delete_key(self.key)
        with contextlib.suppress(Exception):
            await self._blobs.db.drop_pending_object(self.key)

    def open_reader(self) -> BinaryIO:
        """A seekable reader over the finished object (to list a zip's members without downloading it)."""
        import obstore

        reader = obstore.open_reader(self._blobs.store, self._blobs.object_path(self.key), buffer_size=256 * 1024)
        return io.BufferedReader(_ObjectReader(reader))

    @contextlib.asynccontextmanager
    async def local_path(self) -> AsyncIterator[Path]:
        """The bytes as a temporary local file, for a sandboxed check that needs a path."""
        async with self._blobs.download(self._blobs.object_path(self.key)) as path:
            yield path


class S3Source:
    """A download streamed from the bucket with the client's range passed through."""

    def __init__(self, store: Any, path: str):
        self.store = store
        self.path = path
        self._result: Any = None

    async def begin(self, start: int, length: int) -> None:
        import obstore

        if length == 0:
            return
        try:
            self._result = await obstore.get_async(self.store, self.path, options={"range": (start, start + length)})
        except FileNotFoundError:
            raise StorageError(f"The stored bytes of object {self.path} are missing; "
                               "run 'octomil-lite verify'.") from None
        except Exception as exc:  # obstore's own errors: the store is unreachable or refused
            raise _s3_error(exc, "read from") from exc

    async def chunks(self, start: int, length: int) -> AsyncIterator[bytes]:
        if self._result is None:
            await self.begin(start, length)
        if self._result is None:
            return
        async for chunk in self._result.stream(min_chunk_size=MiB):
            yield bytes(chunk)

    def close(self) -> None:
        """Nothing is held open between requests."""


class S3BlobStore:
    """sha256-addressed blobs under s3://bucket/prefix; which object holds a digest is a database row."""

    def __init__(self, url: str, db: Any, tmp: Path, settings: AwsSettings | None = None):
        from obstore.store import S3Store

        parts = urlsplit(url)
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        self.db = db
        self.tmp = tmp
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.settings = settings or AwsSettings.from_environment()
        config: dict[str, Any] = {"region": self.settings.region}
        if self.settings.endpoint:
            config["endpoint"] = self.settings.endpoint
        if self.settings.access_key:
            config.update(access_key_id=self.settings.access_key, secret_access_key=self.settings.secret_key)
        if self.settings.token:
            config["session_token"] = self.settings.token
        http = bool(self.settings.endpoint and self.settings.endpoint.startswith("http://"))
        self.store = S3Store(self.bucket, config=config, client_options={"allow_http": http})  # type: ignore[arg-type]
        self._api = BucketApi(self.settings, self.bucket)
        self._keys: dict[str, str] = {}

    def sweep_tmp(self, older_than: float | None = None, dry_run: bool = False) -> tuple[int, int]:
        """Local scratch (conversions, ONNX checks) left by a previous run."""
        from .local import sweep_dir

        return sweep_dir(self.tmp, older_than, dry_run)

    def object_path(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def new_key(self) -> str:
        return f"objects/{uuid.uuid4().hex}"

    def uri(self, digest: str) -> str:
        return f"s3://{self.bucket}/{self.object_path('sha256/' + digest)}"

    def stage(self) -> S3StagedBlob:
        return S3StagedBlob(self)

    async def stage_file(self, path: Path) -> S3StagedBlob:
        """Move a finished local file (a conversion's output) into its own object, hashing it on the way."""
        staged = S3StagedBlob(self)
        try:
            with open(path, "rb", buffering=0) as f:
                while data := await asyncio.to_thread(f.read, PART_BYTES):
                    await staged.write(data)
            await staged.finish()
        except BaseException:
            await staged.discard()
            raise
        finally:
            path.unlink(missing_ok=True)
        return staged

    async def commit(self, staged: S3StagedBlob, record: Callable[[str, str, int], Any]) -> str:
        """In the row's transaction: map the digest to this object, unless another object already holds it."""
        await record(staged.digest, staged.key, staged.size)  # discard() later drops the object if it lost
        return staged.digest

    async def _key(self, digest: str) -> tuple[str, int]:
        row = await self.db.object_key(digest)
        if row is None:
            raise StorageError(f"The stored bytes of blob {digest} are missing; run 'octomil-lite verify'.")
        return row["key"], row["size"]

    async def has(self, digest: str) -> bool:
        return await self.db.object_key(digest) is not None

    async def open_source(self, digest: str) -> S3Source:
        key, _ = await self._key(digest)
        return S3Source(self.store, self.object_path(key))

    async def presign(self, digest: str, ttl: int) -> str | None:
        """A pre-signed (SigV4) GET for the object, for serve --presigned-downloads."""
        import obstore

        key, _ = await self._key(digest)
        return await obstore.sign_async(self.store, "GET", self.object_path(key), datetime.timedelta(seconds=ttl))

    @contextlib.asynccontextmanager
    async def download(self, path: str) -> AsyncIterator[Path]:
        import obstore

        local = self.tmp / f"s3-{uuid.uuid4().hex}"
        try:
            fd = os.open(local, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as f:
                result = await obstore.get_async(self.store, path)
                async for chunk in result.stream(min_chunk_size=4 * MiB):
                    await asyncio.to_thread(f.write, chunk)
            yield local
        finally:
            local.unlink(missing_ok=True)

    @contextlib.asynccontextmanager
    async def local_copy(self, digest: str) -> AsyncIterator[Path]:
        """A blob as a temporary local file (a conversion's source)."""
        key, _ = await self._key(digest)
        async with self.download(self.object_path(key)) as path:
            yield path

    async def delete_key(self, key: str) -> None:
        import obstore

        with contextlib.suppress(FileNotFoundError):
            await obstore.delete_async(self.store, self.object_path(key))

    async def listing(self) -> dict[str, tuple[int, float]]:
        """key -> (size, last modified) of every object under the prefix's objects/."""
        import obstore

        found: dict[str, tuple[int, float]] = {}
        base = self.object_path("objects/")
        async for batch in obstore.list(self.store, base, chunk_size=1000):
            for meta in batch:
                key = meta["path"][len(self.object_path("")):]
                found[key] = (meta["size"], meta["last_modified"].timestamp())
        return found

    async def gc(self, db: Any, grace: float, dry_run: bool) -> dict[str, int]:
        """Delete objects no row needs and abort stale multipart uploads, all untouched for `grace` seconds."""
        listing = await self.listing()  # first the bucket, then the tables: see the module docstring
        uploads = await self._api.multipart_uploads(self.object_path("objects/"))
        cutoff = time.time() - grace
        referenced = await self.db.referenced_digests()
        needed = {r["key"] for r in await self.db.object_rows() if r["digest"] in referenced}
        held = [k for k, (_, when) in listing.items() if when >= cutoff and k not in needed]
        kept = {"held_blobs": len(held), "held_bytes": sum(listing[k][0] for k in held)}
        if dry_run:
            mapped = {r["key"] for r in await self.db.object_rows()} | await self.db.pending_keys()
            referenced = await self.db.referenced_digests()
            unreferenced = {r["key"] for r in await self.db.object_rows() if r["digest"] not in referenced}
            doomed = {k for k, (_, when) in listing.items() if when < cutoff and (k not in mapped or k in unreferenced)}
            return {"blobs": len(doomed), "blob_bytes": sum(listing[k][0] for k in doomed),
                    "temp_files": sum(1 for _, _, when in uploads if when < cutoff), "temp_bytes": 0, **kept}
        reaped = set(await self.db.reap_objects(grace))
        mapped = {r["key"] for r in await self.db.object_rows()} | await self.db.pending_keys()
        doomed = {k for k in listing if k in reaped or (k not in mapped and listing[k][1] < cutoff)}
        for key in doomed:
            await self.delete_key(key)
        aborted = 0
        for path, upload_id, when in uploads:
            key = path[len(self.object_path("")):]
            if key in reaped or (key not in mapped and when < cutoff):
                await self._api.abort(path, upload_id)
                aborted += 1
        return {"blobs": len(doomed), "blob_bytes": sum(listing[k][0] for k in doomed),
                "temp_files": aborted, "temp_bytes": 0, **kept}

    async def verify(self, db: Any) -> tuple[list[str], dict[str, int]]:
        """Re-read every mapped object: its size from the listing, its sha256 from its bytes."""
        import obstore

        problems: list[str] = []
        listing = await self.listing()
        checked = checked_bytes = 0
        rows = await self.db.object_rows()
        lost: set[str] = set()
        for row in rows:
            if row["key"] not in listing:
                problems.append(f"blob {row['digest']} is missing: no object {row['key']}")
                lost.add(row["digest"])
                continue
            if listing[row["key"]][0] != row["size"]:
                problems.append(f"blob {row['digest']} has {listing[row['key']][0]} bytes, recorded {row['size']}")
            sha, size = hashlib.sha256(), 0
            result = await obstore.get_async(self.store, self.object_path(row["key"]))
            async for chunk in result.stream(min_chunk_size=4 * MiB):
                await asyncio.to_thread(sha.update, chunk)
                size += len(chunk)
            checked, checked_bytes = checked + 1, checked_bytes + size
            if sha.hexdigest() != row["digest"]:
                problems.append(f"blob {row['digest']} is corrupt: its bytes hash to {sha.hexdigest()}")
        mapped = {r["digest"]: r for r in rows}
        references = await self.db.stored_references()
        for ref in references:
            where = f"model {ref['model_id']} version {ref['number']} ({ref['format']})"
            found = mapped.get(ref["digest"])
            if found is None or ref["digest"] in lost:  # unmapped, or mapped to an object that is gone
                problems.append(f"{where} points at missing blob {ref['digest']}")
            elif found["size"] != ref["size"]:
                problems.append(f"{where} records {ref['size']} bytes but blob {ref['digest']} has {found['size']}")
        referenced = {r["digest"] for r in references}
        in_use = {r["key"] for r in rows} | await self.db.pending_keys()
        return problems, {"blobs": checked, "bytes": checked_bytes, "rows": len(references),
                          "orphan_blobs": len(set(mapped) - referenced) + len(set(listing) - in_use),
                          "temp_files": len(await self._api.multipart_uploads(self.object_path("objects/")))}
