"""Offline upkeep of one data directory through the two store interfaces: `octomil-lite gc` and `verify`."""

from __future__ import annotations

import asyncio
import time

from .storage import BlobStore, MetadataStore


async def gc(db: MetadataStore, blobs: BlobStore, grace: float, dry_run: bool) -> dict[str, int]:
    """Delete blobs no row references and temp files, both untouched for `grace` seconds."""
    referenced = await db.referenced_digests()
    cutoff = time.time() - grace
    candidates = set()
    for digest in blobs.digests():
        if digest not in referenced and blobs.path(digest).lstat().st_mtime < cutoff:
            candidates.add(digest)
    if dry_run:
        sizes = sum(blobs.path(d).lstat().st_size for d in candidates)
        temps = blobs.sweep_tmp(older_than=grace, dry_run=True)
        return {"blobs": len(candidates), "blob_bytes": sizes, "temp_files": temps[0], "temp_bytes": temps[1]}
    count, freed = await db.delete_unreferenced(candidates, blobs.delete)
    temps = blobs.sweep_tmp(older_than=grace)
    return {"blobs": count, "blob_bytes": freed, "temp_files": temps[0], "temp_bytes": temps[1]}


async def verify(db: MetadataStore, blobs: BlobStore) -> tuple[list[str], dict[str, int]]:
    """Re-hash every blob and check every row against the store; return (problems, counts)."""
    problems: list[str] = []
    stored = set(blobs.digests())
    checked = checked_bytes = 0
    for digest in sorted(stored):
        actual, size = await asyncio.to_thread(blobs.rehash, digest)
        checked, checked_bytes = checked + 1, checked_bytes + size
        if actual != digest:
            problems.append(f"blob {digest} is corrupt: its bytes hash to {actual}")
    rows = await db.stored_references()
    for row in rows:
        where = f"model {row['model_id']} version {row['number']} ({row['format']})"
        if row["digest"] not in stored:
            problems.append(f"{where} points at missing blob {row['digest']}")
        elif blobs.path(row["digest"]).lstat().st_size != row["size"]:
            problems.append(f"{where} records {row['size']} bytes but blob {row['digest']} has a different size")
    integrity = await db.integrity_check()
    if integrity != "ok":
        problems.append(f"SQLite integrity check: {integrity}")
    referenced = {r["digest"] for r in rows}
    temps = blobs.sweep_tmp(older_than=0, dry_run=True)
    return problems, {"blobs": checked, "bytes": checked_bytes, "rows": len(rows),
                      "orphan_blobs": len(stored - referenced), "temp_files": temps[0]}
