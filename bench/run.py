#!/usr/bin/env python3
"""octomil-lite performance benchmark: every figure next to a baseline measured in the same run.

Run by hand (not part of the test suite); it needs curl, nginx (Debian `nginx-light`) and wrk (Debian `wrk`):

    apt-get update && apt-get install -y nginx-light wrk curl
    python bench/run.py                                   # full run, prints a Markdown table
    python bench/run.py --mlflow-venv /work/mlflowvenv    # also compare metadata operations with MLflow

Everything runs on 127.0.0.1 only. Every loop is bounded in count and time, and every process the bench
starts (octomil-lite serve, nginx, mlflow server) is stopped before it exits, also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import http.client
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"  # loopback only, never anything else
MiB = 1024 * 1024
GiB = 1024 * MiB
OCTOMIL = shutil.which("octomil-lite", path=os.path.dirname(sys.executable)) or shutil.which("octomil-lite")

# ----------------------------------------------------------------------------------------------------------------
# small helpers


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def proc_status(pid: int, field: str) -> int:
    """A /proc/PID/status memory field in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reset_peak(pid: int) -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def wait_http(port: int, path: str, deadline: float, proc: subprocess.Popen[bytes] | None = None) -> float:
    """Poll until GET path answers 200; return the time it did. Bounded by `deadline` (monotonic)."""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering")
        try:
            conn = http.client.HTTPConnection(HOST, port, timeout=2)
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            conn.close()
            if resp.status == 200:
                return time.monotonic()
        except OSError:
            pass
        time.sleep(0.005)
    raise TimeoutError(f"no 200 from {path} on port {port}")


def stop(proc: subprocess.Popen[bytes] | None, timeout: float = 10) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # each server runs in its own process group (its own children too)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


class Client:
    """A persistent HTTP/1.1 connection: the least client overhead for latency measurements."""

    def __init__(self, port: int, headers: dict[str, str] | None = None):
        self.conn = http.client.HTTPConnection(HOST, port, timeout=30)
        self.headers = headers or {}

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, bytes, float]:
        data = json.dumps(body).encode() if body is not None else None
        headers = dict(self.headers)
        if data is not None:
            headers["Content-Type"] = "application/json"
        t0 = time.perf_counter()
        self.conn.request(method, path, body=data, headers=headers)
        resp = self.conn.getresponse()
        payload = resp.read()
        return resp.status, payload, time.perf_counter() - t0

    def close(self) -> None:
        self.conn.close()


# ----------------------------------------------------------------------------------------------------------------
# the servers under test


class Octomil:
    def __init__(self, data_dir: Path, logfile: Path, *extra: str):
        self.extra = list(extra)
        self.data_dir = data_dir
        self.logfile = logfile
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup = float("nan")
        self.key = ""

    def make_key(self) -> str:
        out = subprocess.run([OCTOMIL, "keys", "create", "--name", f"bench-{uuid.uuid4().hex[:8]}", "--scope", "admin",
                              "--data-dir", str(self.data_dir)], capture_output=True, text=True, check=True, timeout=60)
        self.key = out.stdout.strip()
        return self.key

    def start(self) -> Octomil:
        with open(self.logfile, "ab") as out:
            t0 = time.monotonic()
            self.proc = subprocess.Popen(
                [OCTOMIL, "serve", "--host", HOST, "--port", str(self.port), "--data-dir", str(self.data_dir),
                 "--rate-limit", "0", "--log-level", "warning", *self.extra],
                stdout=out, stderr=out, start_new_session=True)
        self.startup = wait_http(self.port, "/health", t0 + 60, self.proc) - t0
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        stop(self.proc)

    def client(self) -> Client:
        return Client(self.port, {"Authorization": f"Bearer {self.key}"})


@contextmanager
def nginx(root: Path, workdir: Path) -> Iterator[int]:
    """nginx (sendfile on) serving `root` on a loopback port, as one foreground process of ours."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    port = free_port()
    conf_dir = workdir / "nginx"
    conf_dir.mkdir(parents=True, exist_ok=True)
    conf = conf_dir / "nginx.conf"
    conf.write_text(f"""
