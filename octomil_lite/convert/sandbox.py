"""Run a task on untrusted model bytes in a child process with limits, never in the server."""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import resource
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class Limits:
    """Resource limits for one child process."""

    timeout: float = 600.0
    memory_bytes: int = 8 * 1024**3
    cpu_seconds: int = 1200
    file_size_bytes: int = 64 * 1024**3


CHECK_LIMITS = Limits(timeout=300.0, cpu_seconds=300)  # onnx.checker on an upload or a converter's output


class SandboxError(Exception):
    """The child did not return a result (timeout, crash, limit hit)."""


def _drop_network() -> None:
    # A new network namespace has only a down loopback: no way out. Best effort.
    libc = ctypes.CDLL(None, use_errno=True)
    flags = CLONE_NEWNET if os.geteuid() == 0 else CLONE_NEWUSER | CLONE_NEWNET
    libc.unshare(flags)


def _preexec(limits: Limits) -> None:
    os.setsid()
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_size_bytes, limits.file_size_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _drop_network()


def _child_env() -> dict[str, str]:
    # Empty environment but for thread caps, so a conversion cannot starve the server of cores.
    return {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "TF_CPP_MIN_LOG_LEVEL": "3", "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1",
            **{k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if k in os.environ}}


def worker_command(task: str) -> list[str]:
    """The argv of a worker child: a frozen build re-enters its own executable in the hidden worker mode
    (octomil_lite/__main__.py), never a copy of code extracted elsewhere; otherwise this interpreter, isolated."""
    if getattr(sys, "frozen", False):
        return [sys.executable, "__worker__", task]
    return [sys.executable, "-I", "-m", "octomil_lite.convert.worker", task]


async def run_task(task: str, payload: dict[str, Any], limits: Limits, workdir_parent: Path) -> dict[str, Any]:
    """Run `octomil_lite.convert.worker` TASK in a child; return the JSON object it prints."""
    workdir = Path(tempfile.mkdtemp(prefix="sandbox-", dir=workdir_parent))
    try:
        proc = await asyncio.create_subprocess_exec(
            *worker_command(task),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            cwd=workdir, env=_child_env(), preexec_fn=lambda: _preexec(limits),
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(json.dumps(payload).encode()), limits.timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise SandboxError(f"took longer than {limits.timeout:.0f} s and was stopped") from None
        except asyncio.CancelledError:
            proc.kill()
            await proc.wait()
            raise
        if proc.returncode != 0:
            tail = err.decode(errors="replace").strip().splitlines()[-1:] or [""]
            if proc.returncode < 0:
                raise SandboxError(f"the worker was killed by signal {-proc.returncode} (likely a resource limit) "
                                   f"{tail[0]}".strip())
            raise SandboxError(f"the worker failed: {tail[0]}".strip())
        try:
            result = json.loads(out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise SandboxError("the worker returned no result") from None
        if not isinstance(result, dict):
            raise SandboxError("the worker returned no result")
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
