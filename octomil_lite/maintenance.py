"""Offline upkeep through the two store interfaces: `octomil-lite gc` and `verify` (each store knows its bytes)."""

from __future__ import annotations

from .storage import BlobStore, MetadataStore


async def gc(db: MetadataStore, blobs: BlobStore, grace: float, dry_run: bool) -> dict[str, int]:
    """Delete blobs no row references and leftovers of uploads, all untouched for `grace` seconds."""
    return await blobs.gc(db, grace, dry_run)


async def verify(db: MetadataStore, blobs: BlobStore) -> tuple[list[str], dict[str, int]]:
    """Re-hash every blob and check every row against the store; return (problems, counts)."""
    problems, counts = await blobs.verify(db)
    integrity = await db.integrity_check()
    if integrity != "ok":
        problems.append(f"database integrity check: {integrity}")
    return problems, counts
