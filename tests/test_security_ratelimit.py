"""Security: the per-key rate limit holds under a concurrent burst, failed authentication included (a real server)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import Server, bearer, make_key

LIMIT = 60  # per minute, so one token a second refills


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[tuple[Server, dict[str, str]]]:
    home = tmp_path / "data"
    keys = {name: make_key(home, name, "read") for name in ("a", "b")}
    server = Server(home, "--rate-limit", str(LIMIT))
    try:
        yield server, keys
    finally:
        server.stop()


async def _burst(url: str, headers_list: list[dict[str, str]], path: str = "/api/v1/models") -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=50)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        return await asyncio.gather(*(client.get(path, headers=h) for h in headers_list))


def _check_429(resp: httpx.Response) -> None:
    assert resp.json()["error"] == "rate_limited"
    retry = resp.headers["retry-after"]
    assert retry.isdigit() and 1 <= int(retry) <= 60, retry


def test_burst_with_a_valid_key_is_cut_at_the_limit(limited: tuple[Server, dict[str, str]]) -> None:
    server, keys = limited
    start = time.monotonic()
    responses = asyncio.run(_burst(server.url, [bearer(keys["a"])] * (2 * LIMIT + 30)))
    elapsed = time.monotonic() - start
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429}, set(codes)
    assert LIMIT <= codes.count(200) <= LIMIT + 1 + int(elapsed), (codes.count(200), elapsed)
    for r in responses:
        if r.status_code == 429:
            _check_429(r)
    # another key has its own bucket
    other = asyncio.run(_burst(server.url, [bearer(keys["b"])] * 10))
    assert [r.status_code for r in other] == [200] * 10


def test_failed_authentication_is_limited_too_whatever_the_client_claims(
        limited: tuple[Server, dict[str, str]]) -> None:
    """Wrong keys, no key, malformed headers and a different X-Forwarded-For on every request: one budget."""
    server, keys = limited
    variants: list[dict[str, str]] = []
    for i in range(2 * LIMIT + 30):
        header = [{"Authorization": f"Bearer oml_guess{i}"}, {}, {"Authorization": f"Basic {i}"},
                  {"Authorization": keys["a"][:-1] + "x"}][i % 4]
        variants.append({**header, "X-Forwarded-For": f"10.{i % 250}.{i // 250}.7", "X-Real-IP": f"10.9.9.{i % 250}"})
    start = time.monotonic()
    responses = asyncio.run(_burst(server.url, variants))
    elapsed = time.monotonic() - start
    codes = [r.status_code for r in responses]
    assert set(codes) <= {401, 429}, set(codes)
    assert codes.count(401) <= LIMIT + 1 + int(elapsed), (codes.count(401), elapsed)
    assert codes.count(429) >= LIMIT // 2
    for r in responses:
        if r.status_code == 429:
            _check_429(r)
    # guessing keys does not lock out the owner of a real one
    assert asyncio.run(_burst(server.url, [bearer(keys["a"])]))[0].status_code == 200


def test_a_limited_key_recovers_after_retry_after(limited: tuple[Server, dict[str, str]]) -> None:
    server, keys = limited
    responses = asyncio.run(_burst(server.url, [bearer(keys["b"])] * (LIMIT + 5)))
    limited_ = [r for r in responses if r.status_code == 429]
    assert limited_, "the burst was never limited"
    wait = int(limited_[-1].headers["retry-after"])
    with httpx.Client(base_url=server.url, headers=bearer(keys["b"])) as client:
        assert client.get("/api/v1/models").status_code == 429
        time.sleep(wait + 0.1)
        assert client.get("/api/v1/models").status_code == 200
