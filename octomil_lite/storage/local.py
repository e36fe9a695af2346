"""Content-addressed blob store on local disk: blobs/sha256/<2 hex>/<64 hex>, immutable."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from . import StorageError
from .local_files import FLUSH_BYTES, HEAD_BYTES, FileSource, StagedBlob, fsync_dir, storage_error, syncfs

_DIGEST = re.compile(r"[0-9a-f]{64}")


def sweep_dir(tmp: Path, older_than: float | None = None, dry_run: bool = False) -> tuple[int, int]:
    """Delete the entries of a temp directory (all, or those untouched for `older_than` seconds)."""
    count = freed = 0
    now = time.time()
    for entry in tmp.iterdir():
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


class LocalBlobStore:
    """sha256-addressed files under a data directory; only ever opened by digest."""

    def __init__(self, data_dir: Path, blobs_dir: Path | None = None):
        self.root = (blobs_dir or data_dir / "blobs") / "sha256"
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
            raise storage_error(exc) from exc

    async def commit(self, staged: StagedBlob, record: Any = None) -> str:
        """Move finished bytes to their final path (or drop them if already stored); return the digest.

        Called inside the transaction that adds the row; a file's path is its digest, so nothing is recorded.
        """

        def move() -> None:
            if (shard := self._place(staged)) is not None:
                fsync_dir(shard)

        try:
            await asyncio.to_thread(move)
        except OSError as exc:
            await staged.discard()
            raise storage_error(exc) from exc
        return staged.digest

    def _place(self, staged: StagedBlob) -> Path | None:
        """Rename finished bytes to their final path; return the shard directory to fsync (None: already stored)."""
        final = self.path(staged.digest)
        if final.parent.is_symlink():  # a planted link in place of a shard: never write through it
            final.parent.unlink()
        if final.is_file() and not final.is_symlink():
            staged.path.unlink(missing_ok=True)
            os.utime(final)  # a fresh mtime keeps a concurrent gc's grace period from taking it
            return None
        final.parent.mkdir(exist_ok=True)
        os.chmod(staged.path, 0o444)
        os.replace(staged.path, final)
        return final.parent

    async def commit_all(self, staged: list[StagedBlob]) -> None:
        """Commit many received blobs at once: one syncfs makes all their bytes durable, then each shard directory
        is fsynced once (one fsync per file costs ~0.5 ms, 5 s for 10,000 tiny files)."""

        def move_all() -> None:
            syncfs(self.tmp)
            shards = {shard for blob in staged if (shard := self._place(blob)) is not None}
            for shard in shards:
                fsync_dir(shard)

        try:
            await asyncio.to_thread(move_all)
        except OSError as exc:
            raise storage_error(exc) from exc

    def receive(self, source: BinaryIO, size: int) -> StagedBlob:
        """Copy exactly `size` bytes of a stream into tmp/, hashing them on the way (blocking: run it in a thread).

        EOFError if the stream ends early; the temp file is gone after any failure. Not yet durable: commit_all
        syncs them all at once.
        """
        path = self.tmp / f"receive-{os.getpid()}-{time.monotonic_ns()}-{os.urandom(4).hex()}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise storage_error(exc) from exc
        sha = hashlib.sha256()
        try:
            left = size
            while left:
                data = source.read(min(FLUSH_BYTES, left))
                if not data:
                    raise EOFError(f"the stream ended {left} bytes early")
                sha.update(data)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                left -= len(data)
        except BaseException as exc:
            path.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise storage_error(exc) from exc
            raise
        finally:
            os.close(fd)
        staged = StagedBlob(path, None)
        staged.digest, staged.size = sha.hexdigest(), size
        return staged

    async def stage_file(self, path: Path) -> StagedBlob:
        """Stage a finished file already under tmp/ (a conversion's output): hash and fsync it in place."""

        def hash_file() -> StagedBlob:
            staged = StagedBlob(path, None)
            sha = hashlib.sha256()
            with open(path, "rb", buffering=0) as f:
                while data := f.read(FLUSH_BYTES):
                    staged.head = staged.head or data[:HEAD_BYTES]
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

    async def presign(self, digest: str, ttl: int) -> str | None:
        return None  # a directory has no URLs of its own: download-url signs a link to this server

    async def has(self, digest: str) -> bool:
        return self.exists(digest)

    async def open_source(self, digest: str) -> FileSource:
        try:
            return FileSource(self.open(digest))
        except OSError as exc:
            raise StorageError(f"The stored bytes of blob {digest} are missing or unreadable ({exc.strerror}); "
                               "run 'octomil-lite verify'.") from None

    @contextlib.asynccontextmanager
    async def local_copy(self, digest: str) -> AsyncIterator[Path]:
        """A blob as a local file (here, the blob itself: read-only)."""
        yield self.path(digest)

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
        return sweep_dir(self.tmp, older_than, dry_run)

    async def gc(self, db: Any, grace: float, dry_run: bool) -> dict[str, int]:
        """Delete blobs no row references and temp files, both untouched for `grace` seconds; what is unreferenced
        but younger is counted as held (held_blobs, held_bytes)."""
        referenced = await db.referenced_digests()
        cutoff = time.time() - grace
        candidates = set()
        held = held_bytes = 0
        for digest in self.digests():
            if digest in referenced:
                continue
            st = self.path(digest).lstat()
            if st.st_mtime < cutoff:
                candidates.add(digest)
            else:
                held, held_bytes = held + 1, held_bytes + st.st_size
        kept = {"held_blobs": held, "held_bytes": held_bytes}
        if dry_run:
            sizes = sum(self.path(d).lstat().st_size for d in candidates)
            temps = self.sweep_tmp(older_than=grace, dry_run=True)
            return {"blobs": len(candidates), "blob_bytes": sizes, "temp_files": temps[0], "temp_bytes": temps[1],
                    **kept}
        count, freed = await db.delete_unreferenced(candidates, self.delete)
        temps = self.sweep_tmp(older_than=grace)
        return {"blobs": count, "blob_bytes": freed, "temp_files": temps[0], "temp_bytes": temps[1], **kept}

    async def verify(self, db: Any) -> tuple[list[str], dict[str, int]]:
        """Re-hash every blob and check every row against the store; return (problems, counts)."""
        problems: list[str] = []
        stored = set(self.digests())
        checked = checked_bytes = 0
        for digest in sorted(stored):
            actual, size = await asyncio.to_thread(self.rehash, digest)
            checked, checked_bytes = checked + 1, checked_bytes + size
            if actual != digest:
                problems.append(f"blob {digest} is corrupt: its bytes hash to {actual}")
        rows = await db.stored_references()
        for row in rows:
            where = f"model {row['model_id']} version {row['number']} ({row['format']})"
            if row["digest"] not in stored:
                problems.append(f"{where} points at missing blob {row['digest']}")
            elif self.path(row["digest"]).lstat().st_size != row["size"]:
                problems.append(f"{where} records {row['size']} bytes but blob {row['digest']} has a different size")
        referenced = {r["digest"] for r in rows}
        temps = self.sweep_tmp(older_than=0, dry_run=True)
        return problems, {"blobs": checked, "bytes": checked_bytes, "rows": len(rows),
                          "orphan_blobs": len(stored - referenced), "temp_files": temps[0]}
