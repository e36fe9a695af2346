"""`optimize`, `compatibility` and `optimized-config` from what the registry knows: sizes, formats, parity.

Quantized variants are made by the conversion pool (sandboxed, never in the server process); this module only
asks for them, waits for them, and judges them. There are no device profiles here, and none are invented.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from .conversions import ConversionPool
from .db import Database, Row
from .quantize import QUANTIZED
from .schemas import Candidate, OptimizeReport, OptimizeRequest

MB = 1024 * 1024
NO_DEVICE_DATA = ("octomil-lite has no device profiles: target_devices are recorded, not evaluated; the "
                  "variants are judged by size and by parity with the float ONNX model on sample inputs.")
_OPTIMIZATIONS = {"onnx-int8": "dynamic_int8_quantization", "onnx-fp16": "fp16_conversion"}
_DONE = ("ready", "failed", "impossible", "unavailable")


def retention(parity: dict[str, Any] | None) -> float | None:
    """How much of the float model's behaviour a variant keeps, 0-1: label agreement for classifiers (any integer
    output), else 1 - the largest absolute difference relative to the largest float output."""
    if not parity:
        return None
    if "agreement" in parity:
        return float(parity["agreement"])
    return max(0.0, 1.0 - float(parity.get("max_rel_diff", 1.0)))


async def wait_for(db: Database, pool: ConversionPool, version_seq: int, formats: list[str], timeout: float,
                   now: Callable[[], str]) -> dict[str, Row]:
    """Ask for each format of the version (if not asked already) and wait until each is done or `timeout`."""
    for fmt in formats:
        if await db.get_artifact(version_seq, fmt) is None:
            await db.request_artifact(version_seq, fmt, now())
    pool.wake()
    deadline = time.monotonic() + timeout
    while True:
        rows = {a["format"]: a for a in await db.list_artifacts(version_seq) if a["format"] in formats}
        if all(rows.get(f, {}).get("status") in _DONE for f in formats) or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.2)


def report(model_id: str, version: Row, onnx: Row, variants: dict[str, Row], req: OptimizeRequest) -> OptimizeReport:
    """Judge the variants: feasible when one keeps `accuracy_threshold` of the float model and fits the budget."""
    budget = req.size_budget_mb * MB if req.size_budget_mb else None
    candidates: dict[str, Candidate] = {}
    for fmt in QUANTIZED:
        row = variants.get(fmt) or {"status": "pending", "reason": "still being made; call optimize again"}
        parity = json.loads(row["parity"]) if row.get("parity") else None
        kept = retention(parity) if row["status"] == "ready" else None
        size = row.get("size") if row["status"] == "ready" else None
        candidates[fmt] = Candidate(status=row["status"], reason=row.get("reason"), size_bytes=size, parity=parity,
                                    retention=kept, meets_threshold=kept is not None and kept >= req.accuracy_threshold,
                                    within_budget=size is not None and (budget is None or size <= budget))
    original = onnx["size"]
    good = sorted((c.size_bytes or 0, fmt) for fmt, c in candidates.items()
                  if c.meets_threshold and c.within_budget and (c.size_bytes or 0) < original)
    best = good[0][1] if good else None
    reason = None
    if best is None:
        reason = "; ".join(f"{fmt}: {_why_not(c, req.accuracy_threshold, original)}" for fmt, c in candidates.items())
    base = f"/api/v1/models/{model_id}/versions/{version['number']}/download?format="
    kind = "agreement of predicted labels" if any(
        c.parity and "agreement" in c.parity for c in candidates.values()) else "1 - max relative difference"
    return OptimizeReport(
        model_id=model_id, version=version["number"], feasible=best is not None, reason=reason, criterion=kind,
        accuracy_threshold=req.accuracy_threshold, original_size_mb=round(original / MB, 6),
        optimized_size_mb=round(candidates[best].size_bytes / MB, 6) if best else None,  # type: ignore[operator]
        compression_ratio=round(original / candidates[best].size_bytes, 3) if best else None,  # type: ignore[operator]
        optimizations_applied=[_OPTIMIZATIONS[best]] if best else [],
        converted_paths={fmt: base + fmt for fmt, c in candidates.items() if c.status == "ready"},
        report=candidates,
        runtime_recommendation=f"onnxruntime (CPU) with format={best or 'onnx'}",
        target_devices=list(req.target_devices or []), device_note=NO_DEVICE_DATA)


def _why_not(c: Candidate, threshold: float, original: int) -> str:
    if c.reason or c.status != "ready":
        return c.reason or c.status
    if not c.meets_threshold:
        return f"keeps {c.retention:.4f} of the float model, below the threshold {threshold}"
    if not c.within_budget:
        return f"{c.size_bytes} bytes is over the size budget"
    return f"{c.size_bytes} bytes is not smaller than the float ONNX model ({original} bytes)"


def size_category(size: int) -> str:
    """A coarse class by file size alone (no device data): tiny < 10 MB <= small < 100 MB <= medium < 1 GB."""
    return "tiny" if size < 10 * MB else "small" if size < 100 * MB else "medium" if size < 1024 * MB else "large"
