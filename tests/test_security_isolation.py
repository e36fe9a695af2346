"""Hostile code inside a conversion job cannot reach the registry (issue 12).

Every test runs arbitrary Python inside exactly the job sandbox the converter uses (the `Sandbox` of a real
Registry over a real data directory, started the same way as `octomil_lite.convert.worker`, only with `-c CODE`), and
shows the attack failing from the inside. Where isolation cannot be set up the tests skip, and fail under CI=true.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from conftest import Api, on_app_loop
from litestar.testing import AsyncTestClient

from octomil_lite.config import Config
from octomil_lite.convert.sandbox import JobFiles, Limits, Sandbox, SandboxError
from octomil_lite.registry import Registry
from octomil_lite.server.app import create_app
from octomil_lite.storage import MetadataStore, Row

FAST = Limits(timeout=30, memory_bytes=1024**3, scratch_bytes=64 * 1024**2, max_processes=32)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("registry")


@pytest.fixture(scope="module")
def sandbox(data_dir: Path) -> Sandbox:
    """The job sandbox of a real Registry (which made registry.sqlite3 and secret.key), probed as at start.

    Where isolation is unavailable: a skip naming what is missing, a failure under CI=true."""

    async def registry_sandbox() -> Sandbox:
        registry = await Registry.open(Config(data_dir=data_dir))
        await registry.close()
        return registry.sandbox

    sb = asyncio.run(registry_sandbox())
    assert (data_dir / "secret.key").is_file() and (data_dir / "registry.sqlite3").is_file()
    isolation = sb.probe()
    if not isolation.available:
        message = f"job isolation is unavailable here: {isolation.reason}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return sb


def run_hostile(sandbox: Sandbox, code: str, limits: Limits = FAST, files: JobFiles | None = None,
                **values: object) -> subprocess.CompletedProcess[bytes]:
    """Run CODE as a conversion job (VALUES are bound as Python names first); its stdout, stderr, exit status."""
    prelude = "".join(f"{name} = {value!r}\n" for name, value in values.items())
    return sandbox.run_sync([sys.executable, "-I", "-c", prelude + textwrap.dedent(code)], limits, files=files)


def report(done: subprocess.CompletedProcess[bytes]) -> dict[str, object]:
    """The JSON object the hostile code printed last."""
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    return json.loads(done.stdout.decode().strip().splitlines()[-1])


def marked_processes(marker: str) -> list[int]:
    """Host PIDs whose command line carries MARKER."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return [pid for pid in found if pid != os.getpid()]


# ---- what the job can see and write ----------------------------------------------------------------------

def test_the_data_directory_and_secret_key_are_not_even_visible(sandbox: Sandbox, data_dir: Path) -> None:
    done = run_hostile(sandbox, """
        import json, os
        out = {}
        for path in (home, home + "/secret.key", home + "/registry.sqlite3", home + "/blobs", "/root", "/home",
                     "/etc/passwd", "/etc/shadow", "/var", "/run", "/srv"):
            try:
                os.stat(path)
                out[path] = "visible"
            except OSError as exc:
                out[path] = exc.errno
        out["etc"] = sorted(os.listdir("/etc"))
        out["root"] = sorted(os.listdir("/"))
        print(json.dumps(out))
    """, home=str(data_dir))
    seen = report(done)
    for path in (data_dir, data_dir / "secret.key", data_dir / "registry.sqlite3", data_dir / "blobs"):
        assert seen[str(path)] == 2, (path, seen)  # ENOENT: not there at all
    for path in ("/home", "/etc/passwd", "/etc/shadow", "/var", "/run", "/srv"):
        assert seen[path] == 2, (path, seen)
    assert seen["etc"] == sorted(p for p in ("ld.so.cache", "ld.so.conf", "localtime") if os.path.exists(f"/etc/{p}"))
    assert set(seen["root"]) <= {"usr", "bin", "lib", "lib32", "lib64", "sbin", "etc", "proc", "dev", "tmp",
                                 "scratch", "job", *{Path(p).parts[1] for p in (sys.prefix, sys.base_prefix)},
                                 Path(__file__).resolve().parts[1]}


