"""The processes of one job, below the namespaces: limits, a root server's uid drop, killing the whole tree,
bounded stdio and the capped output pipe. `sandbox.Sandbox` builds the namespaces around them."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import resource
import select
import shlex
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HOST_JOB_UID = 2_147_480_000  # no account's uid: what a root server's jobs are on the host, never uid 0
HOST_JOB_UIDS = 1000  # each job takes the next of this many uids from HOST_JOB_UID on
_next_uid = itertools.count(random.randrange(HOST_JOB_UIDS))  # next() on a count is atomic under the GIL


def next_host_uid() -> int:
    """A root server's next job uid. One per job, not one for all: the kernel counts RLIMIT_NPROC per host uid
    (also across user namespaces), so a shared uid would let one job's processes, or a killed job's exiting
    ones, use up the next job's process limit, and jobs could signal each other's leftovers."""
    return HOST_JOB_UID + next(_next_uid) % HOST_JOB_UIDS


@dataclass(frozen=True)
class Limits:
    """Limits for one job, for all its processes together where the kernel allows it."""

    timeout: float = 600.0
    memory_bytes: int = 8 * 1024**3  # the job-wide cgroup limit (scratch tmpfs pages count too)
    cpu_seconds: int = 1200  # per process
    file_size_bytes: int = 16 * 1024**3  # largest file it may write, the output included
    scratch_bytes: int = 4 * 1024**3
    max_processes: int = 256  # threads count too (TensorFlow starts dozens)
    cpu_cores: float = 1.0  # CPU bandwidth of the whole job, so the server keeps the rest


CHECK_LIMITS = Limits(timeout=300.0, cpu_seconds=300)  # onnx.checker on an upload or a converter's output


class SandboxError(Exception):
    """The job did not return a result (timeout, crash, limit hit)."""


class HandoffFailed(SandboxError):
    """A warm job died before its task reached it (nothing of the task ran): run it in a fresh job."""


class IsolationUnavailable(SandboxError):
    """Jobs cannot be isolated on this machine; the message names the missing piece and the fix."""


class Staging:
    """A root server runs bwrap as a job uid of its own (`next_host_uid`), who cannot reach sources like a 0700
    /root: each is bound first (as root, in a private mount namespace of the job's own) onto a mount point that
    uid can reach."""

    PREFIX = "octomil-job-"
    MAX_AGE = 2 * 24 * 3600  # a leftover older than this cannot belong to a running job (timeouts are shorter)

    def __init__(self) -> None:
        self.uid = next_host_uid()
        self.dir = Path(tempfile.mkdtemp(prefix=self.PREFIX))
        os.chmod(self.dir, 0o711)
        self.binds: list[tuple[str, Path]] = []

    def source(self, path: str) -> str:
        mount_point = self.dir / str(len(self.binds))
        if os.path.isdir(path):
            mount_point.mkdir()
        else:
            mount_point.touch()
        self.binds.append((path, mount_point))
        return str(mount_point)

    def wrap(self, command: list[str], limits: Limits) -> list[str]:
        """unshare, sh and prlimit exec in place, so the server's child is bwrap itself (its PID, death signal)."""
        script = [f"mount --bind {shlex.quote(src)} {shlex.quote(str(dst))}" for src, dst in self.binds]
        rlimits = " ".join(f"--{name}={value}:{value}" for name, value in (
            ("as", limits.memory_bytes), ("cpu", limits.cpu_seconds), ("fsize", limits.file_size_bytes),
            ("core", 0), ("nofile", 1024), ("nproc", limits.max_processes)))
        script.append(f"exec prlimit {rlimits} -- setpriv --reuid {self.uid} --regid {self.uid} "
                      '--clear-groups -- "$@"')
        return ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-ec", "\n".join(script), "sh",
                *command]

    @classmethod
    def sweep(cls) -> int:
        """Remove staging directories a killed root server left in /tmp (empty mount points on the host)."""
        removed = 0
        for left in Path(tempfile.gettempdir()).glob(f"{cls.PREFIX}*"):
            with contextlib.suppress(OSError):
                if time.time() - left.lstat().st_mtime < cls.MAX_AGE or left.is_symlink():
                    continue
                for point in left.iterdir():
                    point.rmdir() if point.is_dir() and not point.is_symlink() else point.unlink()
                left.rmdir()
                removed += 1
        return removed

    def remove(self) -> None:
        # rmdir/unlink, never rmtree: on the host these are empty mount points (the binds live in the job's namespace).
        for _, mount_point in self.binds:
            with contextlib.suppress(OSError):
                mount_point.rmdir() if mount_point.is_dir() else mount_point.unlink()
        with contextlib.suppress(OSError):
            self.dir.rmdir()


