"""Breaks found by attacking the conversion sandbox from inside a job (issue 12): each test fails until fixed.

Same harness as test_security_isolation.py: the real job sandbox of a real Registry, hostile code run with `-c`.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest
from test_security_isolation import FAST, data_dir, report, run_hostile, sandbox  # noqa: F401 - fixtures

from octomil_lite.convert.pool import MAX_PARITY_JSON, parity_json
from octomil_lite.convert.sandbox import JobFiles, Sandbox, SandboxError

REFUSED = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT}


def test_a_job_cannot_write_the_hosts_sysctls(sandbox: Sandbox) -> None:  # noqa: F811
    # As root, bwrap maps the job's uid to host uid 0: /proc/sys checks only the euid, no capability.
    done = run_hostile(sandbox, """
        import errno, json, os
        out = {}
        for path in ("/proc/sys/kernel/core_pattern", "/proc/sys/vm/drop_caches", "/proc/sys/kernel/panic"):
            try:
                os.close(os.open(path, os.O_WRONLY))  # opening alone changes nothing
                out[path] = "writable"
            except OSError as exc:
                out[path] = exc.errno
        path = "/proc/sys/kernel/printk_ratelimit"  # global; the same value written back is harmless
        try:
            value = open(path).read()
            fd = os.open(path, os.O_WRONLY)
            os.write(fd, value.encode())
            os.close(fd)
            out[path] = "written"
        except OSError as exc:
            out[path] = exc.errno
        print(json.dumps(out))
    """)
    seen = report(done)
    assert all(v in REFUSED for v in seen.values()), seen


def test_a_stdout_flood_does_not_pile_up_in_the_server(sandbox: Sandbox) -> None:  # noqa: F811
    # The parent buffers all of stdout/stderr in its own memory (outside the job's cgroup): 2.4 GB in 30 s seen.
    try:
        done = run_hostile(sandbox, """
            import os
            block = b"A" * (1 << 20)
            for _ in range(24):
                os.write(1, block)
                os.write(2, block)
        """)
    except SandboxError:
        return  # stopped for writing too much: fine
    buffered = len(done.stdout) + len(done.stderr)
    assert buffered <= 16 * 1024**2, f"{buffered} bytes of job output held by the server"


def test_the_output_file_keeps_the_mode_the_server_gave_it(sandbox: Sandbox, tmp_path: Path) -> None:  # noqa: F811
    # The job owns the output inode (its uid is the server's outside): it can make it setuid or reopen it read-write.
    output = tmp_path / "result"
    done = run_hostile(sandbox, """
        import json, os, stat
        out = int(os.environ["OCTOMIL_JOB_OUT_FD"])
        result = {"regular_file": stat.S_ISREG(os.fstat(out).st_mode)}
        try:
            os.fchmod(out, 0o6777)
            result["fchmod"] = "changed"
        except OSError as exc:
            result["fchmod"] = exc.errno
        try:
            os.close(os.open(f"/proc/self/fd/{out}", os.O_RDWR))
            result["reopen"] = "read-write"
        except OSError as exc:
            result["reopen"] = exc.errno
        print(json.dumps(result))
    """, files=JobFiles(output=output))
    seen = report(done)
    assert stat.S_IMODE(os.stat(output).st_mode) == 0o600, (oct(os.stat(output).st_mode), seen)
    assert seen["reopen"] in REFUSED or not seen["regular_file"], seen  # reopening a pipe would be harmless


@pytest.mark.parametrize("high_bits", [0, 1 << 32])
def test_tiocsti_is_refused_whatever_the_upper_half_of_the_argument(sandbox: Sandbox, high_bits: int) -> None:  # noqa: F811
    # The kernel truncates an ioctl request to 32 bits; the filter compares all 64.
    done = run_hostile(sandbox, """
        import ctypes, json
        libc = ctypes.CDLL(None, use_errno=True)
        result = libc.syscall(16, ctypes.c_long(0), ctypes.c_long(request), ctypes.c_long(0))
        print(json.dumps({"errno": ctypes.get_errno() if result < 0 else 0}))
    """, request=high_bits | 0x5412)
    assert report(done)["errno"] == errno.EPERM


@pytest.mark.parametrize("parity", [{"note": "x" * MAX_PARITY_JSON}, ["not", "an", "object"], "text"])
def test_a_jobs_parity_report_is_refused_when_not_a_small_object(parity: object) -> None:
    # The report comes from the hostile job and is stored with the version and served in every listing.
    with pytest.raises(ValueError):
        parity_json(parity)


def test_a_normal_parity_report_is_kept_as_json() -> None:
    report_ = {"max_abs_diff": 1e-7, "tolerance": 1e-4, "within": True, "inputs": 16, "note": None}
    assert json.loads(parity_json(report_) or "null") == report_
    assert parity_json(None) is None


def test_a_root_servers_job_is_not_host_root(sandbox: Sandbox, tmp_path: Path) -> None:  # noqa: F811
    # bwrap maps the job's uid to its caller's: run as root, the job owned every root file bound into it.
    if os.geteuid() != 0:
        pytest.skip("only a root server drops its jobs to another host uid")
    secret = tmp_path / "secret"
    secret.write_bytes(b"root only")
    secret.chmod(0o600)
    done = run_hostile(sandbox, """
        import json
        try:
            open("/job/secret", "rb").read()
            print(json.dumps({"read": "allowed"}))
        except OSError as exc:
            print(json.dumps({"read": exc.errno}))
    """, files=JobFiles({"secret": secret}))
    assert report(done)["read"] == errno.EACCES