def test_a_data_directory_inside_the_bound_environment_is_hidden_too(tmp_path: Path) -> None:
    home = Path(sys.prefix) / f"octomil-test-home-{uuid.uuid4().hex[:8]}"
    home.mkdir()
    try:
        (home / "secret.key").write_bytes(b"s3cret")
        sb = Sandbox(hidden=[home])
        if not sb.probe().available:
            pytest.skip(sb.isolation.reason)
        seen = report(run_hostile(sb, "import os, json; print(json.dumps(os.listdir(home)))", home=str(home)))
        assert seen == []
    finally:
        (home / "secret.key").unlink()
        home.rmdir()


def test_no_write_outside_scratch_and_nothing_left_after(sandbox: Sandbox, tmp_path: Path) -> None:
    done = run_hostile(sandbox, """
        import json, os, sys
        out = {}
        for path in ("/evil", "/usr/evil", sys.prefix + "/evil", sys.base_prefix + "/evil", here + "/evil",
                     "/dev/evil", "/proc/evil", "/etc/evil", "/scratch/ok", "/tmp/ok2"):
            try:
                with open(path, "w") as f:
                    f.write("x")
                out[path] = "written"
            except OSError as exc:
                out[path] = exc.errno
        print(json.dumps(out))
    """, here=str(tmp_path))
    seen = report(done)
    assert seen.pop("/scratch/ok") == "written" and seen.pop("/tmp/ok2") == "written"
    assert all(v != "written" for v in seen.values()), seen
    for path in ("/evil", "/usr/evil", f"{sys.prefix}/evil", f"{sys.base_prefix}/evil", f"{tmp_path}/evil"):
        assert not os.path.exists(path)


def test_scratch_fill_stops_at_the_scratch_size(sandbox: Sandbox) -> None:
    done = run_hostile(sandbox, """
        import errno, json, os
        written = 0
        try:
            with open("/tmp/fill", "wb") as f:
                while True:
                    f.write(b"x" * (1 << 20))
                    f.flush()
                    written += 1 << 20
        except OSError as exc:
            print(json.dumps({"errno": exc.errno, "written": written}))
    """)
    seen = report(done)
    assert seen["errno"] in (28, 27)  # ENOSPC (or EFBIG)
    assert seen["written"] <= FAST.scratch_bytes


# ---- identity, capabilities, descriptors -----------------------------------------------------------------

