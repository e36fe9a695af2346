"""Content-addressed blob store on local disk: blobs/sha256/<2 hex>/<64 hex>, immutable."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import DISK_FULL
from . import StorageError, StorageFull

_DIGEST = re.compile(r"[0-9a-f]{64}")
FLUSH_BYTES = 4 * 1024 * 1024
HEAD_BYTES = 64 * 1024


def _storage_error(exc: OSError) -> StorageError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(DISK_FULL)
    return StorageError(f"The registry could not write to its data directory ({exc.strerror}).")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StagedBlob:
    """Bytes on their way into the store: hashed and written to tmp/ in the same pass."""

    def __init__(self, path: Path, fd: int | None):
        self.path = path
        self.size = 0
        self.digest = ""
        self.head = b""
        self._sha = hashlib.sha256()
        self._fd = fd
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._pending: asyncio.Future[Any] | None = None

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            assert self._fd is not None
            view = view[os.write(self._fd, view):]

    def _flush(self, data: bytes) -> asyncio.Future[Any]:
        """Hash and write a buffer in two worker threads at once (both release the GIL); ordered by _drain."""
        loop = asyncio.get_running_loop()
        return asyncio.gather(loop.run_in_executor(None, self._sha.update, data),
                              loop.run_in_executor(None, self._write_all, data))

    async def _drain(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            try:
                await pending
            except OSError as exc:
                raise _storage_error(exc) from exc

    async def write(self, data: bytes) -> None:
        """Buffer a chunk; full buffers are hashed and written in a thread while more arrive."""
        if len(self.head) < HEAD_BYTES:
            self.head += data[: HEAD_BYTES - len(self.head)]
        self.size += len(data)
        self._buffer.append(data)
        self._buffered += len(data)
        if self._buffered >= FLUSH_BYTES:
            await self._drain()
            chunk = b"".join(self._buffer)
            self._buffer, self._buffered = [], 0
            self._pending = self._flush(chunk)

    async def finish(self) -> str:
        """Write what is left, fsync and close; return the hex digest."""
        await self._drain()
        chunk = b"".join(self._buffer)
        self._buffer, self._buffered = [], 0

        def last() -> None:
            self._sha.update(chunk)
            self._write_all(chunk)
            assert self._fd is not None
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None

        try:
            await asyncio.to_thread(last)
        except OSError as exc:
            raise _storage_error(exc) from exc
        self.digest = self._sha.hexdigest()
        return self.digest

    async def discard(self) -> None:
        """Drop the temp file (after an error or when the bytes are already stored)."""
        if self._pending is not None:
            with contextlib.suppress(OSError):
                await self._pending
            self._pending = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.path.unlink(missing_ok=True)


class LocalBlobStore:
    """sha256-addressed files under a data directory; only ever opened by digest."""

    def __init__(self, data_dir: Path):
        self.root = data_dir / "blobs" / "sha256"
        self.tmp = data_dir / "tmp"
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._root_uri = self.root.resolve().as_uri()

    def path(self, digest: str) -> Path:
        if not _DIGEST.fullmatch(digest):
            raise ValueError(f"not a sha256 digest: {digest!r}")
        return self.root / digest[:2] / digest

    def uri(self, digest: str) -> str:
        return f"{self._root_uri}/{digest[:2]}/{digest}"

    def stage(self) -> StagedBlob:
        try:
            path = self.tmp / f"upload-{os.getpid()}-{time.monotonic_ns()}-{os.urandom(4).hex()}"
            return StagedBlob(path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        except OSError as exc:
            raise _storage_error(exc) from exc

    async def commit(self, staged: StagedBlob) -> str:
        """Move finished bytes to their final path (or drop them if already stored); return the digest."""

        def move() -> None:
            final = self.path(staged.digest)
            if final.parent.is_symlink():  # a planted link in place of a shard: never write through it
                final.parent.unlink()
            if final.is_file() and not final.is_symlink():
                staged.path.unlink(missing_ok=True)
                os.utime(final)  # a fresh mtime keeps a concurrent gc's grace period from taking it
                return
            final.parent.mkdir(exist_ok=True)
            os.chmod(staged.path, 0o444)
            os.replace(staged.path, final)
            _fsync_dir(final.parent)

        try:
            await asyncio.to_thread(move)
        except OSError as exc:
            await staged.discard()
            raise _storage_error(exc) from exc
        return staged.digest

    async def stage_file(self, path: Path) -> StagedBlob:
        """Stage a finished file already under tmp/ (a conversion's output): hash and fsync it in place."""

        def hash_file() -> StagedBlob:
            staged = StagedBlob(path, None)
            sha = hashlib.sha256()
            with open(path, "rb", buffering=0) as f:
                while data := f.read(FLUSH_BYTES):
                    sha.update(data)
                os.fsync(f.fileno())
            staged.digest, staged.size = sha.hexdigest(), path.stat().st_size
            return staged

        return await asyncio.to_thread(hash_file)

    def open(self, digest: str) -> int:
        """A read-only descriptor for a blob; a planted symlink (as the blob or as its shard) is never followed."""
        path = self.path(digest)
        shard = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            return os.open(path.name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=shard)
        finally:
            os.close(shard)

    def exists(self, digest: str) -> bool:
        path = self.path(digest)
        return path.is_file() and not path.is_symlink() and not path.parent.is_symlink()

    def delete(self, digest: str) -> int:
        """Remove a blob; return the bytes freed."""
        path = self.path(digest)
        try:
            size = path.lstat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        return size

    def digests(self) -> Iterator[str]:
        """The digests stored: regular files in real shard directories (planted symlinks are not blobs)."""
        for shard in self.root.iterdir():
            if shard.is_dir() and not shard.is_symlink() and len(shard.name) == 2:
                for entry in shard.iterdir():
                    if (_DIGEST.fullmatch(entry.name) and entry.name[:2] == shard.name
                            and entry.is_file() and not entry.is_symlink()):
                        yield entry.name

    def rehash(self, digest: str) -> tuple[str, int]:
        """The sha256 and size of a blob's bytes as they are on disk now."""
        sha, size = hashlib.sha256(), 0
        fd = self.open(digest)
        with os.fdopen(fd, "rb", buffering=0) as f:
            while data := f.read(FLUSH_BYTES):
                sha.update(data)
                size += len(data)
        return sha.hexdigest(), size

    def sweep_tmp(self, older_than: float | None = None, dry_run: bool = False) -> tuple[int, int]:
        """Delete temp files (all, or those untouched for `older_than` seconds); return (count, bytes)."""
        count = freed = 0
        now = time.time()
        for entry in self.tmp.iterdir():
            st = entry.lstat()
            if older_than is not None and now - st.st_mtime < older_than:
                continue
            if not dry_run and entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            elif not dry_run:
                entry.unlink(missing_ok=True)
            count += 1
            freed += st.st_size
        return count, freed