daemon off;
master_process off;
worker_processes 1;
pid {conf_dir}/nginx.pid;
error_log {conf_dir}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path {conf_dir}/body;
    proxy_temp_path {conf_dir}/proxy;
    server {{
        listen {HOST}:{port};
        root {root};
        location / {{ }}
    }}
}}
""")
    with open(conf_dir / "stdout.log", "ab") as out:
        proc = subprocess.Popen([binary, "-p", str(conf_dir), "-c", str(conf)], stdout=out, stderr=out,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {(conf_dir / 'error.log').read_text()[-500:]}")
            try:
                socket.create_connection((HOST, port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.02)
        yield port
    finally:
        stop(proc)


@contextmanager
def mlflow_server(venv: Path, workdir: Path) -> Iterator[int]:
    port = free_port()
    d = workdir / "mlflow"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    with open(d / "server.log", "ab") as out:
        proc = subprocess.Popen(
            [str(venv / "bin" / "mlflow"), "server", "--host", HOST, "--port", str(port),
             "--backend-store-uri", f"sqlite:///{d}/mlflow.db", "--artifacts-destination", str(d / "artifacts")],
            stdout=out, stderr=out, start_new_session=True, cwd=d,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        wait_http(port, "/health", time.monotonic() + 180, proc)
        yield port
    finally:
        stop(proc, timeout=20)


# ----------------------------------------------------------------------------------------------------------------
# measurements


def make_file(path: Path, size: int) -> None:
    """A pickle-looking file of random bytes (the registry infers 'sklearn' from the header)."""
    if path.exists() and path.stat().st_size == size:
        return
    with open(path, "wb") as f:
        f.write(b"\x80\x04\x95")
        write_random(f, size - 3)


def write_random(f: Any, size: int) -> None:
    """SIZE random bytes, each 16 MiB block varied so nothing downstream can dedupe or compress across them."""
    block = os.urandom(16 * MiB)
    i = 0
    while size > 0:
        n = min(size, len(block))
        f.write(block[:n] if i == 0 else hashlib.sha256(str(i).encode()).digest()[:16] + block[16:n])
        size -= n
        i += 1
    f.flush()
    os.fsync(f.fileno())


def make_onnx_file(path: Path, size: int) -> None:
    """A valid ONNX model of exactly SIZE bytes: Y = X @ W with one random float32 initializer W, written streaming."""
    if path.exists() and path.stat().st_size == size:
        return
    import onnx
    from onnx import TensorProto, helper

    from octomil_lite.convert.onnx_skeleton import encode_varint as _varint

    def layout(rows: int) -> tuple[bytes, bytes, bytes, int]:
        graph = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["Y"])], "bench",
                                  [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", rows])],
                                  [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 256])])
        model = helper.make_model(helper.make_graph([], "x", [], []), opset_imports=[helper.make_opsetid("", 17)])
        model.ClearField("graph")
        payload = rows * 256 * 4
        tensor = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[rows, 256]).SerializeToString()
        tensor_head = tensor + b"\x4a" + _varint(payload)  # raw_data (field 9), then the payload
        init = b"\x2a" + _varint(len(tensor_head) + payload) + tensor_head  # GraphProto.initializer (field 5)
        body = graph.SerializeToString()
        head = model.SerializeToString() + b"\x3a" + _varint(len(body) + len(init) + payload) + body + init
        return head, b"", b"", payload

    rows = max(1, size // 1024 - 1)
    while True:  # the header is ~100 bytes: shrink the weights until the file is exactly SIZE (padding by name)
        head, _, _, payload = layout(rows)
        if len(head) + payload <= size:
            break
        rows -= 1
    assert len(head) + payload <= size
    # the few bytes short go into a producer_version string (field 3, before everything else)
    short = size - len(head) - payload
    while True:
        pad = b"\x1a" + _varint(max(0, short - 2)) + b"p" * max(0, short - 2) if short >= 2 else b""
        if len(pad) + len(head) + payload == size or short < 2:
            break
        short -= 1
    with open(path, "wb") as f:
        f.write(pad + head)
        write_random(f, payload)
    onnx.checker.check_model(str(path))


def ingest_baseline(src: Path, dst_dir: Path, chunk: int = MiB) -> tuple[float, str]:
    """The reference pass: read + sha256 + write + fsync of the file, in-process, one thread."""
    dst = dst_dir / f"baseline-{uuid.uuid4().hex}"
    sha = hashlib.sha256()
    t0 = time.perf_counter()
    with open(src, "rb", buffering=0) as f, open(dst, "wb", buffering=0) as out:
        buf = bytearray(chunk)
        view = memoryview(buf)
        while n := f.readinto(buf):
            sha.update(view[:n])
            out.write(view[:n])
        os.fsync(out.fileno())
    elapsed = time.perf_counter() - t0
    dst.unlink()
    return elapsed, sha.hexdigest()


def curl(args: list[str], timeout: float = 600) -> tuple[int, float, str]:
    """Run curl; (http status, time_total in s, body)."""
    out = subprocess.run(["curl", "-sS", "--noproxy", "*", "-w", "\n%{http_code} %{time_total}", *args],
                         capture_output=True, text=True, timeout=timeout, check=True)
    body, _, tail = out.stdout.rpartition("\n")
    code, total = tail.split()
    return int(code), float(total), body


def wait_conversion(c: Client, model_id: str, limit: float = 300) -> str:
    """Wait (bounded) until the automatic ONNX conversion of version 1 is no longer pending or running."""
    deadline = time.monotonic() + limit
    status = "?"
    while time.monotonic() < deadline:
        code, body, _ = c.call("GET", f"/api/v1/models/{model_id}/versions/1")
        status = json.loads(body)["formats"].get("onnx", {}).get("status", "?") if code == 200 else f"http {code}"
        if status not in ("pending", "running"):
            return status
        time.sleep(0.2)
    return status


def transfers(server: Octomil, files: dict[int, Path], runs: int, workdir: Path,
              www: Path, onnx_files: dict[int, Path]) -> dict[int, dict[str, Any]]:
    results: dict[int, dict[str, Any]] = {}
    auth = f"Authorization: Bearer {server.key}"
    base = f"http://{HOST}:{server.port}/api/v1"
    # the warm pool's first need for each family, outside the measurements
    upload_onnx(server, min(onnx_files.values(), key=lambda p: p.stat().st_size))
    with nginx(www, workdir) as nginx_port:
        for size, path in files.items():
            r: dict[str, Any] = {"ingest": [], "upload": [], "download": [], "nginx": [], "hwm": [], "load": [],
                                 "upload_onnx": [], "load_onnx": []}
            for run in range(runs):
                wait_settled(server)
                r["load"].append(load())
                # the reference ingest pass, into the same file system as the registry's data directory;
                # each write measurement starts with no dirty pages of an earlier one still being written back
                os.sync()
                t_ingest, digest = ingest_baseline(path, server.data_dir)
                r["ingest"].append(t_ingest)
                c = server.client()
                code, body, _ = c.call("POST", "/api/v1/models", {"framework": "sklearn",
                                                                  "description": f"bench {size} {run}"})
                assert code == 201, body
                model_id = json.loads(body)["id"]
                c.close()
                os.sync()
                reset_peak(server.pid)
                code, t_up, body = curl(["-H", auth, "-F", f"file=@{path};filename=model.pkl", "-F", "format=sklearn",
                                         f"{base}/models/{model_id}/versions/upload"])
                assert code == 201, body
                assert json.loads(body)["model_hash"] == f"sha256:{digest}", body
                r["upload"].append(t_up)
                hwm_upload = proc_status(server.pid, "VmHWM")
                c = server.client()  # the pickle's conversion and the pool's refill are done before the ONNX upload
                wait_conversion(c, model_id)
                c.close()
                wait_settled(server)
                r["upload_onnx"].append(upload_onnx(server, onnx_files[size]))
                r["load_onnx"].append(load())
                # the automatic ONNX conversion of this random "pickle" runs (and fails) in a child process:
                # let it finish so it does not compete with the download measurement
                c = server.client()  # a fresh connection: the server closes idle ones after 5 s
                wait_conversion(c, model_id)
                c.close()
                url = f"{base}/models/{model_id}/versions/1/download"
                curl(["-H", auth, "-o", "/dev/null", url])  # warm-up
                code, t_dl, _ = curl(["-H", auth, "-o", "/dev/null", url])
                assert code == 200
                r["download"].append(t_dl)
                r["hwm"].append(max(hwm_upload, proc_status(server.pid, "VmHWM")))
                nurl = f"http://{HOST}:{nginx_port}/{path.name}"
                curl(["-o", "/dev/null", nurl])  # warm-up
                code, t_ng, _ = curl(["-o", "/dev/null", nurl])
                assert code == 200
                r["nginx"].append(t_ng)
                log(f"{size // MiB} MiB run {run + 1}: ingest {t_ingest:.2f}s upload {t_up:.2f}s "
                    f"download {t_dl:.2f}s nginx {t_ng:.2f}s VmHWM {r['hwm'][-1] / MiB:.0f} MiB (load {load()})")
            results[size] = r
    return results


def upload_onnx(server: Octomil, path: Path) -> float:
    """One ONNX upload (format=onnx, as the Octomil SDK sends it): checked before the 201, then stored."""
    c = server.client()
    code, body, _ = c.call("POST", "/api/v1/models", {"description": "bench onnx"})
    assert code == 201, body
    model_id = json.loads(body)["id"]
    c.close()
    os.sync()
    code, t_up, body = curl(["-H", f"Authorization: Bearer {server.key}", "-F", f"file=@{path};filename=model.onnx",
                             "-F", "format=onnx", f"http://{HOST}:{server.port}/api/v1/models/{model_id}/versions/upload"])
    assert code == 201, body
    assert json.loads(body)["formats"]["onnx"] == "ready", body
    return t_up


def ready_inputs(work: Path) -> dict[str, tuple[str, bytes, str]]:
    """framework -> (model framework, file bytes, file name): the small models of issue 13."""
    import pickle

    import numpy as np
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    out = {"sklearn LogisticRegression (iris)": ("sklearn", pickle.dumps(LogisticRegression(max_iter=500).fit(x, y)),
                                                 "model.pkl")}
    try:
        import xgboost as xgb

        booster = xgb.train({"objective": "multi:softprob", "num_class": 3, "max_depth": 3}, xgb.DMatrix(x, y), 6)
        path = work / "booster.json"
        booster.save_model(str(path))
        out["XGBoost booster (6 trees, json)"] = ("xgboost", path.read_bytes(), "model.json")
    except ImportError:
        log("xgboost missing: no XGBoost time-to-ready")
    try:
        import torch

        net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).eval()
        path = work / "model.pt2"
        torch.export.save(torch.export.export(net, (torch.from_numpy(np.asarray(x[:2], np.float32)),)), str(path))
        out["PyTorch .pt2 (small MLP)"] = ("pytorch", path.read_bytes(), "model.pt2")
    except ImportError:
        log("torch missing: no .pt2 time-to-ready")
    return out


def multipart(content: bytes, filename: str) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def warm_families(server: Octomil) -> dict[str, Any]:
    c = Client(server.port)
    code, body, _ = c.call("GET", "/health")
    c.close()
    health = json.loads(body)
    assert "warm_pool" in health, (code, health)
    return health["warm_pool"]


def wait_settled(server: Octomil, limit: float = 180) -> None:
    """Bounded wait until no warm worker is still importing (its refill would compete with a measurement)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        families = warm_families(server).get("families", {})
        if all(f["ready"] == f["idle"] for f in families.values()):
            return
        time.sleep(0.1)