def test_identity_capabilities_and_no_new_privs(sandbox: Sandbox) -> None:
    done = run_hostile(sandbox, """
        import json
        status = dict(line.split(":\\t", 1) for line in open("/proc/self/status").read().splitlines() if ":\\t" in line)
        print(json.dumps({k: status[k].strip() for k in ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff",
                                                         "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp")}))
    """)
    seen = report(done)
    assert seen["Uid"].split() == ["65534"] * 4 and seen["Gid"].split() == ["65534"] * 4
    assert seen["Groups"] in ("", "65534")
    assert {seen[k] for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")} == {"0000000000000000"}
    assert seen["NoNewPrivs"] == "1"
    assert seen["Seccomp"] == "2"  # a filter is installed


def test_only_stdio_and_the_output_descriptor_are_open(sandbox: Sandbox, tmp_path: Path) -> None:
    leak = os.open(tmp_path, os.O_RDONLY)  # an inheritable descriptor of the server's must not reach the job
    os.set_inheritable(leak, True)
    model = tmp_path / "model.bin"
    model.write_bytes(b"model bytes")
    try:
        done = run_hostile(sandbox, """
            import json, os
            open_fds = []
            for fd in range(0, 4096):
                try:
                    os.fstat(fd)
                    open_fds.append(fd)
                except OSError:
                    pass
            out = int(os.environ["OCTOMIL_JOB_OUT_FD"])
            try:
                open("/job/model", "r+b")
                reopened = "writable"
            except OSError as exc:
                reopened = exc.errno
            os.write(out, open("/job/model", "rb").read())
            print(json.dumps({"fds": open_fds, "out": out, "model_reopened": reopened,
                              "model_writable": os.access("/job/model", os.W_OK)}))
        """, files=JobFiles({"model": model}, output=tmp_path / "result"))
    finally:
        os.close(leak)
    seen = report(done)
    assert seen["fds"] == [0, 1, 2, seen["out"]]
    # EROFS: the input is read-only; EACCES first where a root server's job is another uid than the file's owner
    assert seen["model_writable"] is False and seen["model_reopened"] in (errno.EROFS, errno.EACCES)
    assert (tmp_path / "result").read_bytes() == b"model bytes"


# ---- namespaces and the kernel ---------------------------------------------------------------------------

SYSCALLS = """
    import ctypes, errno, json, os, socket
    libc = ctypes.CDLL(None, use_errno=True)
    def call(number, *args):
        result = libc.syscall(number, *[ctypes.c_long(a) for a in args])
        return "ALLOWED" if result >= 0 else errno.errorcode.get(ctypes.get_errno(), ctypes.get_errno())
    ns = os.open("/proc/self/ns/net", os.O_RDONLY)
    out = {
        "setns": call(308, ns, 0),
        "unshare(user)": call(272, 0x10000000),
        "unshare(net)": call(272, 0x40000000),
        "unshare(mount)": call(272, 0x00020000),
        "clone(newuser)": call(56, 0x10000000 | 17, 0, 0, 0, 0),
        "mount": libc.mount(b"none", b"/scratch", b"tmpfs", 0, None) == 0 or errno.errorcode[ctypes.get_errno()],
        "ptrace(attach 1)": call(101, 16, 1, 0, 0),
        "bpf": call(321, 0, 0, 0),
        "keyctl": call(250, 0, -3, 0),
        "add_key": call(248, 0, 0, 0, 0, -3),
        "request_key": call(249, 0, 0, 0, 0),
        "perf_event_open": call(298, 0, 0, -1, -1, 0),
        "io_uring_setup": call(425, 1, 0),
        "userfaultfd": call(323, 0),
    }
    for family, name in ((socket.AF_INET, "AF_INET"), (socket.AF_INET6, "AF_INET6"), (16, "AF_NETLINK"),
                         (17, "AF_PACKET")):
        try:
            socket.socket(family, socket.SOCK_DGRAM if family in (16, 17) else socket.SOCK_STREAM).close()
            out[name] = "ALLOWED"
        except OSError as exc:
            out[name] = errno.errorcode[exc.errno]
    try:
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close()
        out["AF_UNIX"] = "ALLOWED"
    except OSError as exc:
        out["AF_UNIX"] = errno.errorcode[exc.errno]
    print(json.dumps(out))
"""


def test_namespace_kernel_and_network_syscalls_are_refused(sandbox: Sandbox) -> None:
    seen = report(run_hostile(sandbox, SYSCALLS))
    assert seen.pop("AF_UNIX") == "ALLOWED"  # local IPC inside the job (multiprocessing) still works
    assert seen.pop("setns") == "EPERM" and seen.pop("mount") == "EPERM" and seen.pop("ptrace(attach 1)") == "EPERM"
    refused = {k: v for k, v in seen.items() if v in ("EPERM", "EAFNOSUPPORT", "ENOSYS")}
    assert refused == seen, {k: v for k, v in seen.items() if k not in refused}


def test_no_tcp_to_the_server_and_no_abstract_unix_socket(sandbox: Sandbox) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract_name = f"\0octomil-test-{uuid.uuid4().hex}"
    abstract.bind(abstract_name)
    abstract.listen()
    try:
        done = run_hostile(sandbox, """
            import json, socket
            out = {}
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
                out["tcp"] = "connected"
            except OSError as exc:
                out["tcp"] = exc.errno
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(name)
                out["abstract"] = "connected"
            except OSError as exc:
                out["abstract"] = exc.errno
            out["interfaces"] = [l.split(":")[0].strip() for l in open("/proc/net/dev").read().splitlines()[2:]]
            print(json.dumps(out))
        """, port=listener.getsockname()[1], name=abstract_name)
    finally:
        listener.close()
        abstract.close()
    seen = report(done)
    assert seen["tcp"] == 97  # EAFNOSUPPORT: no IP socket at all
    assert seen["abstract"] == 111  # ECONNREFUSED: the server's network namespace is not the job's
    assert seen["interfaces"] == ["lo"]


def test_cannot_signal_or_ptrace_the_server_or_another_process(sandbox: Sandbox) -> None:
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        done = run_hostile(sandbox, """
            import ctypes, errno, json, os, signal
            out = {}
            for name, pid in (("server", server), ("victim", victim)):
                try:
                    os.kill(pid, signal.SIGKILL)
                    out[name] = "signalled"
                except OSError as exc:
                    out[name] = exc.errno
            libc = ctypes.CDLL(None, use_errno=True)
            out["ptrace"] = libc.ptrace(16, ctypes.c_long(server), None, None) == 0 or ctypes.get_errno()
            out["visible"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
            print(json.dumps(out))
        """, server=os.getpid(), victim=victim.pid)
        seen = report(done)
        assert victim.poll() is None  # still alive
        assert seen["server"] in (1, 3) and seen["victim"] in (1, 3)  # EPERM / ESRCH
        assert seen["ptrace"] == 1
        assert max(seen["visible"]) < 10  # only the job's own processes exist for it
    finally:
        victim.kill()
        victim.wait()


# ---- the job as a whole ----------------------------------------------------------------------------------

def test_a_fork_bomb_is_contained_and_gone_after(sandbox: Sandbox) -> None:
    marker = f"forkbomb-{uuid.uuid4().hex}"
    done = run_hostile(sandbox, f"""
        import json, os, time
        # {marker}
        children = 0
        while True:
            try:
                pid = os.fork()
            except OSError as exc:
                print(json.dumps({{"children": children, "errno": exc.errno}}))
                break
            if pid == 0:
                time.sleep(60)
                os._exit(0)
            children += 1
    """)
    seen = report(done)
    assert seen["errno"] == 11 and seen["children"] < FAST.max_processes  # EAGAIN at the job's process limit
    assert marked_processes(marker) == []


def test_three_children_near_the_limit_share_one_job_memory_limit(sandbox: Sandbox) -> None:
    if sandbox.isolation.containment == "rlimits":
        message = "no writable cgroup: memory is limited per process only"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    limits = Limits(timeout=60, memory_bytes=512 * 1024**2, max_processes=16)
    done = run_hostile(sandbox, """
        import json, os
        pids = []
        for _ in range(3):
            pid = os.fork()
            if pid == 0:
                block = bytearray(400 * 1024 * 1024)  # each child alone is under the limit
                for i in range(0, len(block), 4096):
                    block[i] = 1
                os._exit(0)
            pids.append(pid)
        print(json.dumps([os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids]))
    """, limits=limits)
    statuses = report(done)
    assert -9 in statuses, statuses  # the kernel killed at least one: together they exceeded the job's limit


def test_the_job_shares_one_cpu_quota(sandbox: Sandbox) -> None:
    if sandbox.isolation.containment == "rlimits" or "cpu" not in sandbox._cgroups.roots:  # type: ignore[union-attr]
        pytest.skip("no writable cpu cgroup: CPU time is limited per process only")
    done = run_hostile(sandbox, """
        import json, os, time
        readers = []
        for _ in range(2):  # two spinners for one second of wall time
            r, w = os.pipe()
            if os.fork() == 0:
                end = time.monotonic() + 1.0
                while time.monotonic() < end:
                    pass
                os.write(w, str(time.process_time()).encode())
                os._exit(0)
            os.close(w)
            readers.append(r)
        print(json.dumps(sum(float(os.read(r, 64)) for r in readers)))
    """, limits=Limits(timeout=30, cpu_cores=0.05))
    assert report(done) < 0.1  # a twentieth of a core for the whole job, not up to two cores


def test_a_double_forked_daemon_is_gone_when_the_job_ends(sandbox: Sandbox) -> None:
    marker = f"daemon-{uuid.uuid4().hex}"
    done = run_hostile(sandbox, f"""
        import os, subprocess, sys
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(120)", "{marker}"])
            os._exit(0)
        os.wait()
        import time
        time.sleep(0.3)
        print('{{"started": true}}')
    """)
    assert report(done) == {"started": True}
    assert marked_processes(marker) == []


def test_a_job_past_its_timeout_is_killed_with_all_its_processes(sandbox: Sandbox) -> None:
    marker = f"slow-{uuid.uuid4().hex}"
    with pytest.raises(SandboxError, match="took longer than"):
        run_hostile(sandbox, f"""
            import os, sys, time
            for _ in range(3):
                if os.fork() == 0:
                    os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(120)", "{marker}"])
            time.sleep(120)
        """, limits=Limits(timeout=1.5))
    assert marked_processes(marker) == []


# ---- the tests above cannot silently pass ----------------------------------------------------------------

@pytest.mark.parametrize("ci", ["true", ""])
def test_without_isolation_these_tests_fail_under_ci_and_skip_otherwise(ci: str, tmp_path: Path) -> None:
    env = {**os.environ, "CI": ci, "PATH": str(tmp_path),  # no bwrap on PATH: isolation is unavailable
           "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--noconftest", __file__,
                           "-k", "identity_capabilities"], env=env, capture_output=True, text=True, timeout=120)
    summary = done.stdout.strip().splitlines()[-1]
    if ci == "true":
        assert done.returncode != 0 and "error" in summary and "passed" not in summary, done.stdout[-2000:]
        assert "bubblewrap ('bwrap') is not installed" in done.stdout
    else:
        assert done.returncode == 0 and "1 skipped" in summary, done.stdout[-2000:]


