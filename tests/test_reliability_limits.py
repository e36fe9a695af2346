"""Reliability: oversized, truncated, abusive and out-of-range input gets a fast 4xx (never a 500) and leaves
nothing behind; a full disk gets 507 and a registry that is still consistent."""

from __future__ import annotations

import json
import select
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Api, Server, bearer, make_key
from test_reliability_crash import assert_downloads, assert_store_consistent, cli, payload, verify_clean

MiB = 1024 * 1024


def nothing_left(home: Path) -> None:
    assert [p.name for p in (home / "tmp").iterdir() if p.name.startswith("upload-")] == []
    assert [p for p in (home / "blobs").rglob("*") if p.is_file()] == []


def _headers(port: int, key: str, model_id: str, extra: str, boundary: str = "b") -> bytes:
    return (f"POST /api/v1/models/{model_id}/versions/upload HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {key}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
            f"{extra}\r\n").encode()


def send_until_answered(port: int, head: bytes, chunks: Iterator[bytes], timeout: float = 30) -> tuple[bytes, int]:
    """Send `head` then chunks until the server answers (or closes); return (response, body bytes sent)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(head)
        for chunk in chunks:
            readable, _, _ = select.select([conn], [], [], 0)
            if readable:
                break
            try:
                conn.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        conn.shutdown(socket.SHUT_WR) if False else None
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and b"\r\n\r\n" not in out:
            try:
                data = conn.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            out += data
        # the body, if the headers said how long it is
        if b"\r\n\r\n" in out:
            head_part, _, body = out.partition(b"\r\n\r\n")
            for line in head_part.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    need = int(line.split(b":")[1])
                    while len(body) < need:
                        try:
                            data = conn.recv(65536)
                        except ConnectionResetError:
                            break
                        if not data:
                            break
                        body += data
                    out = head_part + b"\r\n\r\n" + body
        return out, sent


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0


@pytest.fixture
def small_server(tmp_path: Path) -> Iterator[tuple[Server, str, str]]:
    home = tmp_path / "data"
    server = Server(home, "--max-upload-size", "1M")
    try:
        key = make_key(home)
        with httpx.Client(base_url=server.url, headers=bearer(key), timeout=30) as client:
            model_id = client.post("/api/v1/models", json={}).json()["id"]
        yield server, key, model_id
    finally:
        server.stop()


FILE_HEAD = b'--b\r\nContent-Disposition: form-data; name="file"; filename="m.pkl"\r\n\r\n\x80\x04\x95'


def _zeros(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    for _ in range(total // size):
        yield b"\0" * size


def test_declared_oversize_body_is_413_before_it_is_sent(small_server: tuple[Server, str, str]) -> None:
    server, key, model_id = small_server
    start = time.monotonic()
    head = _headers(server.port, key, model_id, f"Content-Length: {200 * MiB}\r\n")
    out, sent = send_until_answered(server.port, head, iter([FILE_HEAD, *_zeros(200 * MiB)]))
    assert status_of(out) == 413, out[:300]
    assert json.loads(out.partition(b"\r\n\r\n")[2])["error"] == "payload_too_large"
    assert sent < 20 * MiB and time.monotonic() - start < 10
    nothing_left(server.data_dir)


def test_chunked_oversize_body_is_413_early_and_leaves_nothing(small_server: tuple[Server, str, str]) -> None:
    server, key, model_id = small_server

    def chunked() -> Iterator[bytes]:
        for piece in (FILE_HEAD, *_zeros(200 * MiB)):
            yield f"{len(piece):x}\r\n".encode() + piece + b"\r\n"

    out, sent = send_until_answered(server.port, _headers(server.port, key, model_id, "Transfer-Encoding: chunked\r\n"),
                                    chunked())
    assert status_of(out) == 413, out[:300]
    assert sent < 20 * MiB
    nothing_left(server.data_dir)
    with httpx.Client(base_url=server.url, headers=bearer(key)) as client:
        assert client.get(f"/api/v1/models/{model_id}").json()["versions"] == []
        # just under the limit still works
        resp = client.post(f"/api/v1/models/{model_id}/versions/upload",
                           files={"file": ("m.pkl", payload(1, size=MiB - 4096))}, data={"format": "sklearn"})
        assert resp.status_code == 201, resp.text


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_client_disconnecting_mid_upload_leaves_nothing(small_server: tuple[Server, str, str], framing: str) -> None:
    server, key, model_id = small_server
    extra = "Content-Length: 900000\r\n" if framing == "content-length" else "Transfer-Encoding: chunked\r\n"
    body = FILE_HEAD + b"\0" * 600_000
    if framing == "chunked":
        body = f"{len(body):x}\r\n".encode() + body + b"\r\n"
    with socket.create_connection(("127.0.0.1", server.port)) as conn:
        conn.sendall(_headers(server.port, key, model_id, extra) + body)

        def staged() -> bool:
            return any(p.name.startswith("upload-") for p in (server.data_dir / "tmp").iterdir())

        deadline = time.monotonic() + 10
        while not staged() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert staged(), "the server never started staging the upload"
    # the socket is closed half-way: the staged file must go, and no version appear
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not any(p.name.startswith("upload-") for p in (server.data_dir / "tmp").iterdir()):
            break
        time.sleep(0.02)
    nothing_left(server.data_dir)
    with httpx.Client(base_url=server.url, headers=bearer(key)) as client:
        assert client.get(f"/api/v1/models/{model_id}").json()["versions"] == []
    assert "Traceback" not in server.output()


def _part(name: str, value: bytes, filename: str | None = None, headers: bytes = b"") -> bytes:
    fn = f'; filename="{filename}"' if filename is not None else ""
    return (f'--b\r\nContent-Disposition: form-data; name="{name}"{fn}\r\n'.encode() + headers + b"\r\n"
            + value + b"\r\n")


MODEL = b"\x80\x04\x95" + b"\1" * 100
ABUSE: dict[str, tuple[bytes, str]] = {
    "thousands of text parts": (b"".join(_part(f"f{i}", b"x") for i in range(5000)) + _part("file", MODEL, "m.pkl")
                                + b"--b--\r\n", "multipart/form-data; boundary=b"),
    "thousands of ignored file parts": (b"".join(_part(f"f{i}", b"x", "x.bin") for i in range(5000))
                                        + _part("file", MODEL, "m.pkl") + b"--b--\r\n",
                                        "multipart/form-data; boundary=b"),
    "huge part header": (_part("file", MODEL, "m.pkl", b"X-Big: " + b"a" * 200_000 + b"\r\n") + b"--b--\r\n",
                         "multipart/form-data; boundary=b"),
    "huge file name": (_part("file", MODEL, "a" * 100_000) + b"--b--\r\n", "multipart/form-data; boundary=b"),
    "many part headers": (_part("file", MODEL, "m.pkl", b"".join(b"X-H%d: v\r\n" % i for i in range(500)))
                          + b"--b--\r\n", "multipart/form-data; boundary=b"),
    "missing closing boundary": (_part("file", MODEL, "m.pkl"), "multipart/form-data; boundary=b"),
    "truncated in the file": (b'--b\r\nContent-Disposition: form-data; name="file"; filename="m.pkl"\r\n\r\n' + MODEL,
                              "multipart/form-data; boundary=b"),
    "truncated in a header": (b'--b\r\nContent-Disposition: form-data; name="fi', "multipart/form-data; boundary=b"),
    "no boundary parameter": (_part("file", MODEL, "m.pkl") + b"--b--\r\n", "multipart/form-data"),
    "empty boundary": (_part("file", MODEL, "m.pkl") + b"--b--\r\n", 'multipart/form-data; boundary=""'),
    "wrong boundary": (_part("file", MODEL, "m.pkl") + b"--b--\r\n", "multipart/form-data; boundary=zzz"),
    "huge boundary": (b"--" + b"q" * 5000 + b'\r\nContent-Disposition: form-data; name="file"; filename="m"\r\n\r\n'
                      + MODEL + b"\r\n--" + b"q" * 5000 + b"--\r\n", "multipart/form-data; boundary=" + "q" * 5000),
    "not multipart": (MODEL, "application/octet-stream"),
    "json instead": (b'{"file": "x"}', "application/json"),
    "urlencoded": (b"file=abc", "application/x-www-form-urlencoded"),
    "no content type": (MODEL, ""),
    "two file parts": (_part("file", MODEL, "a.pkl") + _part("file", MODEL, "b.pkl") + b"--b--\r\n",
                       "multipart/form-data; boundary=b"),
    "nameless part only": (b'--b\r\nContent-Disposition: form-data; filename="m.pkl"\r\n\r\n' + MODEL
                           + b"\r\n--b--\r\n", "multipart/form-data; boundary=b"),
    "no content-disposition": (b"--b\r\nContent-Type: text/plain\r\n\r\n" + MODEL + b"\r\n--b--\r\n",
                               "multipart/form-data; boundary=b"),
    "oversize text field": (_part("description", b"d" * 200_000) + _part("file", MODEL, "m.pkl") + b"--b--\r\n",
                            "multipart/form-data; boundary=b"),
    "non-utf8 text field": (_part("description", b"\xff\xfe\xfd") + _part("file", MODEL, "m.pkl") + b"--b--\r\n",
                            "multipart/form-data; boundary=b"),
    "NUL in a text field": (_part("description", b"a\x00b") + _part("file", MODEL, "m.pkl") + b"--b--\r\n",
                            "multipart/form-data; boundary=b"),
    "empty file": (_part("file", b"", "m.pkl") + b"--b--\r\n", "multipart/form-data; boundary=b"),
    "only the closing boundary": (b"--b--\r\n", "multipart/form-data; boundary=b"),
    "empty body": (b"", "multipart/form-data; boundary=b"),
    "bare LF line ends": (_part("file", MODEL, "m.pkl").replace(b"\r\n", b"\n") + b"--b--\n",
                          "multipart/form-data; boundary=b"),
    "header without colon": (b"--b\r\nContent-Disposition form-data\r\n\r\n" + MODEL + b"\r\n--b--\r\n",
                             "multipart/form-data; boundary=b"),
}


@pytest.mark.parametrize("case", list(ABUSE))
async def test_multipart_abuse_gets_a_fast_4xx_and_leaves_nothing(api: Api, case: str) -> None:
    body, content_type = ABUSE[case]
    model = await api.create_model()
    headers = {**api.headers, "content-type": content_type} if content_type else api.headers
    start = time.monotonic()
    resp = await api.client.post(f"/api/v1/models/{model['id']}/versions/upload", content=body, headers=headers)
    elapsed = time.monotonic() - start
    assert 400 <= resp.status_code < 500, (case, resp.status_code, resp.text[:300])
    assert resp.json()["error"] in ("bad_request", "payload_too_large", "unsupported_media_type")
    assert elapsed < 3, f"{case} took {elapsed:.1f} s"
    nothing_left(api.registry.config.data_dir)
    detail = (await api.client.get(f"/api/v1/models/{model['id']}", headers=api.headers)).json()
    assert detail["versions"] == []


BAD_JSON: list[Any] = [
    {"description": "d" * 1001}, {"name": "n" * 201}, {"use_case": "u" * 201}, {"framework_version": "v" * 201},
    {"round_id": "r" * 201}, {"framework": "caffe"}, {"framework": 1}, {"is_baseline": "true"}, {"is_baseline": 1},
    {"accuracy": "0.9"}, {"accuracy": [1]}, {"loss": {"a": 1}}, {"description": 5}, {"name": ["a"]},
    [], "x", 1, True,
]
RAW_BAD_BODIES = [b"{", b"{]", b"\xff\xfe", b'{"a": NaN}', b'{"accuracy": Infinity}', b'{"accuracy": 1e999}',
                  b'{"accuracy": -1e999}', b'{"accuracy": ' + b"9" * 5000 + b"}", b"[" * 100_000 + b"]" * 100_000,
                  b'{"a":' * 50_000 + b"1" + b"}" * 50_000, b'{"description": "\\ud800"}', b"\x00",
                  b'{"description": "a"} trailing', b'{"description": "a", "description": "' + b"b" * 2000 + b'"}']


async def test_bad_json_bodies_are_4xx_never_500(api: Api) -> None:
    model = await api.create_model()
    for method, url in (("POST", "/api/v1/models"), ("PATCH", f"/api/v1/models/{model['id']}")):
        for body in BAD_JSON:
            if method == "PATCH" and isinstance(body, dict) and "framework" in body:
                continue  # not a PATCH field: ignored like any field the contract does not define
            resp = await api.client.request(method, url, json=body, headers=api.headers)
            assert resp.status_code == 400, (method, body, resp.status_code, resp.text[:200])
            assert resp.json()["error"] == "bad_request"
        for raw in RAW_BAD_BODIES:
            resp = await api.client.request(method, url, content=raw,
                                            headers={**api.headers, "content-type": "application/json"})
            assert resp.status_code in (400, 413), (method, raw[:60], resp.status_code, resp.text[:200])
        resp = await api.client.request(method, url, content=b'{"description": "' + b"a" * (2 * MiB) + b'"}',
                                        headers={**api.headers, "content-type": "application/json"})
        assert resp.status_code == 413 and resp.json()["error"] == "payload_too_large"
    listed = (await api.client.get("/api/v1/models", headers=api.headers)).json()
    assert listed["total"] == 1


async def test_nul_and_odd_unicode_in_json_text_round_trip_or_are_refused(api: Api) -> None:
    for text in ("a\x00b", "\u202eevil", "\U0001f600" * 250, "line\r\nbreak", "\ufeff"):
        resp = await api.client.post("/api/v1/models", json={"description": text}, headers=api.headers)
        assert resp.status_code in (201, 400), resp.text
        if resp.status_code == 201:
            got = await api.client.get(f"/api/v1/models/{resp.json()['id']}", headers=api.headers)
            assert got.json()["description"] == text


BAD_QUERIES = ["limit=0", "limit=101", "limit=-1", "limit=abc", "limit=1.5", "limit=",
               "limit=99999999999999999999999999", "limit=%00", "offset=-1", "offset=9223372036854775808",
               "offset=99999999999999999999999999", "offset=x", "framework=caffe", "framework=%00",
               "framework=" + "p" * 5000, "is_baseline=maybe", "is_baseline=2", "is_baseline=%00",
               "name=" + "n" * 201, "use_case=" + "u" * 201]


async def test_out_of_range_and_junk_query_values_are_400(api: Api) -> None:
    for query in BAD_QUERIES:
        resp = await api.client.get(f"/api/v1/models?{query}", headers=api.headers)
        assert resp.status_code == 400, (query, resp.status_code, resp.text[:200])
        assert resp.json()["error"] == "bad_request"
    model = await api.create_model()
    await api.upload(model["id"], MODEL, "m.pkl")
    base = f"/api/v1/models/{model['id']}/versions/1"
    for query in ("expires_in=0", "expires_in=-5", "expires_in=99999999999999999999", "expires_in=x",
                  "format=%00", "format=" + "f" * 5000, "format=../../x"):
        resp = await api.client.get(f"{base}/download-url?{query}", headers=api.headers)
        assert resp.status_code == 400, (query, resp.status_code, resp.text[:200])
    for query in ("format=%00", "format=" + "f" * 5000, "format=ONNX", "format=../../etc/passwd"):
        resp = await api.client.get(f"{base}/download?{query}", headers=api.headers)
        assert 400 <= resp.status_code < 500, (query, resp.status_code)


BAD_FORMS: list[dict[str, str]] = [
    {"format": "caffe"}, {"format": "x" * 5000}, {"description": "d" * 1001}, {"round_id": "r" * 201},
    {"accuracy": "high"}, {"accuracy": "nan"}, {"accuracy": "inf"}, {"accuracy": "1e999"}, {"loss": "-inf"},
    {"input_shape": "1,x"}, {"input_shape": "0"}, {"input_shape": "-1,3"}, {"input_shape": ",".join(["1"] * 9)},
    {"input_shape": "99999999999999999999"}, {"version": "1"}, {"version": "latest"}, {"version": "a/b"},
    {"version": "v" * 101},
]


async def test_bad_upload_fields_are_400_and_leave_nothing(api: Api) -> None:
    model = await api.create_model()
    for fields in BAD_FORMS:
        resp = await api.upload(model["id"], MODEL, "m.pkl", expect=None, **fields)
        assert resp.status_code == 400, (fields, resp.status_code, resp.text[:200])
    nothing_left(api.registry.config.data_dir)


OVERSIZE_REQUESTS = {
    "1 MB path": "GET /api/v1/models/{x1m} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\r\n",
    "1 MB header": "GET /api/v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nX-Big: {a1m}\r\n\r\n",
    "50000 headers": "GET /api/v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n{many}\r\n",
    "NUL in a header": "GET /api/v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \x00{key}\r\n\r\n",
    "1 MB query": "GET /api/v1/models?{q} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\r\n",
}


@pytest.mark.parametrize("case", list(OVERSIZE_REQUESTS))
def test_oversize_request_line_and_headers_are_4xx(small_server: tuple[Server, str, str], case: str) -> None:
    """Headers are read before any key is checked, so their size must be bounded by the HTTP server itself
    (uvicorn's httptools parser accepts any size: a 50 MB header costs the server 50 MB, unauthenticated)."""
    server, key, _ = small_server
    request = OVERSIZE_REQUESTS[case].format(key=key, x1m="x" * 1_000_000, a1m="a" * 1_000_000,
                                             many="".join(f"X-{i}: v\r\n" for i in range(50_000)), q="a=1&" * 250_000)
    out, _ = send_until_answered(server.port, request.encode("latin-1"), iter([]), timeout=10)
    status = status_of(out)
    assert status == 0 or 400 <= status < 500, (case, out[:200])  # 0: the server closed the connection
    with httpx.Client(base_url=server.url, headers=bearer(key)) as client:
        assert client.get("/api/v1/models").status_code == 200  # and it still serves
    assert "Traceback" not in server.output()


# --- disk full ---------------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_gives_507_and_a_consistent_registry(tiny_disk: Path) -> None:
    """The data directory's disk fills up (here: another file takes the space): uploads and metadata writes get
    507, reads keep working, nothing half-written is left, and once space is freed everything works again."""
    home = tiny_disk / "data"
    key = make_key(home)
    server = Server(home)
    ballast = tiny_disk / "ballast"
    try:
        with httpx.Client(base_url=server.url, headers=bearer(key), timeout=60) as client:
            model_id = client.post("/api/v1/models", json={}).json()["id"]
            first = client.post(f"/api/v1/models/{model_id}/versions/upload",
                                files={"file": ("a.pkl", payload(1, size=4 * MiB))}, data={"format": "sklearn"})
            assert first.status_code == 201, first.text
            acked = [(model_id, 1, first.json()["model_hash"])]
            # an upload bigger than what is left
            resp = client.post(f"/api/v1/models/{model_id}/versions/upload",
                               files={"file": ("b.pkl", payload(2, size=18 * MiB))}, data={"format": "sklearn"})
            assert resp.status_code == 507, resp.text
            assert resp.json()["error"] == "insufficient_storage"
            assert not any(p.name.startswith("upload-") for p in (home / "tmp").iterdir())
            # now something else fills the disk to the last few kilobytes
            with open(ballast, "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * 64 * 1024)
                        f.flush()
                except OSError:
                    pass
            ballast.write_bytes(ballast.read_bytes()[: max(0, ballast.stat().st_size - 48 * 1024)])
            statuses = set()
            for i in range(60):  # metadata and small uploads on a full disk: 201 while pages last, then 507
                r = client.post("/api/v1/models", json={"description": "x" * 1000})
                u = client.post(f"/api/v1/models/{model_id}/versions/upload",
                                files={"file": ("d.pkl", payload(100 + i, size=16 * 1024))}, data={"format": "sklearn"})
                statuses |= {r.status_code, u.status_code}
                assert r.status_code in (201, 507), (i, r.status_code, r.text)
                assert u.status_code in (201, 507), (i, u.status_code, u.text)
                if u.status_code == 201:
                    acked.append((model_id, u.json()["version"], u.json()["model_hash"]))
            assert 507 in statuses
            assert_downloads(client, acked)  # reads work on a full disk
            assert client.get("/api/v1/models").status_code == 200
            assert not any(p.name.startswith("upload-") for p in (home / "tmp").iterdir())
            full = cli(home, "verify")
            assert full.returncode == 0, full.stdout + full.stderr
            # space comes back: writes work again (no connection left inside a failed transaction)
            ballast.unlink()
            assert client.post("/api/v1/models", json={}).status_code == 201
            again = client.post(f"/api/v1/models/{model_id}/versions/upload",
                                files={"file": ("e.pkl", payload(4, size=2 * MiB))}, data={"format": "sklearn"})
            assert again.status_code == 201, again.text
            acked.append((model_id, again.json()["version"], again.json()["model_hash"]))
            assert client.delete(f"/api/v1/models/{model_id}/versions/{acked[1][1]}").status_code in (204, 404)
            assert_downloads(client, [a for a in acked if a[1] != acked[1][1]])
            numbers = [v["version"] for v in client.get(f"/api/v1/models/{model_id}").json()["versions"]]
            assert numbers == sorted(set(numbers))
        assert "Traceback" not in server.output(), server.output()[-3000:]
    finally:
        server.stop()
    assert cli(home, "gc", "--grace", "0").returncode == 0
    assert_store_consistent(home)
    verify_clean(home)
