"""Fixtures: real registries on tmp_path, served in-process or by a real `octomil-lite serve`."""

from __future__ import annotations

import asyncio
import os
import pickle
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


@pytest.fixture(params=["sqlite"])
async def metadata_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MetadataStore]:
    """Each MetadataStore backend in turn (a second backend adds its name to params)."""
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
def config(tmp_path: Path) -> Config:
    return Config(data_dir=tmp_path / "data", rate_limit=0, conversion_workers=0)


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


async def on_app_loop(client: AsyncTestClient[Any], fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    return await asyncio.to_thread(client.blocking_portal.call, fn, *args)


@pytest.fixture
async def api(config: Config) -> AsyncIterator[Api]:
    async with AsyncTestClient(app=create_app(config)) as client:
        registry: Registry = client.app.state.registry
        keys = {scope: await on_app_loop(client, registry.create_key, f"test-{scope}", scope)
                for scope in ("read", "write", "admin")}
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


def make_key(home: Path, name: str = "t", scope: str = "write") -> str:
    """A new API key for the data directory `home`, made by the real CLI."""
    command = [sys.executable, "-m", "octomil_lite.cli", "keys", "create", "--name", name, "--scope", scope]
    out = subprocess.run(command, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OCTOMIL_LITE_HOME": str(home)})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A real `octomil-lite serve` subprocess on a free port."""

    def __init__(self, data_dir: Path, *args: str):
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OCTOMIL_LITE_HOME": str(data_dir)}
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
def server(tmp_path: Path) -> Iterator[Server]:
    srv = Server(tmp_path / "data")
    yield srv
    srv.stop()