# ---- one hostile key cannot hold conversions hostage -----------------------------------------------------

async def test_jobs_are_claimed_round_robin_by_uploading_key(metadata_store: MetadataStore) -> None:
    """On both metadata stores: one key's queue of jobs delays another key's job by at most one job."""
    db = metadata_store
    await db.insert_model({"id": "m", "created_at": "t"})
    model = await db.get_model("m")
    assert model is not None

    async def publish(record: object) -> None:
        return None

    async def upload(key: str) -> int:
        row = {"format": "pickle", "kind": "pickle", "digest": "0" * 64, "size": 1, "uploaded_at": "t",
               "uploaded_by": key}
        number = await db.insert_version(model["seq"], row, {}, [{"format": "onnx", "status": "pending",
                                                                   "updated_at": "t"}], publish)
        assert number is not None
        return number

    async def claim() -> Row | None:
        return await db.claim_job("t", "test-owner", 60.0)

    numbers = {"hostile": [await upload("hostile") for _ in range(4)]}
    first = await claim()  # the hostile key's first job is running
    numbers["other"] = [await upload("other"), await upload("other")]
    order = [first]
    while (job := await claim()) is not None:
        order.append(job)
    versions = {}
    for number in range(1, 7):
        version = await db.get_version(model["seq"], number=number)
        assert version is not None
        versions[version["seq"]] = number
    claimed = [versions[job["version_seq"]] for job in order]  # type: ignore[index]
    h, o = numbers["hostile"], numbers["other"]
    assert claimed == [h[0], o[0], h[1], o[1], h[2], h[3]]