def set_rlimits(pid: int, limits: Limits, own_user_namespace: bool = True) -> None:
    """Per-process limits, inherited by everything the job starts (the cgroup bounds the sum).

    RLIMIT_NPROC counts the job's processes in its own user namespace (a root server's job has its own host uid, not
    exempt uid 0); the pids cgroup bounds them too. Unisolated, it would count the server's."""
    for res, value in ((resource.RLIMIT_AS, limits.memory_bytes), (resource.RLIMIT_CPU, limits.cpu_seconds),
                       (resource.RLIMIT_FSIZE, limits.file_size_bytes), (resource.RLIMIT_CORE, 0),
                       (resource.RLIMIT_NOFILE, 1024),
                       *([(resource.RLIMIT_NPROC, limits.max_processes)] if own_user_namespace else [])):
        with contextlib.suppress(ProcessLookupError):
            resource.prlimit(pid, res, (value, value))


def kill_tree(proc: subprocess.Popen[bytes], init_pid: int | None) -> None:
    """Killing the PID namespace's init kills every process in the namespace; bwrap then exits."""
    for pid in (init_pid, proc.pid):
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


OUTPUT_EOF_GRACE = 5.0  # seconds from the job's end to its output pipe's EOF


class OutputCopier:
    """Copies the job's output pipe into the host file, at most CAP bytes; more kills the job.

    A job can keep the pipe's write end alive past its own end (passed as SCM_RIGHTS into a socket the server
    holds), so the copy never waits for EOF unbounded: `finish` and `stop` end it."""

    def __init__(self, pipe_r: int, out_file: int, cap: int):
        self.pipe_r, self.out_file, self.cap = pipe_r, out_file, cap
        self.error: str | None = None
        self._thread: threading.Thread | None = None
        self._stop_r, self._stop_w = os.pipe()

    def start(self, kill: Any) -> None:
        self._thread = threading.Thread(target=self._copy, args=(kill,), name="job-output", daemon=True)
        self._thread.start()

    def _copy(self, kill: Any) -> None:
        written = 0
        poller = select.poll()
        poller.register(self.pipe_r, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        try:
            while True:
                if any(fd == self._stop_r for fd, _ in poller.poll()):
                    self.error = self.error or "kept its output pipe open after it ended and was stopped"
                    os.ftruncate(self.out_file, 0)
                    return
                chunk = os.read(self.pipe_r, 1 << 20)
                if not chunk:
                    return
                written += len(chunk)
                if written > self.cap:
                    self.error = f"wrote an output larger than {self.cap} bytes and was stopped"
                    kill()
                    os.ftruncate(self.out_file, 0)
                    return
                view = memoryview(chunk)
                while view:
                    view = view[os.write(self.out_file, view):]
        except OSError as exc:  # a full disk, say: the job fails, the partial file is emptied
            self.error = f"output could not be written ({exc.strerror})"
            kill()
            with contextlib.suppress(OSError):
                os.ftruncate(self.out_file, 0)

    def stop(self) -> None:
        """End the copy now (the job is gone): what has not reached EOF is a failed output."""
        with contextlib.suppress(OSError):
            os.write(self._stop_w, b"x")
        self.join()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def finish(self) -> None:
        """Wait for the output's EOF (call once the job has ended), at most OUTPUT_EOF_GRACE seconds."""
        if self._thread is not None:
            self._thread.join(OUTPUT_EOF_GRACE)
        self.stop()
        if self.error:
            raise SandboxError(self.error)

    def release(self) -> None:
        for fd in (self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)


class Running:
    """A started job: bwrap (proc), its namespace's init, cgroup, staging, output copier and the descriptors the
    parent holds for it. `close` ends every process of the job and releases the rest."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.init_pid: int | None = None
        self.cgroup: Any = None  # cgroups.JobCgroup
        self.staging: Staging | None = None
        self.copier: OutputCopier | None = None
        self.opened: list[int] = []

    def kill(self) -> None:
        if self.proc is not None:
            kill_tree(self.proc, self.init_pid)

    def send_output_to(self, path: Path, cap: int) -> int:
        """The write end of a pipe copied into a new file at PATH (at most CAP bytes), for the job to write; the
        job never holds the file itself (it could fchmod it or reopen it read-write)."""
        out_file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self.opened.append(out_file)
        pipe_r, pipe_w = os.pipe()
        self.opened += [pipe_r, pipe_w]
        self.copier = OutputCopier(pipe_r, out_file, cap)
        self.copier.start(self.kill)
        return pipe_w

    def close_fd(self, fd: int) -> None:
        """Close the parent's copy of a descriptor the job now holds (so EOF comes when the job closes it)."""
        os.close(fd)
        self.opened.remove(fd)

    def finish_output(self) -> None:
        if self.copier is not None:
            self.copier.finish()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            kill_tree(self.proc, self.init_pid)
            self.proc.wait()
        if self.proc is not None:  # now, not when the Popen is collected (a traceback may keep it for long)
            for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
        if self.copier is not None:
            self.copier.stop()  # before its descriptors close; the job is gone, so no EOF is waited for
            self.copier.release()
        for fd in self.opened:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.opened = []
        if self.cgroup is not None:
            self.cgroup.destroy()
            self.cgroup = None
        if self.staging is not None:
            self.staging.remove()
            self.staging = None


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


MAX_JOB_STDIO = 4 * 1024**2  # a result line and a traceback; more is an attack on the server's memory


def communicate(proc: subprocess.Popen[bytes], stdin: bytes, limits: Limits, cancel: threading.Event | None,
                 kill: Any) -> subprocess.CompletedProcess[bytes]:
    """Feed stdin and collect stdout/stderr, at most MAX_JOB_STDIO bytes together, within the timeout."""
    import selectors

    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    deadline = time.monotonic() + limits.timeout
    outputs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    pending = memoryview(stdin)
    stdin_fd = proc.stdin.fileno()
    with selectors.DefaultSelector() as sel:
        for fd in outputs:
            sel.register(fd, selectors.EVENT_READ)
        if pending:
            os.set_blocking(stdin_fd, False)
            sel.register(stdin_fd, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        while True:
            step = min(0.5, max(deadline - time.monotonic(), 0.001))
            events = sel.select(step) if sel.get_map() else []
            if not events and not sel.get_map():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(step)  # both pipes closed: only the exit is left to wait for
            for key, _ in events:
                if key.fd == stdin_fd:
                    try:
                        pending = pending[os.write(stdin_fd, pending[:1 << 16]):]
                    except BrokenPipeError:
                        pending = pending[:0]
                    if not pending:
                        sel.unregister(stdin_fd)
                        proc.stdin.close()
                    continue
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                outputs[key.fd] += chunk
                if sum(map(len, outputs.values())) > MAX_JOB_STDIO:
                    kill()
                    proc.wait()
                    raise SandboxError(f"wrote more than {MAX_JOB_STDIO} bytes to its standard output and error "
                                       "and was stopped")
            if not sel.get_map() and proc.poll() is not None:
                return subprocess.CompletedProcess(proc.args, proc.returncode, bytes(outputs[proc.stdout.fileno()]),
                                                   bytes(outputs[proc.stderr.fileno()]))
            if cancel is not None and cancel.is_set():
                kill()
                proc.wait()
                raise SandboxError("was cancelled")
            if time.monotonic() >= deadline:
                kill()
                proc.wait()
                raise SandboxError(f"took longer than {limits.timeout:.0f} s and was stopped")


def worker_result(done: subprocess.CompletedProcess[bytes]) -> dict[str, Any]:
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
        if done.returncode < 0 or done.returncode >= 128:
            signum = -done.returncode if done.returncode < 0 else done.returncode - 128
            raise SandboxError(f"was killed by signal {signum} (likely a resource limit) {tail[0][:300]}".strip())
        raise SandboxError(f"failed: {tail[0][:300]}".strip())
    try:
        result = json.loads(done.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise SandboxError("returned no result") from None
    if not isinstance(result, dict):
        raise SandboxError("returned no result")
    return result
