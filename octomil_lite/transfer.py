"""Moving models between registries (bundles.py is the format): what an export holds, and an import: every
member verified first, then one transaction that adds what is missing, or nothing at all when anything clashes."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, BinaryIO

from . import bundles
from .errors import Conflict, NotImplementedHere
from .storage import BlobStore, MetadataStore, Row
from .storage.local import LocalBlobStore
from .storage.sqlite import SQLiteStore


def _single_machine(db: MetadataStore, blobs: BlobStore) -> None:
    # Bundles read and write blob files and SQLite rows directly; the PostgreSQL/S3 stores lack those paths yet.
    if not (isinstance(db, SQLiteStore) and isinstance(blobs, LocalBlobStore)):
        raise NotImplementedHere("Bundles work on a single-machine registry (SQLite and a blob directory) in this "
                                 "version; export from, or import into, such a registry, then `migrate`.")

if TYPE_CHECKING:
    from .registry import Registry


async def plan_export(registry: Registry, refs: list[str] | None, formats: str | None = None) -> bundles.ExportPlan:
    _single_machine(registry.db, registry.blobs)
    """What a bundle of these models (ids or names; None: all) holds: every version's original bytes, and its
    ready artifacts in `formats` (comma-separated, e.g. original,onnx; None: all of them)."""
    wanted = bundles.artifact_formats(formats)
    ids = None if refs is None else list(dict.fromkeys([(await registry.model_row(ref))["id"] for ref in refs]))
    return bundles.plan_export(*await registry.db.bundle_rows(ids, wanted))


def resolve(models: list[Row], here: Row) -> tuple[list[str], Row]:
    """The clash rules: a version already here with the same bytes and label is skipped (importing twice changes
    nothing); a version number or label here with other bytes, or a model name taken by another id, is a clash."""
    clashes: list[str] = []
    plan: Row = {"models": [], "versions": [], "artifacts": [], "next_numbers": {}, "present": 0}
    for m in models:
        old = here["models"].get(m["id"])
        taken_by = here["names"].get(m["name"], m["id"]) if m["name"] is not None else m["id"]
        if old is None and taken_by != m["id"]:
            clashes.append(f"model {m['id']}: the name '{m['name']}' is taken here by model {taken_by}")
            continue
        by_number = {v["number"]: v for v in here["versions"].get(m["id"], [])}
        by_label = {v["label"]: v for v in by_number.values() if v["label"] is not None}
        for v in m["versions"]:
            mine = by_number.get(v["number"])
            if mine is not None and (mine["digest"], mine["label"]) == (v["digest"], v["label"]):
                plan["present"] += 1
            elif mine is not None:
                clashes.append(f"model {m['id']} version {v['number']}: here it has other bytes or another label "
                               f"({mine['label'] or 'no label'})")
                continue
            elif v["label"] is not None and v["label"] in by_label:
                clashes.append(f"model {m['id']} version {v['number']}: its label '{v['label']}' is version "
                               f"{by_label[v['label']]['number']} here")
                continue
            else:
                plan["versions"].append((m["id"], v))
            plan["artifacts"].extend((m["id"], v["number"], a) for a in v["artifacts"])
        top = max((v["number"] for v in m["versions"]), default=0) + 1
        plan["next_numbers"][m["id"]] = max(top, old["next_version"]) if old else top
        if old is None:
            plan["models"].append(m)
    return clashes, plan


async def import_bundle(db: MetadataStore, blobs: BlobStore, source: BinaryIO) -> dict[str, int]:
    _single_machine(db, blobs)
    """Import a bundle read front to back from `source` (a blocking stream, read in threads).

    Every member is staged and hash-checked before anything becomes visible; a clash raises Conflict listing all
    of them, and nothing is imported.
    """
    reader = await asyncio.to_thread(bundles.BundleReader, source)
    manifest = await asyncio.to_thread(reader.read_manifest)
    models = bundles.manifest_rows(manifest)

    def decide(here: Row) -> tuple[list[str], Row]:
        return resolve(models, here)

    clashes, _ = await db.import_models(models, decide, None)  # early: before any bytes are received
    staged = [] if clashes else await asyncio.to_thread(reader.receive_files, manifest, blobs)
    counts: dict[str, int] = {}
    try:
        if not clashes:
            clashes, counts = await db.import_models(models, decide, lambda record: blobs.commit_all(staged))
    finally:
        for blob in staged:
            await blob.discard()
    if clashes:
        raise Conflict(f"The bundle clashes with this registry ({len(clashes)} clash(es)); nothing was imported: "
                       f"{'; '.join(clashes[:5])}.", details=clashes[:1000])
    return {**counts, "files": len(staged), "bytes": sum(b.size for b in staged)}
