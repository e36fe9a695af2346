"""`optimize`, `compatibility` and `optimized-config` from what the registry knows: sizes, formats, parity.

Quantized variants are made by the conversion pool (sandboxed, never in the server process); this module only
asks for them, waits for them, and judges them. There are no device profiles here, and none are invented.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .convert.pool import ConversionPool
from .convert.quantize import QUANTIZED
from .errors import NotFound
from .schemas import Candidate, OptimizeReport, OptimizeRequest
from .storage import MetadataStore, Row

if TYPE_CHECKING:
    from .registry import Registry

MB = 1024 * 1024
OPTIMIZE_WAIT = 45.0  # seconds optimize waits for its variants: under the SDK's 60 s request timeout
RETRY_AFTER = 2
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


async def wait_for(db: MetadataStore, pool: ConversionPool, version_seq: int, formats: list[str], timeout: float,
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


class Optimizer:
    """The registry's optimize, compatibility and optimized-config."""

    def __init__(self, registry: Registry, now: Callable[[], str], wait: float = OPTIMIZE_WAIT):
        self.registry = registry
        self.now = now
        self.wait = wait

    async def optimize(self, model_id: str, req: OptimizeRequest) -> OptimizeReport:
        """Quantize the newest published version's ONNX form (int8, fp16) and judge the variants."""
        model, version = await self.registry.version_row(model_id, "latest")
        db, pool = self.registry.db, self.registry.pool
        onnx = (await wait_for(db, pool, version["seq"], ["onnx"], self.wait, self.now)).get("onnx")
        if onnx is None or onnx["status"] != "ready":
            status = onnx["status"] if onnx else "missing"
            if status in ("pending", "running"):
                raise NotFound(f"Version {version['number']} is still being converted to ONNX; retry in a few seconds.",
                               headers={"Retry-After": str(RETRY_AFTER)})
            raise NotFound(f"Version {version['number']} has no ONNX form to optimize: {onnx and onnx['reason']}")
        variants = await wait_for(db, pool, version["seq"], list(QUANTIZED), self.wait, self.now)
        return report(model["id"], version, onnx, variants, req)

    async def _formats(self, version: Row) -> dict[str, Row]:
        return {a["format"]: a for a in await self.registry.db.list_artifacts(version["seq"])}

    async def compatibility(self, model_id: str, devices: list[str]) -> dict[str, Any]:
        """What the registry knows of the newest published version: size, formats; no device verdicts."""
        model, version = await self.registry.version_row(model_id, "latest")
        formats = await self._formats(version)
        ready = {fmt: a["size"] for fmt, a in formats.items() if a["status"] == "ready"}
        recommendations = []
        if "onnx" in ready and not set(QUANTIZED) & set(ready):
            recommendations.append("call optimize to make onnx-int8 and onnx-fp16 variants with parity figures")
        for fmt in QUANTIZED:
            if fmt in ready and "onnx" in ready:
                recommendations.append(f"format={fmt} is {ready[fmt] / ready['onnx']:.0%} the size of format=onnx")
        return {"model_id": model["id"], "model_name": model["name"] or model["id"], "version": version["number"],
                "model_params": None, "model_size_mb": round(version["size"] / MB, 6),
                "feasibility_category": size_category(version["size"]),
                "formats": {fmt: a["status"] for fmt, a in formats.items()}, "format_sizes": ready,
                "compatible_devices": [], "incompatible_devices": [], "unknown_devices": devices,
                "summary": NO_DEVICE_DATA, "recommendations": recommendations}

    async def optimized_config(self, model_id: str, device: str) -> dict[str, Any]:
        """The format to fetch for any device (the float ONNX form when there is one) and what else exists."""
        model, version = await self.registry.version_row(model_id, "latest")
        formats = await self._formats(version)
        ready = sorted(fmt for fmt, a in formats.items() if a["status"] == "ready")
        return {"device": device, "model_id": model["id"], "version": version["number"],
                "format": "onnx" if "onnx" in ready else "original", "runtime": "onnxruntime",
                "formats_available": ready, "note": NO_DEVICE_DATA}
