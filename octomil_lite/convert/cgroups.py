"""One cgroup per conversion job, nested under the server's own: memory, process count and CPU for the whole tree."""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .job_process import Limits

JOB_CGROUP_PREFIX = "octomil-lite-job-"
LEFTOVER_AGE = 120  # seconds; a job enters its cgroup within 30 s of its creation

@dataclass(frozen=True)
class Cgroups:
    """Where this process may make job cgroups: its own cgroup, per controller (v2: one directory for all)."""

    version: int
    roots: dict[str, Path]  # memory, pids and, where available, cpu

    @property
    def name(self) -> str:
        return f"cgroup v{self.version}"

    def sweep(self) -> int:
        """Remove job cgroups a killed server left behind. Their jobs died with it (bwrap --die-with-parent
        ends the PID namespace); a cgroup that still holds a process is busy, and rmdir refuses it. A young one
        may be another server's, made for a job about to enter it (at most 30 s later): it is left alone."""
        removed = 0
        for root in dict.fromkeys(self.roots.values()):
            for left in root.glob(f"{JOB_CGROUP_PREFIX}*"):
                with contextlib.suppress(OSError):
                    if time.time() - left.stat().st_mtime < LEFTOVER_AGE:
                        continue
                    left.rmdir()
                    removed += 1
        return removed

    def limit_files(self, limits: Limits) -> dict[str, dict[str, str]]:
        """controller -> {file: value}; files this kernel lacks (swap accounting) are skipped."""
        memory, quota = str(limits.memory_bytes), str(int(limits.cpu_cores * 100_000))
        if self.version == 2:
            return {"memory": {"memory.max": memory, "memory.swap.max": "0"},
                    "pids": {"pids.max": str(limits.max_processes)}, "cpu": {"cpu.max": f"{quota} 100000"}}
        return {"memory": {"memory.limit_in_bytes": memory, "memory.memsw.limit_in_bytes": memory},
                "pids": {"pids.max": str(limits.max_processes)},
                "cpu": {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": quota}}


def _own_cgroups() -> dict[str, str]:
    """controller (or '' for v2) -> this process's cgroup path, from /proc/self/cgroup."""
    out: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for name in controllers.split(",") if controllers else [""]:
            out[name] = path
    return out


def find_cgroups() -> Cgroups | None:
    """Writable memory and pids controllers (cpu if it is there too) under our own cgroup: v2, else v1."""
    own = _own_cgroups()
    mounts = [line.split() for line in Path("/proc/self/mounts").read_text().splitlines()]
    v2 = next((Path(m[1]) for m in mounts if m[2] == "cgroup2"), None)
    if v2 is not None and "" in own:
        base = v2 / own[""].lstrip("/")
        enabled = set((base / "cgroup.controllers").read_text().split()) if base.is_dir() else set()
        if {"memory", "pids"} <= enabled and os.access(base, os.W_OK):
            wanted = sorted({"memory", "pids", "cpu"} & enabled)
            with contextlib.suppress(OSError):
                (base / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in wanted))
            return Cgroups(2, dict.fromkeys(wanted, base))
    roots: dict[str, Path] = {}
    for name in ("memory", "pids", "cpu"):
        mount = next((Path(m[1]) for m in mounts if m[2] == "cgroup" and name in m[3].split(",")), None)
        base = mount / own[name].lstrip("/") if mount is not None and name in own else None
        if base is not None and os.access(base, os.W_OK):
            roots[name] = base
        elif name != "cpu":
            return None
    return Cgroups(1, roots)


class JobCgroup:
    """One cgroup per controller for one job; every process of the job is in it, and it is removed after."""

    def __init__(self, cgroups: Cgroups, limits: Limits):
        name = f"{JOB_CGROUP_PREFIX}{uuid.uuid4().hex[:12]}"
        self.dirs: list[Path] = []
        for root in dict.fromkeys(cgroups.roots.values()):
            (root / name).mkdir()
            self.dirs.append(root / name)
        files = cgroups.limit_files(limits)
        for controller, root in cgroups.roots.items():
            for file, value in files[controller].items():
                if (root / name / file).exists():
                    (root / name / file).write_text(value)

    def add(self, pid: int) -> None:
        for path in self.dirs:
            (path / "cgroup.procs").write_text(str(pid))

    def pids(self) -> set[int]:
        out: set[int] = set()
        for path in self.dirs:
            with contextlib.suppress(OSError):
                out.update(int(p) for p in (path / "cgroup.procs").read_text().split())
        return out

    def destroy(self) -> None:
        """Kill whatever is left in it, then remove it."""
        deadline = time.monotonic() + 5
        while (left := self.pids()) and time.monotonic() < deadline:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.005)
        for path in self.dirs:
            with contextlib.suppress(OSError):
                path.rmdir()