# ---- fail closed where isolation cannot work --------------------------------------------------------------

async def test_health_reports_the_isolation_in_force(sandbox: Sandbox, api: Api) -> None:
    health = (await api.client.get("/health")).json()["isolation"]
    assert health == {"isolated": True, "unsafe_conversions": False, "containment": sandbox.isolation.containment}


async def wait_for_onnx(api: Api, model_id: str, version: int) -> dict[str, object]:
    for _ in range(600):
        resp = await api.client.get(f"/api/v1/models/{model_id}/versions/{version}", headers=api.headers)
        status = resp.json()["formats"]["onnx"]
        if status["status"] not in ("pending", "running"):
            return status  # type: ignore[no-any-return]
        await asyncio.sleep(0.1)
    raise AssertionError(f"still {status}")


@pytest.mark.parametrize("unsafe", [False, True])
async def test_without_bubblewrap_conversions_are_unavailable_unless_the_operator_accepts_the_risk(
        unsafe: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sklearn_pickle: bytes,
        onnx_bytes: bytes) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # this machine without bwrap
    config = Config(data_dir=tmp_path / "data", rate_limit=0, conversion_workers=1, unsafe_conversions=unsafe)
    async with AsyncTestClient(app=create_app(config)) as client:
        registry: Registry = client.app.state.registry
        api = Api(client, registry, {"admin": await on_app_loop(client, registry.create_key, "t", "admin")})
        health = (await client.get("/health")).json()["isolation"]
        assert health["isolated"] is False and health["unsafe_conversions"] is unsafe
        assert "bubblewrap ('bwrap') is not installed" in health["reason"]
        assert "apt-get install bubblewrap" in health["reason"]
        model = await api.create_model(name="m", framework="sklearn")
        version = (await api.upload(model["id"], sklearn_pickle, "model.pkl")).json()["version"]  # stored anyway
        status = await wait_for_onnx(api, model["id"], version)
        onnx_upload = await api.upload(model["id"], onnx_bytes, "model.onnx", expect=None)
    if unsafe:
        assert status["status"] == "ready", status
        assert onnx_upload.status_code == 201
    else:
        assert status["status"] == "unavailable" and "bubblewrap" in str(status["reason"]), status
        assert onnx_upload.status_code == 503, onnx_upload.text
        assert "isolated job" in onnx_upload.json()["message"]
