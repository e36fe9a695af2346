"""Offline upkeep through the two store interfaces: `octomil-lite gc` and `verify` (each store knows its bytes)."""

from __future__ import annotations

from collections.abc import Callable

from . import storage
from .config import Config
from .direct_uploads import DirectUploads
from .errors import OctomilError
from .storage import BlobStore, MetadataStore


async def gc(db: MetadataStore, blobs: BlobStore, grace: float, dry_run: bool,
             direct: DirectUploads | None = None) -> dict[str, int]:
    """Delete blobs no row references, leftovers of uploads and expired three-step uploads, all untouched for
    `grace` seconds; what is unreferenced but younger than the grace period is counted as held."""
    done = await blobs.gc(db, grace, dry_run)
    done["expired_uploads"] = await direct.sweep(grace) if direct is not None and not dry_run else 0
    return done


async def verify(db: MetadataStore, blobs: BlobStore) -> tuple[list[str], dict[str, int]]:
    """Re-hash every blob and check every row against the store; return (problems, counts)."""
    problems, counts = await blobs.verify(db)
    integrity = await db.integrity_check()
    if integrity != "ok":
        problems.append(f"database integrity check: {integrity}")
    return problems, counts


async def migrate(source: Config, target: Config, say: Callable[[str], None]) -> dict[str, int]:
    """Copy a registry to other stores (e.g. SQLite + directory -> PostgreSQL + S3), the source only read.

    Blobs first, each re-hashed on the way and skipped when the target has it (so an interrupted run resumes),
    then every row in one transaction, so the target never has a row naming a missing blob.
    """
    src_db, src_blobs = await storage.open_stores(source)
    dst_db, dst_blobs = await storage.open_stores(target)
    try:
        if not hasattr(dst_db, "import_rows"):
            raise OctomilError("migrate copies into a PostgreSQL database (--to-database postgresql://…).")
        sizes = {r["digest"]: r["size"] for r in await src_db.stored_references()}
        copied = skipped = 0
        for digest, size in sorted(sizes.items()):
            if await dst_blobs.has(digest):
                skipped += 1
                continue
            await _copy_blob(src_blobs, dst_db, dst_blobs, digest, size)
            copied += 1
            say(f"copied blob {digest[:12]}… ({size} bytes)")
        added = await dst_db.import_rows(await src_db.export_rows(), await src_db.link_secret())
        return {"blobs_copied": copied, "blobs_present": skipped, **added}
    finally:
        await src_db.close()
        await dst_db.close()


async def _copy_blob(src: BlobStore, dst_db: MetadataStore, dst: BlobStore, digest: str, size: int) -> None:
    source = await src.open_source(digest)
    staged = dst.stage()
    try:
        await source.begin(0, size)
        async for chunk in source.chunks(0, size):
            await staged.write(chunk)
        if await staged.finish() != digest or staged.size != size:
            raise OctomilError(f"blob {digest} does not hash to its name in the source (run verify there).")

        async def publish(record: storage.Recorder) -> None:
            await dst.commit(staged, record)

        await dst_db.publish_blob(publish)
    finally:
        source.close()
        await staged.discard()
