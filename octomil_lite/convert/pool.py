"""Server side of conversion: a small pool that claims jobs from the metadata store, each run in a sandboxed child.

A claim is a lease: renewed while the child runs, taken over by any process once it runs out (its holder died).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import bounded_reason
from .quantize import QUANTIZED
from .sandbox import CHECK_LIMITS, IsolationUnavailable, JobFiles, Limits, Sandbox, SandboxError

if TYPE_CHECKING:  # the pool needs only the interfaces, never a store's module
    from ..storage import BlobStore, MetadataStore, Recorder, Row

log = logging.getLogger("octomil_lite.conversions")

TARGETS = {"onnx": ".onnx", "tflite": ".tflite", "coreml": ".mlpackage.zip"}
MAX_PARITY_JSON = 16 * 1024  # a parity report is a handful of numbers; it is stored and served with the version


def _died_here(owner: str) -> bool:
    """Whether a lease owner (host:pid:nonce) was a process of this machine that no longer runs."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class ConversionPool:
    """`workers` asyncio tasks, each running one conversion child at a time; the event loop never waits on one."""

    def __init__(self, db: MetadataStore, blobs: BlobStore, sandbox: Sandbox, limits: Limits, workers: int,
                 now: Callable[[], str], lease: float):
        self.db = db
        self.sandbox = sandbox
        self.blobs = blobs
        self.limits = limits
        self.workers = workers
        self.now = now
        self.lease = lease
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        dead = [owner for owner in await self.db.lease_owners() if _died_here(owner)]
        if dead and (resumed := await self.db.expire_leases(dead)):
            log.info("resuming %d conversion(s) interrupted by the last shutdown", resumed)
        self._tasks = [asyncio.create_task(self._work(), name=f"convert-{i}") for i in range(self.workers)]
        self.wake()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def wake(self) -> None:
        self._wake.set()

    async def _work(self) -> None:
        while True:
            job = await self.db.claim_job(self.now(), self.owner, self.lease)
            if job is None:
                self._wake.clear()
                # Polled too: another process's new job, or a dead process's lease running out.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.lease / 2)
                continue
            try:
                await self._run_leased(job)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug here must not stop the pool; the job ends failed
                log.exception("conversion job %s crashed", job["seq"])
                await self.db.finish_job(job["seq"], self.owner, {"status": "failed",
                                                                  "reason": f"internal error: {exc}",
                                                                  "updated_at": self.now()})

    async def _run_leased(self, job: Row) -> None:
        """Run a job, renewing its lease; stop it if another process has taken it over."""
        run = asyncio.ensure_future(self._run(job))
        try:
            while not run.done():
                await asyncio.wait({run}, timeout=self.lease / 3)
                if not run.done() and not await self.db.renew_lease(job["seq"], self.owner, self.lease):
                    log.warning("conversion job %s was taken over by another process", job["seq"])
                    run.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await run
                    return
        except asyncio.CancelledError:
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)  # the child is killed before the loop closes
            raise
        await run

    async def _run(self, job: Row) -> None:
        output = self.blobs.tmp / f"convert-{uuid.uuid4().hex}.out"
        try:
            fields = await self._convert(job, output)
            if fields.get("status") != "ready":
                await self.db.finish_job(job["seq"], self.owner, {**fields, "updated_at": self.now()})
                return
            staged = await self.blobs.stage_file(output)
            fields.update(digest=staged.digest, size=staged.size, updated_at=self.now())

            async def publish(record: Recorder) -> None:
                await self.blobs.commit(staged, record)

            try:
                await self.db.finish_job(job["seq"], self.owner, fields, publish)
            finally:
                await staged.discard()
        finally:
            with contextlib.suppress(FileNotFoundError):
                output.unlink()

    async def _convert(self, job: Row, output: Path) -> dict[str, Any]:
        task, digest = "convert", job["digest"]
        if job["target"] in QUANTIZED:  # made from the version's ONNX form, not from its original bytes
            onnx = await self.db.get_artifact(job["version_seq"], "onnx")
            if onnx is None or onnx["status"] != "ready":
                return {"status": "failed", "reason": "the version has no ONNX form to quantize"}
            task, digest = "quantize", onnx["digest"]
        async with self.blobs.local_copy(digest) as src:
            return await self._convert_file(job, task, src, output)

    async def _convert_file(self, job: Row, task: str, src: Path, output: Path) -> dict[str, Any]:
        payload = {"kind": job["kind"], "framework_hint": job["format"], "target": job["target"],
                   "options": {"input_shape": json.loads(job["input_shape"])} if job["input_shape"] else {}}
        src.chmod(0o444)  # a root server's job runs as another uid (a blob is 0444 already; a download is not)
        try:
            result = await self.sandbox.run_task(task, payload, self.limits, JobFiles({"model": src}, output))
        except IsolationUnavailable as exc:
            return {"status": "unavailable", "reason": f"conversions are off on this server: {exc}"}
        except SandboxError as exc:
            return {"status": "failed", "reason": f"the conversion {exc}"}
        status = result.get("status")
        if status in ("failed", "impossible", "unavailable"):
            # The job is untrusted: whatever it reports is cut to one short line.
            return {"status": status, "reason": bounded_reason(result.get("reason") or "no reason given")}
        if status != "done":
            return {"status": "failed", "reason": "the converter returned no result"}
        size = output.stat().st_size
        if size == 0 or result.get("output_size") != size:
            return {"status": "failed", "reason": "the converter returned no complete output file"}
        try:
            parity = parity_json(result.get("parity"))
        except ValueError:
            return {"status": "failed", "reason": "the converter returned a malformed or oversized parity report"}
        signature = None
        if job["target"] == "onnx" or job["target"] in QUANTIZED:
            output.chmod(0o444)  # a root server's check job runs as another uid; the blob will be 0444 anyway
            try:  # a fresh job checks what the converting job wrote
                check = await self.sandbox.run_task("check-onnx", {}, CHECK_LIMITS, JobFiles({"model": output}))
            except SandboxError as exc:
                return {"status": "failed", "reason": f"checking the converted ONNX model {exc}"}
            if not check.get("ok"):
                reason = bounded_reason(f"the converted ONNX model is invalid: {check.get('reason')}")
                return {"status": "failed", "reason": reason}
            signature = json.dumps(check.get("signature"))
        return {"status": "ready", "reason": None, "signature": signature,
                "parity": parity,
                "converter": str(result.get("converter") or "")[:200] or None}


def parity_json(parity: Any) -> str | None:
    """The job's parity report as stored (None if it gave none); ValueError if it is not a small JSON object."""
    if parity is None:
        return None
    text = json.dumps(parity)
    if not isinstance(parity, dict) or len(text) > MAX_PARITY_JSON:
        raise ValueError("not a small JSON object")
    return text
