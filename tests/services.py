"""Real PostgreSQL and SeaweedFS S3 servers started by the tests (session-wide), each in a temporary directory."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import httpx

PG_BIN = Path(os.environ.get("OCTOMIL_LITE_PG_BIN", "/usr/lib/postgresql/15/bin"))
S3_KEY, S3_SECRET = "octomil-test", "octomil-test-secret"


def _free_port_pair() -> int:
    """A port p such that p and p + 10000 (SeaweedFS's gRPC port) are both free."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


def _as_postgres() -> list[str]:
    """PostgreSQL refuses to run as root: drop to the `postgres` user when root (as CI is)."""
    return ["setpriv", "--reuid=postgres", "--regid=postgres", "--clear-groups"] if os.geteuid() == 0 else []


class Postgres:
    """A PostgreSQL 15 cluster on a Unix socket in a temporary directory; one fresh database per test."""

    def __init__(self, fsync: bool = False) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="octomil-pg-"))
        os.chmod(self.dir, 0o755)
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
        data = self.dir / "data"
        run = _as_postgres()
        subprocess.run([*run, str(PG_BIN / "initdb"), "--no-sync", "-A", "trust", "-U", "postgres", "-D", str(data)],
                       check=True, capture_output=True, timeout=120)
        # fsync off in tests: they check ordering and locking, not power-loss durability (bench/ turns it on).
        options = f"-k {self.dir} -c listen_addresses='' -c fsync={'on' if fsync else 'off'} -c max_connections=200"
        subprocess.run([*run, str(PG_BIN / "pg_ctl"), "-D", str(data), "-w", "-l", str(self.dir / "log"),
                        "-o", options, "start"], check=True, capture_output=True, timeout=60)
        self.data = data

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@/{database}?host={self.dir}"

    def new_database(self) -> str:
        import asyncio

        import asyncpg

        name = f"t_{uuid.uuid4().hex[:12]}"

        async def create() -> None:
            conn = await asyncpg.connect(self.url())
            try:
                await conn.execute(f"CREATE DATABASE {name}")
            finally:
                await conn.close()

        asyncio.run(create())
        return self.url(name)

    def stop(self) -> None:
        subprocess.run([*_as_postgres(), str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)


class SeaweedS3:
    """SeaweedFS (`weed server` with its S3 gateway) on loopback, telemetry off; one fresh prefix per test."""

    bucket = "octomil-test"

    def __init__(self, weed: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="octomil-s3-"))
        (self.dir / "data").mkdir()
        config = self.dir / "s3.json"
        identity = {"name": "test", "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
        config.write_text(json.dumps({"identities": [identity]}))
        master, volume, filer, s3 = (_free_port_pair() for _ in range(4))
        self.master = master
        self.endpoint = f"http://127.0.0.1:{s3}"
        with open(self.dir / "weed.log", "wb") as log:
            self.proc = subprocess.Popen(
                [weed, "server", f"-dir={self.dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                 "-master.telemetry=false", f"-master.port={master}", f"-volume.port={volume}",
                 f"-filer.port={filer}", "-s3", f"-s3.port={s3}", f"-s3.config={config}",
                 "-s3.port.iceberg=0", "-s3.port.lance=0"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                httpx.get(self.endpoint, timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
            if self.proc.poll() is not None:
                output = (self.dir / "weed.log").read_text()[-2000:]
                self.stop()
                raise RuntimeError(f"weed exited: {output}")
        else:
            self.stop()
            raise RuntimeError("weed did not answer S3 within 60 s")
        for _ in range(50):  # the master may need a moment before it accepts a bucket
            out = subprocess.run([weed, "shell", f"-master=127.0.0.1:{master}"], capture_output=True, text=True,
                                 input=f"s3.bucket.create -name {self.bucket}\n", timeout=60)
            if "created bucket" in out.stdout or "already exists" in out.stdout:
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"could not create the test bucket: {out.stdout[-500:]} {out.stderr[-500:]}")

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET,
                "AWS_REGION": "us-east-1"}

    def new_prefix(self) -> str:
        return f"s3://{self.bucket}/t-{uuid.uuid4().hex[:12]}"

    def stop(self) -> None:
        # SIGTERM takes ~35 s; the data directory is thrown away anyway.
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