def wait_warm(server: Octomil, families: tuple[str, ...], limit: float = 180) -> None:
    """Bounded wait until the server's warm pool has a ready worker of each family (a warm measurement's premise)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        pool = warm_families(server)
        if all(pool.get("families", {}).get(f, {}).get("ready", 0) >= 1 for f in families):
            return
        time.sleep(0.1)
    log(f"warm pool not ready after {limit} s: {warm_families(server)}")


def time_to_ready(server: Octomil, framework: str, content: bytes, filename: str, limit: float = 300) -> float:
    """Seconds from sending the upload to its ONNX format showing `ready` (polled every 10 ms); parity is asserted."""
    c = server.client()
    code, body, _ = c.call("POST", "/api/v1/models", {"framework": framework, "description": "bench ready"})
    assert code == 201, body
    model_id = json.loads(body)["id"]
    payload, ctype = multipart(content, filename)
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(HOST, server.port, timeout=60)
    conn.request("POST", f"/api/v1/models/{model_id}/versions/upload", body=payload,
                 headers={"Authorization": f"Bearer {server.key}", "Content-Type": ctype})
    resp = conn.getresponse()
    assert resp.status == 201, resp.read()
    resp.read()
    conn.close()
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        code, body, _ = c.call("GET", f"/api/v1/models/{model_id}/versions/1")
        onnx = json.loads(body)["formats"].get("onnx", {})
        if onnx.get("status") not in ("pending", "running"):
            elapsed = time.perf_counter() - t0
            c.close()
            assert onnx.get("status") == "ready" and onnx.get("parity", {}).get("within"), onnx
            return elapsed
        time.sleep(0.01)
    c.close()
    raise AssertionError(f"{filename}: not ready after {limit} s")


FAMILY_OF = {"sklearn": "estimators", "xgboost": "estimators", "pytorch": "torch"}


def readiness(work: Path, runs: int, cold_runs: int) -> dict[str, Any]:
    """Time-to-ready per framework: a warm-pool server and a --no-warm-pool one, alternating, in the same run."""
    inputs = ready_inputs(work)
    out: dict[str, Any] = {"frameworks": {}}
    servers = []
    try:
        for name, extra in (("warm", ()), ("cold", ("--no-warm-pool",))):
            d = work / f"ready-{name}"
            shutil.rmtree(d, ignore_errors=True)
            srv = Octomil(d, work / "serve.log", *extra)
            srv.make_key()
            servers.append(srv.start())
        warm, cold = servers
        time.sleep(1.0)
        out["idle_rss_no_workers"] = {"warm": proc_status(warm.pid, "VmRSS"), "cold": proc_status(cold.pid, "VmRSS")}
        for label, (framework, content, filename) in inputs.items():
            families = (FAMILY_OF[framework], "onnx-check")
            time_to_ready(warm, framework, content, filename)  # first need: the family's warm workers start
            r: dict[str, list[Any]] = {"warm": [], "cold": [], "load": []}
            for run in range(max(runs, cold_runs)):
                if run < cold_runs:
                    r["cold"].append(time_to_ready(cold, framework, content, filename))
                if run < runs:
                    wait_warm(warm, families)
                    r["warm"].append(time_to_ready(warm, framework, content, filename))
                r["load"].append(load())
                log(f"{label} run {run + 1}: warm {r['warm'][-1] if r['warm'] else '-'} "
                    f"cold {r['cold'][-1] if run < cold_runs else '-'} (load {r['load'][-1]})")
            out["frameworks"][label] = r
        wait_warm(warm, ("estimators", "torch", "onnx-check"))
        pool = warm_families(warm)
        out["warm_pool"] = pool
        out["server_rss_with_pool"] = proc_status(warm.pid, "VmRSS")
        out["load"] = load()
        log(f"warm pool: {pool}")
    finally:
        for srv in servers:
            srv.stop()
    return out


def latencies(c: Client, ops: dict[str, Callable[[int], tuple[str, str, Any]]], n: int, warmup: int,
              budget: float) -> dict[str, list[float]]:
    """Sequential calls of each op, n times (after warm-up), bounded by `budget` seconds per op."""
    out: dict[str, list[float]] = {}
    for name, make in ops.items():
        for i in range(warmup):
            method, path, body = make(-1 - i)
            c.call(method, path, body)
        times: list[float] = []
        deadline = time.monotonic() + budget
        for i in range(n):
            method, path, body = make(i)
            code, payload, t = c.call(method, path, body)
            if code >= 300:
                raise RuntimeError(f"{name}: {method} {path} -> {code} {payload[:200]!r}")
            times.append(t)
            if time.monotonic() > deadline:
                break
        out[name] = times
    return out


def octomil_ops(c: Client, tag: str, n: int) -> dict[str, Callable[[int], tuple[str, str, Any]]]:
    ids: list[str] = []

    def create(i: int) -> tuple[str, str, Any]:
        return "POST", "/api/v1/models", {"name": f"{tag}-{i}-{uuid.uuid4().hex[:6]}", "framework": "sklearn",
                                          "description": "benchmark model"}

    def get(i: int) -> tuple[str, str, Any]:
        if not ids:
            for k in range(min(n, 200)):
                _, body, _ = c.call(*create(10_000_000 + k))
                ids.append(json.loads(body)["id"])
        return "GET", f"/api/v1/models/{ids[i % len(ids)]}", None

    return {"create": create, "get": get, "list-20": lambda i: ("GET", "/api/v1/models?limit=20", None)}


def mlflow_ops(c: Client, tag: str, n: int) -> dict[str, Callable[[int], tuple[str, str, Any]]]:
    names: list[str] = []
    api = "/api/2.0/mlflow/registered-models"

    def create(i: int) -> tuple[str, str, Any]:
        return "POST", f"{api}/create", {"name": f"{tag}-{i}-{uuid.uuid4().hex[:6]}", "description": "benchmark model"}

    def get(i: int) -> tuple[str, str, Any]:
        if not names:
            for k in range(min(n, 200)):
                method, path, body = create(10_000_000 + k)
                c.call(method, path, body)
                names.append(body["name"])
        return "GET", f"{api}/get?name={names[i % len(names)]}", None

    return {"create": create, "get": get, "list-20": lambda i: ("GET", f"{api}/search?max_results=20", None)}


async def seed(data_dir: Path, count: int) -> float:
    """Insert `count` models through the project's own SQLiteStore (schema, migrations, writer transaction)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from octomil_lite.registry import utc_now
    from octomil_lite.storage.sqlite import SQLiteStore, _insert

    frameworks = ["pytorch", "tensorflow", "xgboost", "sklearn"]
    data_dir.mkdir(parents=True, exist_ok=True)
    db = await SQLiteStore.open(data_dir / "registry.sqlite3")
    t0 = time.perf_counter()
    try:
        rnd = random.Random(5)
        done = 0
        while done < count:
            rows = []
            for i in range(done, min(count, done + 10_000)):
                rows.append({"id": str(uuid.uuid4()), "name": f"seed-{i}", "use_case": None,
                             "framework": frameworks[i % 4], "framework_version": "1.0", "description": f"seed {i}",
                             "is_baseline": int(i % 10 == 0), "round_id": None, "accuracy": rnd.random(),
                             "loss": rnd.random(), "created_at": utc_now()})
            sql = _insert("models", rows[0])[0]
            async with db.transaction() as conn:
                await conn.executemany(sql, [tuple(r.values()) for r in rows])
            done += len(rows)
    finally:
        await db.close()
    return time.perf_counter() - t0


