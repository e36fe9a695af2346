"""A server killed with SIGKILL leaves job cgroups (and, as root, staging directories) behind: the next start
sweeps them, and never touches one that may still be in use (young, or holding a process)."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path

import pytest
from test_security_isolation import data_dir, sandbox  # noqa: F401 - fixtures

from octomil_lite.convert.cgroups import JOB_CGROUP_PREFIX, LEFTOVER_AGE
from octomil_lite.convert.job_process import Staging
from octomil_lite.convert.sandbox import Sandbox


def test_a_start_removes_empty_job_cgroups_left_by_a_killed_server(sandbox: Sandbox) -> None:  # noqa: F811
    cgroups = sandbox._cgroups
    if cgroups is None:
        pytest.skip("no writable cgroup here: jobs are limited by rlimits only")
    roots = list(dict.fromkeys(cgroups.roots.values()))
    left = [root / f"{JOB_CGROUP_PREFIX}left-by-a-killed-server" for root in roots]
    young = [root / f"{JOB_CGROUP_PREFIX}another-servers-job-about-to-start" for root in roots]
    stale = time.time() - LEFTOVER_AGE - 60
    for path in left + young:
        path.mkdir()
    for path in left:
        os.utime(path, (stale, stale))
    try:
        sandbox.probe()
        assert [p for p in left if p.exists()] == []
        assert all(p.is_dir() for p in young)
    finally:
        for path in left + young:
            with contextlib.suppress(OSError):
                path.rmdir()


@pytest.mark.skipif(os.geteuid() != 0, reason="only a root server stages its jobs' binds in /tmp")
def test_a_start_removes_old_staging_directories_but_not_recent_ones(sandbox: Sandbox) -> None:  # noqa: F811
    old = Path(tempfile.mkdtemp(prefix=Staging.PREFIX))
    (old / "0").mkdir()
    (old / "1").touch()
    recent = Path(tempfile.mkdtemp(prefix=Staging.PREFIX))  # a job of another server may be starting right now
    (recent / "0").mkdir()
    stale = time.time() - Staging.MAX_AGE - 60
    os.utime(old, (stale, stale))
    try:
        sandbox.probe()
        assert not old.exists()
        assert (recent / "0").is_dir()
    finally:
        (recent / "0").rmdir()
        recent.rmdir()
