"""Warm jobs: isolated workers started ahead of time per framework family, each used for exactly one task.

A warm worker is an ordinary sandboxed job (the same `Sandbox.start`: namespaces, seccomp, cgroup and limits as
a fresh one) that has imported its family's frameworks and has seen no upload: its task and sealed copies of its
inputs arrive over a socket only when it is taken, and it is discarded after that one task. A family's workers
start on its first need (that task runs in a fresh job meanwhile), are refilled in the background, and are
ended when the family goes idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import socket
import subprocess
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .sandbox import (
    SOCKET_FD_ENV,
    HandoffFailed,
    JobFiles,
    Limits,
    Running,
    Sandbox,
    SandboxError,
    communicate,
    worker_command,
)

log = logging.getLogger("octomil_lite.warm")

WARM_MAX_INPUT_BYTES = 256 * 1024**2  # a warm job gets a sealed in-memory copy; larger inputs go to a fresh job

# source kind -> framework family whose imports a warm job makes ahead of time
_FAMILIES = {**dict.fromkeys(("pickle", "joblib", "skops", "xgboost-json", "xgboost-ubj", "lightgbm-text"),
                             "estimators"),
             **dict.fromkeys(("torch-export", "torchscript", "torch-zip", "torch-legacy"), "torch"),
             **dict.fromkeys(("keras", "hdf5", "savedmodel-zip", "tflite"), "tensorflow")}


def task_family(task: str, payload: dict[str, Any]) -> str | None:
    """Which warm family can run TASK: the ONNX checks, or the converter family of the source kind."""
    if task in ("check-onnx", "fold-onnx"):
        return "onnx-check"
    return _FAMILIES.get(str(payload.get("kind"))) if task == "convert" else None


def _input_bytes(files: JobFiles) -> int:
    return sum(os.stat(path).st_size for path in files.inputs.values())


@dataclass
class WarmWorker:
    """A job started ahead of time with its frameworks imported; it has seen no upload and runs exactly one task."""

    family: str
    id: str
    limits: Limits
    running: Running
    socket: socket.socket
    started: float  # time.monotonic()
    ready: bool = False  # it has said its imports are done

    def poll_ready(self) -> bool:
        if not self.ready:
            with contextlib.suppress(BlockingIOError, InterruptedError, OSError):
                self.ready = self.socket.recv(16, socket.MSG_DONTWAIT) == b"ready"
        return self.ready

    def memory_bytes(self) -> int:
        """What the job holds now: its cgroup's charge (0 where jobs have no cgroup)."""
        cgroup = self.running.cgroup
        if cgroup is not None:
            for path in cgroup.dirs:
                for name in ("memory.current", "memory.usage_in_bytes"):
                    with contextlib.suppress(OSError, ValueError):
                        return int((path / name).read_text())
        return 0

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.socket.close()
        self.running.close()


def _sealed_copy(path: Path) -> int:
    """A memfd holding PATH's bytes, sealed against any change: a warm job may read it, never write it."""
    fd = os.memfd_create("job-input", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        with open(path, "rb") as src:
            size = os.fstat(src.fileno()).st_size
            offset = 0
            while offset < size:
                copied = os.sendfile(fd, src.fileno(), offset, size - offset)
                if copied == 0:
                    break
                offset += copied
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                    | fcntl.F_SEAL_WRITE)
        os.lseek(fd, 0, os.SEEK_SET)
        return fd
    except BaseException:
        os.close(fd)
        raise


