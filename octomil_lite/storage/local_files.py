"""The files behind LocalBlobStore: bytes staged into tmp/, blobs read back out, the syncs that make them durable."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import DISK_FULL
from . import StorageError, StorageFull

FLUSH_BYTES = 4 * 1024 * 1024
HEAD_BYTES = 64 * 1024
CHUNK_BYTES = 1024 * 1024


def storage_error(exc: OSError) -> StorageError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(DISK_FULL)
    return StorageError(f"The registry could not write to its data directory ({exc.strerror}).")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def syncfs(path: Path) -> None:
    """Flush every dirty page of the file system holding `path` (Linux syncfs), raising OSError on failure."""
    import ctypes

    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syncfs(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
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
                raise storage_error(exc) from exc

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
            raise storage_error(exc) from exc
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

    def open_reader(self) -> BinaryIO:
        return open(self.path, "rb")

    @contextlib.asynccontextmanager
    async def local_path(self) -> AsyncIterator[Path]:
        yield self.path


class FileSource:
    """A download read from a local blob: the next chunk is read in a thread while this one is sent."""

    def __init__(self, fd: int):
        self.fd = fd

    async def begin(self, start: int, length: int) -> None:
        """The descriptor is already open."""

    async def chunks(self, start: int, length: int) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        offset, end = start, start + length
        ahead = loop.run_in_executor(None, os.pread, self.fd, min(CHUNK_BYTES, end - offset), offset) \
            if offset < end else None
        try:
            while ahead is not None:
                data = await ahead
                ahead = None
                if not data:
                    raise OSError(f"blob shorter than recorded ({offset} of {end} bytes)")
                offset += len(data)
                if offset < end:
                    ahead = loop.run_in_executor(None, os.pread, self.fd, min(CHUNK_BYTES, end - offset), offset)
                yield data
        finally:
            if ahead is not None:  # the client went away: the read in flight is not needed (its result is dropped)
                ahead.add_done_callback(_drop)

    def close(self) -> None:
        os.close(self.fd)


def _drop(read: asyncio.Future[bytes]) -> None:
    if not read.cancelled():
        read.exception()  # retrieved, so that asyncio does not log it
