"""Run a task on untrusted model bytes in an isolated job: bubblewrap namespaces, seccomp, a job-wide cgroup.

Every job is assumed hostile (arbitrary code execution inside it). The job gets its own user, mount, PID, IPC,
network, UTS and cgroup namespaces, runs as uid/gid 65534 with no capabilities and no_new_privs, sees only the
Python environment and system libraries read-only, a size-limited tmpfs scratch (its only writable place) and
its input file read-only; its result leaves through one file descriptor the parent opened. The whole job tree
shares one memory and process limit (cgroup), and killing the PID namespace's init ends every process in it.

Outside its user namespace a job has its bwrap's uid: the server's, or a uid of its own when the server is root
(job_process.next_host_uid; as uid 0 it could write anything /proc or a mount lets through). So a job must never
hold a descriptor of a server file: it could fchmod it or reopen it read-write through /proc/self/fd. Inputs are
bind-mounted read-only and must be readable by the job's host uid; the output leaves through a pipe the parent
copies. The process plumbing (limits, killing the tree, bounded stdio, the output pipe) is in job_process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Protocol

from .cgroups import Cgroups, JobCgroup, find_cgroups
from .job_process import (
    CHECK_LIMITS,
    HandoffFailed,
    IsolationUnavailable,
    Limits,
    Running,
    SandboxError,
    Staging,
    communicate,
    kill_group,
    set_rlimits,
    worker_result,
)
from .seccomp import seccomp_program

# The job contract callers use, with the process-level types it is built on (defined in job_process).
__all__ = ["CHECK_LIMITS", "INPUT_DIR", "INPUT_DIR_ENV", "OUTPUT_FD_ENV", "SOCKET_FD_ENV", "HandoffFailed",
           "Isolation", "IsolationUnavailable", "JobFiles", "Limits", "Running", "Sandbox", "SandboxError",
           "communicate", "job_input", "worker_command"]

log = logging.getLogger("octomil_lite.sandbox")

JOB_UID = 65534  # "nobody" inside the job's user namespace
SCRATCH = "/scratch"
INPUT_DIR = "/job"
INPUT_DIR_ENV = "OCTOMIL_JOB_INPUT_DIR"  # set where inputs are not under /job: unisolated and warm jobs
OUTPUT_FD_ENV = "OCTOMIL_JOB_OUT_FD"
SOCKET_FD_ENV = "OCTOMIL_JOB_SOCKET_FD"  # a warm job's end of the socket its one task and inputs arrive on
BWRAP = "bwrap"
_BWRAP_FIX = "install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap)"
_USERNS_FIX = ("allow user namespaces (sysctl kernel.unprivileged_userns_clone=1, user.max_user_namespaces>0; "
               "on Ubuntu 24.04 also kernel.apparmor_restrict_unprivileged_userns=0)")


@dataclass(frozen=True)
class Isolation:
    """What this machine offers, found once at start (`probe`)."""

    available: bool
    reason: str | None = None  # why not, and the fix
    containment: str = "none"  # "cgroup v1", "cgroup v2" or "rlimits" (per process only)
    unsafe: bool = False  # the operator chose --unsafe-conversions: jobs run unisolated

    def as_dict(self) -> dict[str, Any]:
        if self.unsafe:
            return {"isolated": False, "unsafe_conversions": True,
                    "reason": f"started with --unsafe-conversions: conversion jobs run WITHOUT isolation "
                              f"({self.reason or 'chosen by the operator'})"}
        return {"isolated": self.available, "unsafe_conversions": False, "containment": self.containment,
                **({"reason": self.reason} if self.reason else {})}


class WarmSource(Protocol):
    """Jobs started ahead of time (convert/warm.py): `take` one for TASK (None: run a fresh job), `run` it once."""

    def take(self, task: str, payload: dict[str, Any], limits: Limits, files: JobFiles) -> Any: ...

    def run(self, worker: Any, task: str, payload: dict[str, Any], files: JobFiles,
            cancel: threading.Event) -> subprocess.CompletedProcess[bytes]: ...


@dataclass
class JobFiles:
    """What one job may touch: input files bound read-only under /job, one output file descriptor."""

    inputs: dict[str, Path] = field(default_factory=dict)  # name under /job -> host path
    output: Path | None = None  # host path the parent creates; the job writes through an fd

    def __post_init__(self) -> None:
        for name in self.inputs:
            if "\x00" in name or any(part in ("", ".", "..") for part in name.split("/")):
                raise SandboxError(f"cannot give a job an input named {name[:100]!r}")


# --- the launcher --------------------------------------------------------------------------------------------

@cache
def _read_only_roots() -> tuple[Path, ...]:
    """What a job needs to run Python: system libraries, the interpreter, the environment and this package."""
    package = Path(__file__).resolve().parent.parent  # octomil_lite/ (an editable install lives outside sys.prefix)
    # A frozen build's executable sits in its own unpacked directory (0755) inside a 0700 cache: bind only that,
    # since a root server's job uid could not pass the cache directory's mode.
    executable = Path(sys.executable).resolve()
    interpreter = executable.parent if getattr(sys, "frozen", False) else executable.parent.parent
    roots = [Path("/usr"), Path(sys.base_prefix), Path(sys.prefix), package, interpreter]
    unique: list[Path] = []
    for root in sorted({r.resolve() for r in roots if r.exists()}, key=lambda p: len(p.parts)):
        if not any(root.is_relative_to(u) for u in unique):
            unique.append(root)
    return tuple(unique)


def _system_links() -> list[str]:
    """/lib, /lib64, /bin, /sbin: symlinks into /usr on merged-/usr systems, else bound read-only."""
    args: list[str] = []
    for name in ("lib", "lib64", "lib32", "bin", "sbin"):
        path = Path("/") / name
        if path.is_symlink():
            args += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            args += ["--ro-bind", str(path), str(path)]
    for etc in ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/localtime"):
        if os.path.exists(etc):
            args += ["--ro-bind", etc, etc]
    return args


def job_input(name: str) -> str:
    """Inside a job: the path of input NAME (read-only)."""
    return str(Path(os.environ.get(INPUT_DIR_ENV, INPUT_DIR)) / name)


def job_env() -> dict[str, str]:
    # Nothing of the server's environment but thread caps, so a job cannot starve the server of cores.
    return {"PATH": "/usr/bin:/bin", "HOME": SCRATCH, "TMPDIR": SCRATCH, "USER": "nobody", "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "3", "TF_NUM_INTRAOP_THREADS": "1",
            "TF_NUM_INTEROP_THREADS": "1",
            **{k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if k in os.environ}}


def worker_command(task: str) -> list[str]:
    """The argv of a worker child: a frozen build re-enters its own executable in the hidden worker mode
    (octomil_lite/__main__.py), never a copy of code extracted elsewhere; otherwise this interpreter, isolated."""
    if getattr(sys, "frozen", False):
        return [sys.executable, "__worker__", task]
    return [sys.executable, "-I", "-m", "octomil_lite.convert.worker", task]


def _bwrap_failed(proc: subprocess.Popen[bytes]) -> SandboxError:
    """bwrap exited before the job ran: its own last words are the reason."""
    proc.wait(5)
    tail = proc.stderr.read().decode(errors="replace")[-300:]  # type: ignore[union-attr]
    return SandboxError(f"bubblewrap failed: {tail.strip()}")


class Sandbox:
    """Starts jobs. `isolated=False` is the operator's --unsafe-conversions: a plain child process."""

    def __init__(self, hidden: list[Path], isolated: bool = True, allow_unsafe: bool = False):
        self.hidden = [p.resolve() for p in hidden]  # never visible to a job even if under a bound root
        self.isolated = isolated
        self.allow_unsafe = allow_unsafe  # --unsafe-conversions: run unisolated where isolation is unavailable
        self._cgroups: Cgroups | None = None
        self.isolation = Isolation(available=False, reason="not probed yet")
        self.warm: WarmSource | None = None  # jobs started ahead per framework family (convert/warm.py)

    def probe(self) -> Isolation:
        """Find out once whether jobs can be isolated here; the answer shows in /health and the log."""
        if not self.isolated:
            self.isolation = Isolation(available=False, unsafe=True)
            return self.isolation
        self.isolation = self._probe()
        if not self.isolation.available and self.allow_unsafe:
            self.isolated = False
            self.isolation = Isolation(False, self.isolation.reason, unsafe=True)
            log.warning("!!! --unsafe-conversions: conversion jobs run WITHOUT isolation (%s); an uploaded model "
                        "file can take over this server !!!", self.isolation.reason)
        elif not self.isolation.available:
            log.error("conversions are off: %s", self.isolation.reason)
        return self.isolation

    def _probe(self) -> Isolation:
        if shutil.which(BWRAP) is None:
            return Isolation(False, f"bubblewrap ('bwrap') is not installed: {_BWRAP_FIX}")
        if os.geteuid() == 0 and not all(shutil.which(t) for t in ("unshare", "setpriv", "prlimit", "mount")):
            return Isolation(False, "a root server drops its jobs to another uid with util-linux's unshare, "
                                    "setpriv, prlimit and mount, some of which are missing: install util-linux")
        try:
            seccomp_program()
        except (ImportError, OSError, RuntimeError) as exc:
            return Isolation(False, f"seccomp filters cannot be built ({type(exc).__name__}: {exc}): "
                                    "pip install pyseccomp and install libseccomp2")
        try:
            self._cgroups = find_cgroups()
        except OSError:
            self._cgroups = None
        containment = self._cgroups.name if self._cgroups else "rlimits"
        swept = (self._cgroups.sweep() if self._cgroups else 0) + (Staging.sweep() if os.geteuid() == 0 else 0)
        if swept:
            log.info("removed %d cgroup(s) and staging directories left by a killed server", swept)
        try:
            result = self.run_sync(["/bin/true"], Limits(timeout=20), stdin=b"")
        except SandboxError as exc:
            return Isolation(False, f"bubblewrap cannot create the job's namespaces ({exc}): {_USERNS_FIX}")
        if result.returncode != 0:
            tail = result.stderr.decode(errors="replace").strip()[-300:]
            return Isolation(False, f"bubblewrap cannot create the job's namespaces ({tail}): {_USERNS_FIX}")
        return Isolation(True, containment=containment)

    # the command line -------------------------------------------------------------------------------------

    def _bwrap_args(self, files: JobFiles, limits: Limits, fds: dict[str, int],
                    staging: Staging | None) -> list[str]:
        args = [BWRAP, "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
                "--uid", str(JOB_UID), "--gid", str(JOB_UID), "--hostname", "job",
                "--info-fd", str(fds["info"]), "--block-fd", str(fds["block"]), "--seccomp", str(fds["seccomp"])]
        roots = _read_only_roots()
        # An environment installed under /tmp (a checkout in /tmp, say) is bound there: /tmp is then a tmpfs of
        # its own holding those binds, not the usual link to the scratch (the job-wide memory limit, which tmpfs
        # pages count against, still bounds the two together).
        tmp_roots = any(root.is_relative_to("/tmp") for root in roots)
        if tmp_roots:
            args += ["--size", str(limits.scratch_bytes), "--perms", "1777", "--tmpfs", "/tmp"]
        for root in roots:
            args += ["--ro-bind", staging.source(str(root)) if staging else str(root), str(root)]
        for hidden in self.hidden:
            if any(hidden.is_relative_to(r) for r in roots):
                args += ["--size", "4096", "--tmpfs", str(hidden), "--remount-ro", str(hidden)]
        args += _system_links()
        # A root server's job is host uid 0 outside: /proc/sys (host sysctls) must not be writable.
        args += ["--proc", "/proc", "--remount-ro", "/proc",
                 "--dev", "/dev", "--size", str(64 * 1024**2), "--perms", "1777",
                 "--tmpfs", "/dev/shm", "--remount-ro", "/dev",  # POSIX semaphores need a small /dev/shm
                 "--size", str(limits.scratch_bytes), "--perms", "1777",
                 "--tmpfs", SCRATCH, *([] if tmp_roots else ["--symlink", SCRATCH, "/tmp"])]  # one size limit
        for name, fd in fds.items():
            if name.startswith("in:") and staging:
                args += ["--ro-bind", staging.source(str(files.inputs[name[3:]])), f"{INPUT_DIR}/{name[3:]}"]
            elif name.startswith("in:"):
                args += ["--ro-bind-fd", str(fd), f"{INPUT_DIR}/{name[3:]}"]
        # The job's uid is the server's outside the user namespace, so nothing but the scratch may stay writable.
        args += ["--remount-ro", "/", "--chdir", SCRATCH]
        return args

    # running ----------------------------------------------------------------------------------------------

    def run_sync(self, argv: list[str], limits: Limits, stdin: bytes = b"", files: JobFiles | None = None,
                 cancel: threading.Event | None = None) -> subprocess.CompletedProcess[bytes]:
        """Run ARGV as one job and wait for it (call it from a thread); every process it started is gone after."""
        files = files or JobFiles()
        if not self.isolated:
            return self._run_unsafe(argv, limits, stdin, files, cancel)
        running = self.start(argv, limits, files)
        try:
            assert running.proc is not None
            done = communicate(running.proc, stdin, limits, cancel, kill=running.kill)
            running.finish_output()
            return done
        except OSError as exc:
            raise SandboxError(f"could not be started ({exc})") from exc
        finally:
            running.close()

    def start(self, argv: list[str], limits: Limits, files: JobFiles,
              passed_fds: dict[str, int] | None = None) -> Running:
        """Start ARGV isolated, inside its cgroup and limits, and return it running (the caller closes it).
        PASSED_FDS (environment variable -> descriptor) stay open in the job; FILES.output leaves through a pipe."""
        running = Running()
        running.staging = staging = Staging() if os.geteuid() == 0 else None
        try:
            info_r, info_w = os.pipe()
            block_r, block_w = os.pipe()
            running.opened += [info_r, info_w, block_r, block_w]
            seccomp_fd = os.memfd_create("job-seccomp")
            running.opened.append(seccomp_fd)
            os.write(seccomp_fd, seccomp_program())
            os.lseek(seccomp_fd, 0, os.SEEK_SET)
            fds = {"info": info_w, "block": block_r, "seccomp": seccomp_fd}
            for name, path in files.inputs.items():
                fds[f"in:{name}"] = os.open(path, os.O_PATH | os.O_NOFOLLOW)
                running.opened.append(fds[f"in:{name}"])
            # Inputs go by descriptor to bwrap, or by path (checked above: no symlink) to a root server's wrapper.
            passed = [fd for name, fd in fds.items() if not (staging and name.startswith("in:"))]
            env = {name: str(fd) for name, fd in (passed_fds or {}).items()}
            passed += list((passed_fds or {}).values())
            out_fd = None
            if files.output is not None:
                out_fd = running.send_output_to(files.output, limits.file_size_bytes)
                passed.append(out_fd)
                env[OUTPUT_FD_ENV] = str(out_fd)
            if self._cgroups:
                running.cgroup = JobCgroup(self._cgroups, limits)
            command = [*self._bwrap_args(files, limits, fds, staging), "--", *argv]
            running.proc = subprocess.Popen(
                staging.wrap(command, limits) if staging else command, stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=passed, close_fds=True,
                env={**job_env(), **env})
            for fd in (info_w, block_r, *([out_fd] if out_fd is not None else [])):
                running.close_fd(fd)
            running.init_pid = self._sandbox_init_pid(info_r, running.proc, limits)
            if running.init_pid is not None:
                if running.cgroup is not None:
                    try:
                        running.cgroup.add(running.init_pid)
                    except ProcessLookupError:  # bwrap gave up setting the sandbox up: say why
                        raise _bwrap_failed(running.proc) from None
                if staging is None:  # else set by the wrapper: root may lack CAP_SYS_RESOURCE for another uid
                    set_rlimits(running.init_pid, limits)
            os.write(block_w, b"1")  # the job starts only now, inside its cgroup and limits
            return running
        except BaseException as exc:
            running.close()
            if isinstance(exc, OSError):
                raise SandboxError(f"could not be started ({exc})") from exc
            raise

    @staticmethod
    def _sandbox_init_pid(info_r: int, proc: subprocess.Popen[bytes], limits: Limits) -> int | None:
        """bwrap reports the PID of the namespace's init (host view) before the job runs."""
        data = b""
        deadline = time.monotonic() + min(limits.timeout, 30)
        while b"}" not in data and time.monotonic() < deadline:
            chunk = os.read(info_r, 4096)
            if not chunk:
                break
            data += chunk
        if b"}" not in data:
            raise _bwrap_failed(proc)
        return int(json.loads(data[: data.index(b"}") + 1])["child-pid"])

    def _run_unsafe(self, argv: list[str], limits: Limits, stdin: bytes, files: JobFiles,
                    cancel: threading.Event | None) -> subprocess.CompletedProcess[bytes]:
        """--unsafe-conversions: a plain child with per-process limits; the operator accepted the risk."""
        scratch = Path(tempfile.mkdtemp(prefix="unsafe-job-"))
        opened: list[int] = []
        try:
            for name, path in files.inputs.items():
                (scratch / "job" / name).parent.mkdir(parents=True, exist_ok=True)
                (scratch / "job" / name).symlink_to(path)
            env = {**job_env(), "HOME": str(scratch), "TMPDIR": str(scratch),
                   INPUT_DIR_ENV: str(scratch / "job")}
            passed: list[int] = []
            if files.output is not None:
                out_fd = os.open(files.output, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                opened.append(out_fd)
                passed.append(out_fd)
                env[OUTPUT_FD_ENV] = str(out_fd)
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    pass_fds=passed, close_fds=True, cwd=scratch, env=env, start_new_session=True)
            set_rlimits(proc.pid, limits, own_user_namespace=False)
            try:
                return communicate(proc, stdin, limits, cancel, kill=lambda: kill_group(proc))
            finally:
                kill_group(proc)
        finally:
            for fd in opened:
                os.close(fd)
            shutil.rmtree(scratch, ignore_errors=True)

    async def run_task(self, task: str, payload: dict[str, Any], limits: Limits,
                       files: JobFiles | None = None) -> dict[str, Any]:
        """Run `octomil_lite.convert.worker TASK` as one job; return the JSON object it prints."""
        if not self.isolated:
            log.warning("running conversion task %s WITHOUT isolation (--unsafe-conversions)", task)
        elif not self.isolation.available:
            raise IsolationUnavailable(self.isolation.reason or "isolation is not available")
        cancel = threading.Event()
        files = files or JobFiles()
        worker = self.warm.take(task, payload, limits, files) if self.warm is not None and self.isolated else None

        def run() -> subprocess.CompletedProcess[bytes]:
            if worker is not None and self.warm is not None:
                try:
                    return self.warm.run(worker, task, payload, files, cancel)
                except HandoffFailed:
                    log.warning("a warm worker was gone before its task reached it; running it in a fresh job")
            return self.run_sync(worker_command(task), limits, json.dumps(payload).encode(), files, cancel)

        future = asyncio.get_running_loop().run_in_executor(None, run)
        try:
            done = await asyncio.shield(future)
        except asyncio.CancelledError:
            cancel.set()
            with contextlib.suppress(Exception):
                await future
            raise
        return worker_result(done)
