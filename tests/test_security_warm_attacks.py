"""Attacks on the warm pool's handoff from inside a warm job (convert/warm.py), with the real sandbox.

The job's program is replaced by hostile code (the project's rule: a job's author has arbitrary code execution
once its task has arrived); everything else is the real `start_warm` / `run_warm`: the same socket, sealed memfd
inputs and output pipe. Breaks found here fail until fixed; the rest show an attack failing.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from test_security_isolation import data_dir, marked_processes, sandbox  # noqa: F401 - the real, probed sandbox

from octomil_lite.convert import job_process, warm
from octomil_lite.convert.sandbox import JobFiles, Limits, Sandbox, SandboxError

LIMITS = Limits(timeout=30, memory_bytes=1024**3, scratch_bytes=64 * 1024**2, max_processes=32,
                file_size_bytes=1024**2)

# What a warm job does before its task, then the hostile part: TASK's fds are the sealed inputs (+ output pipe).
_TAKE_TASK = """
import json, os, socket, sys, time
sock = socket.socket(fileno=int(os.environ.pop("OCTOMIL_JOB_SOCKET_FD")))
sock.send(b"ready")
message, fds, _, _ = socket.recv_fds(sock, 1 << 20, 16)
request = json.loads(message)
inputs, output = fds[:len(request["inputs"])], (fds[-1] if request["output"] else None)
"""


def _hostile_warm(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch, code: str, marker: str,  # noqa: F811
                  files: JobFiles, limits: Limits = LIMITS, wait: float = 60) -> Any:
    """Start a warm job running CODE after its task arrives, hand it one task; run_warm's result (or exception).
    Fails if the server side is still waiting after WAIT seconds."""
    program = f"# {marker}\n" + _TAKE_TASK + textwrap.dedent(code)
    monkeypatch.setattr(warm, "worker_command", lambda task: [sys.executable, "-I", "-c", program])
    worker = warm.start_warm(sandbox, "onnx-check", "hostile", limits)
    deadline = time.monotonic() + 60
    while not worker.poll_ready():
        assert time.monotonic() < deadline and worker.running.proc.poll() is None, "the hostile job never started"
        time.sleep(0.02)
    outcome: list[Any] = []

    def hand_off() -> None:
        try:
            outcome.append(warm.run_warm(worker, "check-onnx", {}, files))
        except Exception as exc:  # noqa: BLE001 - the test judges it
            outcome.append(exc)

    thread = threading.Thread(target=hand_off, daemon=True)
    thread.start()
    thread.join(wait)
    assert not thread.is_alive(), f"the server still waits on the warm job {wait} s after its task was handed over"
    return outcome[0]


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"original bytes" * 100)
    path.chmod(0o444)
    return path


def test_a_warm_job_sending_its_output_pipe_back_does_not_hang_the_server(
        sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch, model_file: Path, tmp_path: Path) -> None:  # noqa: F811
    # The job passed the write end of its output pipe back over the socket (SCM_RIGHTS): queued in the server's
    # end, which stayed open until the copier saw EOF, which never came. The executor thread hung forever; a few
    # such uploads took every thread of the server's default executor (asyncio.to_thread too).
    marker = f"warm-pipe-back-{os.getpid()}"
    gc.collect()  # a finished job's Popen (its stdio pipes) is freed by the cycle collector
    fds_before = len(os.listdir("/proc/self/fd"))
    result = _hostile_warm(sandbox, monkeypatch, """
        os.write(output, b"partial")
        socket.send_fds(sock, [b"keep this"], [output, *inputs])
        print(json.dumps({"ok": True}))
    """, marker, JobFiles({"model": model_file}, tmp_path / "out"))
    # Refused (the server's end is closed after the handoff) or stopped after the job's end; never a hang.
    assert isinstance(result, (SandboxError, subprocess.CompletedProcess)), result
    assert marked_processes(marker) == []
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) <= fds_before  # nothing the job sent back is held by the server


def test_a_warm_job_cannot_change_its_sealed_inputs(
        sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch, model_file: Path) -> None:  # noqa: F811
    done = _hostile_warm(sandbox, monkeypatch, """
        import mmap
        seen = {}
        fd = inputs[0]
        for name, attack in (("pwrite", lambda: os.pwrite(fd, b"X", 0)),
                             ("truncate", lambda: os.ftruncate(fd, 0)),
                             ("reopen", lambda: os.pwrite(os.open(f"/proc/self/fd/{fd}", os.O_RDWR), b"X", 0)),
                             ("mmap", lambda: mmap.mmap(fd, 1, mmap.MAP_SHARED, mmap.PROT_WRITE))):
            try:
                attack()
                seen[name] = "done"
            except OSError as exc:
                seen[name] = exc.errno
        print(json.dumps(seen))
    """, f"warm-sealed-{os.getpid()}", JobFiles({"model": model_file}))
    seen = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert set(seen.values()) <= {errno.EPERM, errno.EACCES, errno.EBADF}, seen
    assert model_file.read_bytes() == b"original bytes" * 100


def test_a_warm_jobs_output_past_the_cap_is_stopped(
        sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch, model_file: Path, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "out"
    result = _hostile_warm(sandbox, monkeypatch, """
        if os.fork() == 0:  # a second writer holding the pipe too
            os.setsid()
        while True:
            os.write(output, b"A" * 65536)
    """, f"warm-flood-{os.getpid()}", JobFiles({"model": model_file}, out))
    assert isinstance(result, SandboxError) and "larger than" in str(result), result
    assert out.stat().st_size == 0


def test_an_output_pipe_kept_open_past_the_jobs_end_is_not_waited_for(monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    # However the write end outlives the job (a descriptor in flight in some socket), the server's copy ends.
    monkeypatch.setattr(job_process, "OUTPUT_EOF_GRACE", 0.5)
    pipe_r, pipe_w = os.pipe()
    out_file = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT, 0o600)
    copier = job_process.OutputCopier(pipe_r, out_file, 1 << 20)
    try:
        copier.start(kill=lambda: None)
        os.write(pipe_w, b"partial")
        started = time.monotonic()
        with pytest.raises(SandboxError, match="open after it ended"):
            copier.finish()
        assert time.monotonic() - started < 5
        assert os.path.getsize(tmp_path / "out") == 0
    finally:
        copier.release()
        for fd in (pipe_r, pipe_w, out_file):
            os.close(fd)