def wrk(port: int, key: str, path: str, connections: int, seconds: int, workdir: Path) -> dict[str, Any]:
    script = workdir / "auth.lua"
    script.write_text(f'wrk.headers["Authorization"] = "Bearer {key}"\n')
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "2s",
                          "-s", str(script), f"http://{HOST}:{port}{path}"],
                         capture_output=True, text=True, timeout=seconds + 60, check=True).stdout

    def dur(text: str) -> float:
        m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
        assert m, text
        return float(m[1]) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[m[2]]

    lat = {m[1]: dur(m[2]) for m in re.finditer(r"^\s+(50|75|90|99)%\s+(\S+)", out, re.M)}
    errors = 0
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(x) for x in m.groups())
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(m[1])
    total = int(re.search(r"(\d+) requests in", out)[1])  # type: ignore[index]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])  # type: ignore[index]
    return {"rps": rps, "p50": lat.get("50"), "p99": lat.get("99"), "errors": errors, "requests": total, "raw": out}


# ----------------------------------------------------------------------------------------------------------------
# report


def machine() -> dict[str, str]:
    def run(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "?"

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    return {"nproc": run("nproc"), "cpu": cpu, "memory": f"{mem / GiB:.1f} GiB", "kernel": platform.release(),
            "python": platform.python_version(), "disk": " ".join(run("df", "-hT", ".").splitlines()[-1].split()[:3]),
            "nginx": subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip(),
            "wrk": run("wrk", "-v").splitlines()[0] if run("wrk", "-v") else "?",
            "curl": run("curl", "--version").splitlines()[0]}


def ms(x: float) -> str:
    return f"{x * 1000:.2f} ms"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/octomil-bench"))
    ap.add_argument("--sizes", default="256,1024", help="transfer sizes in MiB, comma-separated")
    ap.add_argument("--runs", type=int, default=3, help="repetitions of each transfer and latency series")
    ap.add_argument("--ops", type=int, default=400, help="sequential calls per metadata operation and series")
    ap.add_argument("--seed-models", type=int, default=100_000)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--startups", type=int, default=5)
    ap.add_argument("--mlflow-venv", type=Path, default=None)
    ap.add_argument("--mlflow-ops", type=int, default=100, help="sequential calls per operation against MLflow")
    ap.add_argument("--ready-runs", type=int, default=7, help="warm time-to-ready measurements per framework")
    ap.add_argument("--cold-runs", type=int, default=3, help="cold (--no-warm-pool) ones, alternating with them")
    ap.add_argument("--skip", default="",
                    help="comma-separated sections to skip: transfer,meta,mlflow,big,startup,ready")
    ap.add_argument("--json", type=Path, default=None, help="also write all raw figures here")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    assert OCTOMIL, "octomil-lite is not installed in this Python's environment"
    for tool in ("curl", "nginx", "wrk"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            sys.exit(f"{tool} is missing: apt-get update && apt-get install -y nginx-light wrk curl")

    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    www = work / "www"
    www.mkdir(exist_ok=True)
    os.chmod(work, 0o755)
    os.chmod(www, 0o755)
    res: dict[str, Any] = {"machine": machine(), "load_start": load(),
                           "args": vars(args) | {"workdir": str(work), "mlflow_venv": str(args.mlflow_venv)}}
    log(f"machine: {res['machine']}; load {res['load_start']}")
    servers: list[Octomil] = []
    try:
        # 1. start-up and idle memory: a fresh data directory each time, with its key made beforehand
        if "startup" not in skip:
            ups, idle = [], []
            for i in range(args.startups):
                d = work / f"startup-{i}"
                shutil.rmtree(d, ignore_errors=True)
                s = Octomil(d, work / "serve.log")
                s.make_key()
                servers.append(s.start())
                time.sleep(1.0)
                ups.append(s.startup)
                idle.append(proc_status(s.pid, "VmRSS"))
                s.stop()
                shutil.rmtree(d, ignore_errors=True)
            res["startup"] = {"seconds": ups, "idle_rss": idle}
            log(f"start-up {[round(x, 3) for x in ups]} s, idle RSS {[x // MiB for x in idle]} MiB")

        # 2. transfers + metadata latency on a small registry
        d = work / "small"
        shutil.rmtree(d, ignore_errors=True)
        s = Octomil(d, work / "serve.log")
        s.make_key()
        servers.append(s.start())
        if "transfer" not in skip:
            files, onnx_files = {}, {}
            for mib in (int(x) for x in args.sizes.split(",")):
                files[mib * MiB] = www / f"model-{mib}M.pkl"
                onnx_files[mib * MiB] = work / f"model-{mib}M.onnx"
                log(f"making {files[mib * MiB]} and {onnx_files[mib * MiB]}")
                make_file(files[mib * MiB], mib * MiB)
                make_onnx_file(onnx_files[mib * MiB], mib * MiB)
            os.chmod(www, 0o755)
            res["transfer"] = {str(k): v for k, v in transfers(s, files, args.runs, work, www, onnx_files).items()}
        if "meta" not in skip:
            series = []
            for run in range(args.runs):
                c = s.client()
                series.append(latencies(c, octomil_ops(c, f"o{run}", args.ops), args.ops, 20, 60))
                c.close()
            res["meta"] = series
            log("octomil metadata: " + ", ".join(f"{k} p50 {ms(median(v))}" for k, v in series[-1].items()))
        s.stop()

        if "ready" not in skip:
            res["ready"] = readiness(work, args.ready_runs, args.cold_runs)

        if args.mlflow_venv and "mlflow" not in skip:
            with mlflow_server(args.mlflow_venv, work) as port:
                series = []
                for run in range(args.runs):
                    c = Client(port)
                    series.append(latencies(c, mlflow_ops(c, f"m{run}", args.mlflow_ops), args.mlflow_ops, 10, 60))
                    c.close()
                res["mlflow"] = series
                log("mlflow metadata: " + ", ".join(f"{k} p50 {ms(median(v))}" for k, v in series[-1].items()))

        # 3. a big registry: list-20 at 100k models, and 64 concurrent clients on GET /models/{id}
        if "big" not in skip:
            d = work / "big"
            if not (d / ".seeded").exists() or (d / ".seeded").read_text() != str(args.seed_models):
                shutil.rmtree(d, ignore_errors=True)
                t = asyncio.run(seed(d, args.seed_models))
                (d / ".seeded").write_text(str(args.seed_models))
                log(f"seeded {args.seed_models} models in {t:.1f} s")
            b = Octomil(d, work / "serve.log")
            b.make_key()
            servers.append(b.start())
            c = b.client()
            _, body, _ = c.call("GET", f"/api/v1/models?limit=1&offset={args.seed_models // 2}")
            some_id = json.loads(body)["models"][0]["id"]
            half = args.seed_models // 2
            ops = {
                "list-20": lambda i: ("GET", "/api/v1/models?limit=20", None),
                "list-20 framework=sklearn": lambda i: ("GET", "/api/v1/models?limit=20&framework=sklearn", None),
                "list-20 is_baseline=true": lambda i: ("GET", "/api/v1/models?limit=20&is_baseline=true", None),
                f"list-20 offset={half}": lambda i: ("GET", f"/api/v1/models?limit=20&offset={half}", None),
                "get": lambda i: ("GET", f"/api/v1/models/{some_id}", None),
            }
            res["big"] = [latencies(c, ops, args.ops, 20, 60) for _ in range(args.runs)]
            c.close()
            log("100k: " + ", ".join(f"{k} p50 {ms(median(v))}" for k, v in res["big"][-1].items()))
            conc = []
            for _ in range(args.runs):
                reset_peak(b.pid)
                cpu0 = cpu_seconds(b.pid)
                r = wrk(b.port, b.key, f"/api/v1/models/{some_id}", args.clients, args.seconds, work)
                r["hwm"] = proc_status(b.pid, "VmHWM")
                r["cpu_per_request"] = (cpu_seconds(b.pid) - cpu0) / max(1, r["requests"])
                r["load"] = load()
                conc.append(r)
                log(f"wrk: {r['rps']:.0f} req/s p50 {ms(r['p50'])} p99 {ms(r['p99'])} errors {r['errors']} "
                    f"VmHWM {r['hwm'] // MiB} MiB, server CPU {r['cpu_per_request'] * 1e6:.0f} us/request "
                    f"(load {r['load']})")
            res["concurrent"] = conc
            b.stop()
    finally:
        for srv in servers:
            srv.stop()
    res["load_end"] = load()
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=str))
    print(report(res, args))
    return 0


