"""A check run as an isolated job on files the registry holds, its failures turned into the API's errors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .convert.sandbox import IsolationUnavailable, JobFiles, Limits, Sandbox, SandboxError
from .errors import BadRequest, ServiceUnavailable
from .storage import Row


@dataclass(frozen=True)
class CheckWording:
    """How a check's three failures read: no isolation here (503), the job failed (400), the file is bad (400)."""

    unavailable: str  # "<what> ... in an isolated job"
    failed: str  # "<what> could not be ..."
    refused: str  # "<what> is not ..."


async def run_check(sandbox: Sandbox, task: str, payload: Row, limits: Limits, inputs: dict[str, Path],
                    output: Path | None, wording: CheckWording) -> Row:
    """TASK on INPUTS (bound read-only into the job), its file result written to OUTPUT; the job's JSON result."""
    for path in inputs.values():
        path.chmod(0o444)  # a root server's job runs as another uid; a committed blob is 0444 anyway
    try:
        result = await sandbox.run_task(task, payload, limits, JobFiles(inputs, output))
    except IsolationUnavailable as exc:
        raise ServiceUnavailable(f"{wording.unavailable}, and {exc}.") from exc
    except SandboxError as exc:
        raise BadRequest(f"{wording.failed}: {exc}.") from exc
    if not result.get("ok"):
        raise BadRequest(f"{wording.refused}: {result.get('reason')}.")
    return result
