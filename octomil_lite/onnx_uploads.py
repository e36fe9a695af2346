"""ONNX uploads: their structure checked (weights walked in the server, never parsed) and `onnx.checker` run in
an isolated job; an external-weights file folded into a self-contained model in a job."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from .checked_jobs import CheckWording, run_check
from .convert.onnx_skeleton import MalformedOnnx, SkeletonTooLarge, skeleton_of
from .convert.sandbox import CHECK_LIMITS, Sandbox
from .errors import BadRequest
from .lifecycle import UploadedFile
from .storage import BlobStore, Row, StagedBlob

_ONNX_CHECK = CheckWording(unavailable="ONNX uploads are checked in an isolated job",
                           failed="The ONNX model could not be checked", refused="The file is not a valid ONNX model")


class OnnxUploadChecks:
    """What an ONNX upload goes through before its version row is written."""

    def __init__(self, sandbox: Sandbox, blobs: BlobStore):
        self.sandbox = sandbox
        self.blobs = blobs

    async def checked(self, staged: StagedBlob, data: UploadedFile | None) -> tuple[StagedBlob, Any]:
        """Validate an ONNX upload in a job; with external weights, fold them into one self-contained file."""
        async with staged.local_path() as path:
            if data is None:
                return staged, await self._checked_skeleton(path)
            folded = self.blobs.tmp / f"{path.name}.folded.onnx"
            name = os.path.basename(data.filename.replace("\\", "/"))
            bound = name if name not in ("", ".", "..") and "\x00" not in name else "onnx_data"
            try:
                async with data.staged.local_path() as data_path:
                    inputs = {"model": path, f"data/{bound}": data_path}
                    result = await self._job("fold-onnx", {"data_name": name}, inputs, folded)
            except BaseException:
                folded.unlink(missing_ok=True)
                raise
        return await self.blobs.stage_file(folded), result.get("signature")

    async def _checked_skeleton(self, path: Path) -> Any:
        """Check the model's structure in a job (weights walked here, never parsed); its signature."""
        try:
            skeleton = await asyncio.to_thread(skeleton_of, path)
        except MalformedOnnx as exc:
            raise BadRequest(f"The file is not a valid ONNX model: {exc}.") from None
        except SkeletonTooLarge:  # weights outside raw_data: the job reads the whole file
            return (await self._job("check-onnx", {}, {"model": path})).get("signature")
        copy = self.blobs.tmp / f"{path.name}.skeleton.onnx"
        try:
            await asyncio.to_thread(copy.write_bytes, skeleton)
            return (await self._job("check-onnx", {}, {"model": copy})).get("signature")
        finally:
            copy.unlink(missing_ok=True)

    async def _job(self, task: str, payload: Row, inputs: dict[str, Path], out: Path | None = None) -> Row:
        return await run_check(self.sandbox, task, payload, CHECK_LIMITS, inputs, out, _ONNX_CHECK)