def start_warm(sandbox: Sandbox, family: str, worker_id: str, limits: Limits) -> WarmWorker:
    """A job that imports FAMILY's frameworks, then waits for its one task and inputs on a socket."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        argv = [*worker_command("--warm"), family, worker_id]
        running = sandbox.start(argv, limits, JobFiles(), {SOCKET_FD_ENV: theirs.fileno()})
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return WarmWorker(family, worker_id, limits, running, ours, time.monotonic())


def run_warm(worker: WarmWorker, task: str, payload: dict[str, Any], files: JobFiles,
             cancel: threading.Event | None = None) -> subprocess.CompletedProcess[bytes]:
    """Hand one task to a warm job (sealed copies of its inputs, the write end of a fresh output pipe), wait,
    then end the job. As in a fresh job, the job never holds a server file: the parent copies the pipe."""
    sent: list[int] = []
    running = worker.running
    try:
        for path in files.inputs.values():
            sent.append(_sealed_copy(path))
        output_pipe = None
        if files.output is not None:
            output_pipe = running.send_output_to(files.output, worker.limits.file_size_bytes)
        request = {"task": task, "payload": payload, "inputs": list(files.inputs), "output": output_pipe is not None}
        try:
            socket.send_fds(worker.socket, [json.dumps(request).encode()],
                            [*sent, output_pipe] if output_pipe is not None else sent)
        except OSError as exc:
            if files.output is not None:  # made by send_output_to above: the fresh job that runs instead makes it
                files.output.unlink(missing_ok=True)
            raise HandoffFailed(f"could not be handed to its warm worker ({exc})") from exc
        # Never read again: closed now, it cannot hold descriptors the job sends back (its output pipe's write
        # end, say, which would keep the copy below from ever seeing EOF).
        worker.socket.close()
        if output_pipe is not None:
            running.close_fd(output_pipe)  # the job holds it now: EOF comes when the job closes it
        assert running.proc is not None
        done = communicate(running.proc, b"", worker.limits, cancel, kill=running.kill)
        running.finish_output()
        return done
    finally:
        for fd in sent:
            with contextlib.suppress(OSError):
                os.close(fd)
        worker.close()


class WarmPool:
    """Up to `size` idle warm workers per family; a family unused for `idle_timeout` seconds keeps none."""

    def __init__(self, sandbox: Sandbox, size: int = 1, idle_timeout: float = 300.0):
        self.sandbox = sandbox
        self.size = size
        self.idle_timeout = idle_timeout
        self._idle: dict[str, list[WarmWorker]] = defaultdict(list)
        self._last_used: dict[str, float] = {}
        self._filling: dict[str, asyncio.Task[None]] = {}
        self._janitor: asyncio.Task[None] | None = None
        self._closed = False

    def take(self, task: str, payload: dict[str, Any], limits: Limits, files: JobFiles) -> WarmWorker | None:
        """An idle worker for TASK started with LIMITS (None: run a fresh job); the pool refills behind it."""
        family = task_family(task, payload)
        if family is None or self._closed or _input_bytes(files) > WARM_MAX_INPUT_BYTES:
            return None
        return self.take_family(family, limits)

    def take_family(self, family: str, limits: Limits) -> WarmWorker | None:
        self._last_used[family] = time.monotonic()
        alive = []
        for candidate in self._idle[family]:
            if candidate.running.proc is None or candidate.running.proc.poll() is not None:
                candidate.close()  # died while waiting (e.g. a limit): it was never handed a task
            else:
                alive.append(candidate)
        self._idle[family] = alive
        fitting = [w for w in alive if w.limits == limits]
        # A ready worker first; one still importing has a head start on a fresh job all the same.
        worker = next((w for w in fitting if w.poll_ready()), fitting[0] if fitting else None)
        if worker is not None:
            alive.remove(worker)
        self._refill(family, limits)
        if self._janitor is None:
            self._janitor = asyncio.create_task(self._retire_idle(), name="warm-janitor")
        return worker

    @staticmethod
    def run(worker: WarmWorker, task: str, payload: dict[str, Any], files: JobFiles,
            cancel: threading.Event) -> subprocess.CompletedProcess[bytes]:
        return run_warm(worker, task, payload, files, cancel)

    def memory_bytes(self) -> dict[str, int]:
        """Memory the idle workers hold now, per family."""
        return {family: sum(w.memory_bytes() for w in workers) for family, workers in self._idle.items() if workers}

    def idle_workers(self) -> dict[str, dict[str, int]]:
        """Per family: idle workers, and how many of them have finished importing."""
        return {family: {"idle": len(workers), "ready": sum(w.poll_ready() for w in workers)}
                for family, workers in self._idle.items() if workers}

    def _refill(self, family: str, limits: Limits) -> None:
        if family not in self._filling and len(self._idle[family]) < self.size:
            self._filling[family] = asyncio.create_task(self._fill(family, limits), name=f"warm-{family}")

    async def _fill(self, family: str, limits: Limits) -> None:
        try:
            while not self._closed and len(self._idle[family]) < self.size:
                worker = await asyncio.to_thread(start_warm, self.sandbox, family, uuid.uuid4().hex, limits)
                if self._closed:
                    await asyncio.to_thread(worker.close)
                    return
                self._idle[family].append(worker)
        except SandboxError as exc:
            log.warning("could not start a warm %s worker: %s", family, exc)
        finally:
            self._filling.pop(family, None)

    async def _retire_idle(self) -> None:
        while not self._closed:
            await asyncio.sleep(min(self.idle_timeout / 4, 5.0))
            now = time.monotonic()
            for family, workers in self._idle.items():
                if workers and now - self._last_used.get(family, now) >= self.idle_timeout:
                    retired, workers[:] = list(workers), []
                    log.info("retiring %d idle warm %s worker(s)", len(retired), family)
                    for worker in retired:
                        await asyncio.to_thread(worker.close)

    async def close(self) -> None:
        self._closed = True
        if self._janitor is not None:
            self._janitor.cancel()
        # A fill's start cannot be cancelled mid-thread; awaited, it ends the worker it started itself.
        for task in [*self._filling.values(), *([self._janitor] if self._janitor else [])]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for workers in self._idle.values():
            for worker in workers:
                await asyncio.to_thread(worker.close)
            workers.clear()