def report(res: dict[str, Any], args: argparse.Namespace) -> str:
    rows: list[tuple[str, str, str, str, str]] = []  # figure, value, baseline, ratio/figure, target

    def ok(good: bool) -> str:
        return "✅" if good else "❌"

    for size, r in res.get("transfer", {}).items():
        mib = int(size) // MiB
        up, ing = median(r["upload"]), median(r["ingest"])
        dl, ng = median(r["download"]), median(r["nginx"])
        rows.append((f"upload {mib} MiB (curl -F)", f"{up:.2f} s ({int(size) / up / MiB:.0f} MiB/s)",
                     f"ingest pass {ing:.2f} s ({int(size) / ing / MiB:.0f} MiB/s)", f"{ing / up:.2f}×",
                     f"≥ 0.6 {ok(ing / up >= 0.6)}"))
        rows.append((f"download {mib} MiB (curl)", f"{dl:.2f} s ({int(size) / dl / MiB:.0f} MiB/s)",
                     f"nginx sendfile {ng:.2f} s ({int(size) / ng / MiB:.0f} MiB/s)", f"{ng / dl:.2f}×",
                     f"≥ 0.33 {ok(ng / dl >= 0.33)}"))
        if r.get("upload_onnx"):
            uo = median(r["upload_onnx"])
            rows.append((f"ONNX upload {mib} MiB (curl -F, format=onnx, checked before 201)",
                         f"{uo:.2f} s ({int(size) / uo / MiB:.0f} MiB/s)",
                         f"same-size pickle upload {up:.2f} s; ingest {ing:.2f} s",
                         f"{uo / up:.2f}× pickle; {ing / uo:.2f}× ingest", f"≤ 1.25× {ok(uo / up <= 1.25)}"))
        hwm = max(r["hwm"])
        rows.append((f"server peak RSS, {mib} MiB up+down", f"{hwm / MiB:.0f} MiB (max of runs)", "", "",
                     f"< 200 MiB {ok(hwm < 200 * MiB)}"))

    def merged(series: list[dict[str, list[float]]], op: str) -> list[float]:
        return [t for s in series for t in s[op]]

    if "meta" in res:
        for op in ("create", "get", "list-20"):
            ours = [median(s[op]) for s in res["meta"]]
            ours99 = [pct(s[op], 99) for s in res["meta"]]
            mean_ours = median([statistics.fmean(s[op]) for s in res["meta"]])
            base, ratio, target = "", "", {"get": f"p50 < 2 ms {ok(median(ours) < 0.002)}"}.get(op, "")
            if "mlflow" in res:
                theirs = [median(s[op]) for s in res["mlflow"]]
                mean_theirs = median([statistics.fmean(s[op]) for s in res["mlflow"]])
                base = f"MLflow p50 {ms(median(theirs))}, p99 {ms(median([pct(s[op], 99) for s in res['mlflow']]))}"
                ratio = f"{mean_theirs / mean_ours:.1f}× throughput"
                target = (target + " · " if target else "") + f"≥ 5× {ok(mean_theirs / mean_ours >= 5)}"
            rows.append((f"{op} (sequential, 1 conn)", f"p50 {ms(median(ours))}, p99 {ms(median(ours99))}",
                         base, ratio, target))
    if "big" in res:
        n = res["args"]["seed_models"]
        for op in res["big"][0]:
            p50 = median([median(s[op]) for s in res["big"]])
            p99 = median([pct(s[op], 99) for s in res["big"]])
            target = f"p50 < 5 ms {ok(p50 < 0.005)}" if op == "list-20" else ""
            rows.append((f"{op} at {n:,} models", f"p50 {ms(p50)}, p99 {ms(p99)}", "", "", target))
    if "concurrent" in res:
        c = res["concurrent"]
        rps = median([r["rps"] for r in c])
        p99 = median([r["p99"] for r in c])
        errors = sum(r["errors"] for r in c)
        rows.append((f"{args.clients} clients × {args.seconds} s GET /models/{{id}} (wrk -t1)",
                     f"{rps:.0f} req/s, p50 {ms(median([r['p50'] for r in c]))}, p99 {ms(p99)}, {errors} errors; "
                     f"server CPU {median([r['cpu_per_request'] for r in c]) * 1e6:.0f} µs/request",
                     "", "", f"0 errors, p99 < 50 ms {ok(errors == 0 and p99 < 0.05)}"))
    if "ready" in res:
        targets = {"sklearn": 0.3, "XGBoost": 0.3, "PyTorch": 1.0}
        for label, r in res["ready"]["frameworks"].items():
            w, c = median(r["warm"]), median(r["cold"])
            target = next(v for k, v in targets.items() if label.startswith(k))
            rows.append((f"upload → ONNX ready, {label}", f"warm pool {w:.2f} s (n={len(r['warm'])})",
                         f"--no-warm-pool {c:.2f} s (n={len(r['cold'])})", f"{c / w:.1f}× faster",
                         f"< {target} s {ok(w < target)} (load {r['load'][len(r['load']) // 2]})"))
        pool = res["ready"]["warm_pool"]
        idle = res["ready"]["idle_rss_no_workers"]
        rows.append(("server RSS, idle, no warm workers", f"{idle['warm'] / MiB:.0f} MiB",
                     f"--no-warm-pool {idle['cold'] / MiB:.0f} MiB", "", f"< 60 MiB {ok(idle['warm'] < 60 * MiB)}"))
        per = ", ".join(f"{k} {v / MiB:.0f} MiB" for k, v in pool.get("memory_bytes", {}).items())
        rows.append(("warm pool memory (1 idle worker per family, cgroup charge)",
                     f"{pool.get('total_memory_bytes', 0) / MiB:.0f} MiB ({per})", "", "",
                     "bounded by --warm-pool-size × families"))
    if "startup" in res:
        up = median(res["startup"]["seconds"])
        idle = median(res["startup"]["idle_rss"])
        rows.append(("serve start-up to first 200 /health", f"{up:.2f} s", "", "", f"< 1.5 s {ok(up < 1.5)}"))
        rows.append(("idle RSS after start-up", f"{idle / MiB:.0f} MiB", "", "", f"< 120 MiB {ok(idle < 120 * MiB)}"))

    out = ["| figure | octomil-lite (median) | baseline, same run | ratio | target |", "|---|---|---|---|---|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    m = res["machine"]
    out.append("")
    out.append(f"Machine: {m['nproc']} × {m['cpu']}, {m['memory']} RAM, disk {m['disk']}, Linux {m['kernel']}, "
               f"Python {m['python']}; {m['nginx']}; {m['wrk']}; {m['curl']}.")
    out.append(f"Load average at start {res['load_start']}, at end {res['load_end']}; {args.runs} runs per figure.")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
