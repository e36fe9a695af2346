#!/usr/bin/env python3
"""Scaling out, measured in one run: S3 next to the local store, PostgreSQL next to SQLite, one process next to two.

    python bench/scale.py [--mib 256] [--requests 3000]

Starts its own PostgreSQL (fsync on) and SeaweedFS S3 (telemetry off) on loopback like the tests do, and
octomil-lite servers on them; every process it starts is stopped before it exits. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from services import Postgres, SeaweedS3

HOST = "127.0.0.1"
MiB = 1024 * 1024


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class Serve:
    """One `octomil-lite serve` subprocess."""

    def __init__(self, home: Path, env: dict[str, str]):
        self.port = free_port()
        self.env = {**os.environ, "OCTOMIL_LITE_HOME": str(home), **env}
        home.mkdir(parents=True, exist_ok=True)
        self.log = open(home / f"serve-{self.port}.log", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen([sys.executable, "-m", "octomil_lite.cli", "serve", "--port", str(self.port),
                                      "--rate-limit", "0"], stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                conn = http.client.HTTPConnection(HOST, self.port, timeout=1)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("server did not start")

    def key(self, name: str) -> str:
        out = subprocess.run([sys.executable, "-m", "octomil_lite.cli", "keys", "create", "--name", name,
                              "--scope", "admin"], capture_output=True, text=True, env=self.env, check=True)
        return out.stdout.strip()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def curl(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(["curl", "-sS", "-f", "-o", "/dev/null", *args], check=True, timeout=900)
    return time.perf_counter() - start


def transfer(server: Serve, key: str, path: Path, size: int) -> tuple[float, float]:
    auth = ["-H", f"Authorization: Bearer {key}"]
    conn = http.client.HTTPConnection(HOST, server.port)
    conn.request("POST", "/api/v1/models", body=json.dumps({}), headers={"Authorization": f"Bearer {key}",
                                                                         "Content-Type": "application/json"})
    model = json.loads(conn.getresponse().read())["id"]
    base = f"http://{HOST}:{server.port}/api/v1/models/{model}/versions"
    up = curl([*auth, "-F", f"file=@{path};filename=m.pkl", "-F", "format=sklearn", f"{base}/upload"])
    down = curl([*auth, f"{base}/1/download"])
    return size / MiB / up, size / MiB / down


async def raw_s3(s3: SeaweedS3, path: Path, size: int) -> tuple[float, float]:
    """The S3 server's own speed through the same client library, hashing on the way (the ceiling)."""
    import obstore
    from obstore.store import S3Store

    store = S3Store(s3.bucket, endpoint=s3.endpoint, access_key_id=s3.env["AWS_ACCESS_KEY_ID"],
                    secret_access_key=s3.env["AWS_SECRET_ACCESS_KEY"], region="us-east-1",
                    client_options={"allow_http": True})
    sha = hashlib.sha256()
    start = time.perf_counter()
    async with obstore.open_writer_async(store, "bench/raw", buffer_size=16 * MiB) as writer:
        with open(path, "rb") as f:
            while data := f.read(4 * MiB):
                sha.update(data)
                await writer.write(data)
    up = size / MiB / (time.perf_counter() - start)
    start = time.perf_counter()
    result = await obstore.get_async(store, "bench/raw")
    async for chunk in result.stream(min_chunk_size=4 * MiB):
        sha.update(chunk)
    return up, size / MiB / (time.perf_counter() - start)


def p50_ms(server: Serve, key: str, n: int) -> tuple[float, float]:
    conn = http.client.HTTPConnection(HOST, server.port)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    ids = []
    for i in range(50):
        conn.request("POST", "/api/v1/models", body=json.dumps({"name": f"m{i}"}), headers=headers)
        ids.append(json.loads(conn.getresponse().read())["id"])
    times: dict[str, list[float]] = {"get": [], "list": []}
    for i in range(n):
        for op, path in (("get", f"/api/v1/models/{ids[i % 50]}"), ("list", "/api/v1/models?limit=20")):
            start = time.perf_counter()
            conn.request("GET", path, headers=headers)
            conn.getresponse().read()
            times[op].append(time.perf_counter() - start)
    return statistics.median(times["get"]) * 1000, statistics.median(times["list"]) * 1000


def rps(servers: list[Serve], key: str, clients: int, total: int) -> float:
    """`clients` keep-alive connections spread over the servers' ports, each sending GET /models?limit=20."""
    per = total // clients
    barrier = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        conn = http.client.HTTPConnection(HOST, servers[i % len(servers)].port, timeout=60)
        barrier.wait()
        for _ in range(per):
            conn.request("GET", "/api/v1/models?limit=20", headers={"Authorization": f"Bearer {key}"})
            conn.getresponse().read()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return per * clients / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="octomil-bench-scale-"))
    weed = shutil.which("weed", path=os.path.dirname(sys.executable)) or shutil.which("weed")
    pg, s3 = Postgres(fsync=True), SeaweedS3(str(weed))
    servers: list[Serve] = []
    try:
        size = args.mib * MiB
        blob = work / "model.bin"
        with open(blob, "wb") as f:
            f.write(b"\x80\x04")
            for _ in range(args.mib):
                f.write(os.urandom(MiB))
        size = blob.stat().st_size
        shared = {"OCTOMIL_LITE_DATABASE": pg.new_database(), "OCTOMIL_LITE_BLOBS": s3.new_prefix(), **s3.env}
        local = Serve(work / "local", {})
        servers.append(local)
        a = Serve(work / "a", shared)
        servers.append(a)
        local_key, key = local.key("bench"), a.key("bench")
        rows = [("upload/download MiB/s, local store (SQLite + directory)", *transfer(local, local_key, blob, size)),
                ("upload/download MiB/s, S3 store (PostgreSQL + SeaweedFS)", *transfer(a, key, blob, size)),
                ("upload/download MiB/s, SeaweedFS through obstore alone", *asyncio.run(raw_s3(s3, blob, size)))]
        sqlite_p50, pg_p50 = p50_ms(local, local_key, 500), p50_ms(a, key, 500)
        b = Serve(work / "b", shared)
        servers.append(b)
        one = rps([a], key, 64, args.requests)
        two = rps([a, b], key, 64, args.requests)
        print("\n| measure | value | next to |\n|---|---|---|")
        for name, up, down in rows:
            print(f"| {name} | {up:.0f} up / {down:.0f} down | |")
        print(f"| GET /models/{{id}} p50 ms | PostgreSQL {pg_p50[0]:.2f} | SQLite {sqlite_p50[0]:.2f} |")
        print(f"| GET /models?limit=20 p50 ms | PostgreSQL {pg_p50[1]:.2f} | SQLite {sqlite_p50[1]:.2f} |")
        print(f"| 64 clients, GET /models, req/s | two processes {two:.0f} | one process {one:.0f} |")
        print(f"\nload average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    finally:
        for server in servers:
            server.stop()
        s3.stop()
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
