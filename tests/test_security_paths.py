"""Security: no name a client sends (file names, path parameters, query values) reaches the file system.

MLflow's record: path traversal in artifact paths (CVE-2023-1177, -2356, -6909, -6975, -6976, -6977, CVE-2024-1483,
-1594, -3573 ... several of them bypasses of the fix before), local file reads through 'source' URIs. Here an
uploaded file name is only a hint for format inference, blobs are opened by digest alone, and the download name
is always model_v<N>.<ext>.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Api, Server, bearer, on_app_loop
from litestar.testing import AsyncTestClient

from octomil_lite.config import Config
from octomil_lite.server.app import create_app

TOKEN = "evil-5c1b9e"
BOUNDARY = b"----octomil-test-boundary"
DISPOSITION = re.compile(r'attachment; filename="model_v[1-9][0-9]*(\.[a-z0-9]+)+"')
SECRET = b"SECRET-FILE-OUTSIDE-THE-REGISTRY " * 8

# Content-Disposition parameters of the 'file' part, as raw bytes on the wire.
HOSTILE_FILENAMES: list[bytes] = [
    b'filename="../../../../../../' + TOKEN.encode() + b'.pkl"',
    b'filename="../' + TOKEN.encode() + b'.pkl"',
    b'filename="/tmp/' + TOKEN.encode() + b'.pkl"',
    b'filename="/' + TOKEN.encode() + b'.pkl"',
    b'filename="/etc/passwd"',
    b'filename="/proc/self/environ"',
    b'filename="..\\\\..\\\\..\\\\' + TOKEN.encode() + b'.pkl"',
    b'filename="..\\..\\..\\' + TOKEN.encode() + b'.pkl"',
    b'filename="C:\\\\Windows\\\\' + TOKEN.encode() + b'.pkl"',
    b'filename="%2e%2e%2f%2e%2e%2f%2e%2e%2f' + TOKEN.encode() + b'.pkl"',
    b'filename="%252e%252e%252f%252e%252e%252f' + TOKEN.encode() + b'.pkl"',
    b'filename="..%c0%af..%c0%af' + TOKEN.encode() + b'.pkl"',
    b'filename="' + TOKEN.encode() + b'\x00.pkl"',
    b'filename="' + TOKEN.encode() + b'.pkl\x00../../x"',
    b'filename="a;b=../../' + TOKEN.encode() + b'.pkl"',
    b'filename=../../' + TOKEN.encode() + b';.pkl',
    b'filename="a#../../' + TOKEN.encode() + b'.pkl"',
    b'filename="model.pkl"; filename="../../' + TOKEN.encode() + b'.pkl"',
    b'filename="x\\"; filename=\\"../../' + TOKEN.encode() + b'.pkl"',
    b'filename="' + TOKEN.encode() + b'\'".pkl"',
    b"filename*=UTF-8''..%2F..%2F..%2F" + TOKEN.encode() + b"%0D%0A.pkl",
    b"filename*=UTF-8''%0D%0AContent-Disposition%3A%20attachment%3B%20filename%3D%22" + TOKEN.encode() + b".sh%22",
    b'filename="' + TOKEN.encode() + b'.pkl\r\nX-Injected: yes"',
    b'filename="' + TOKEN.encode() + b'.pkl\rContent-Disposition: attachment; filename=x.sh"',
    b'filename="."',
    b'filename=".."',
    b'filename=""',
    b'filename="' + b"A" * 4000 + b'.pkl"',
    b'filename="\xe2\x80\xae' + TOKEN.encode() + b'lkp.exe"',
    b'filename="' + TOKEN.encode() + b'.pkl/"',
    b'filename="registry.sqlite3"',
    b'filename="../registry.sqlite3"',
    b'filename="../../blobs/sha256/00/' + b"0" * 64 + b'"',
]


def multipart(params: bytes, content: bytes, extra: bytes = b"") -> bytes:
    return (b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="file"; ' + params
            + b"\r\nContent-Type: application/octet-stream\r\n\r\n" + content + b"\r\n" + extra
            + b"--" + BOUNDARY + b"--\r\n")


def tree(root: Path, skip: Path) -> set[Path]:
    return {p for p in root.rglob("*") if skip not in p.parents and p != skip}


def assert_data_dir_holds_only_registry_files(data_dir: Path) -> None:
    """registry.sqlite3 (+WAL), the signing key, digest-named blobs and an empty tmp/: nothing named by a client."""
    for path in data_dir.rglob("*"):
        rel = path.relative_to(data_dir).as_posix()
        assert TOKEN not in rel, rel
        if path.is_dir():
            assert rel in ("blobs", "blobs/sha256", "tmp") or re.fullmatch(r"blobs/sha256/[0-9a-f]{2}", rel), rel
        else:
            assert not path.is_symlink(), rel
            if rel.startswith("blobs/"):
                assert re.fullmatch(r"blobs/sha256/([0-9a-f]{2})/\1[0-9a-f]{62}", rel), rel
                assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name, rel
            else:
                assert re.fullmatch(r"registry\.sqlite3(-wal|-shm|-journal)?|secret\.key", rel), rel
    assert list((data_dir / "tmp").iterdir()) == []


@pytest.fixture
async def deep_api(tmp_path: Path) -> AsyncIterator[Api]:
    """A registry whose data directory is nested, so that any '../' escape still lands inside tmp_path."""
    config = Config(data_dir=tmp_path / "a" / "b" / "c" / "d" / "e" / "f" / "data", rate_limit=0,
                    conversion_workers=0)
    async with AsyncTestClient(app=create_app(config)) as client:
        registry = client.app.state.registry
        keys = {s: await on_app_loop(client, registry.create_key, f"t-{s}", s) for s in ("read", "write", "admin")}
        yield Api(client, registry, keys)


@pytest.mark.parametrize("params", HOSTILE_FILENAMES, ids=range(len(HOSTILE_FILENAMES)))
async def test_hostile_upload_file_names_never_touch_the_file_system(deep_api: Api, tmp_path: Path, params: bytes,
                                                                     sklearn_pickle: bytes) -> None:
    api = deep_api
    data_dir = api.registry.config.data_dir
    model = await api.create_model()
    before = tree(tmp_path, data_dir)
    cwd_before = set(os.listdir("."))
    resp = await api.client.post(f"/api/v1/models/{model['id']}/versions/upload",
                                 content=multipart(params, sklearn_pickle),
                                 headers={**api.headers,
                                          "content-type": f"multipart/form-data; boundary={BOUNDARY.decode()}"})
    assert resp.status_code in (201, 400), resp.text
    assert tree(tmp_path, data_dir) == before
    assert set(os.listdir(".")) == cwd_before
    for where in (Path("/"), Path("/tmp"), Path("/etc")):
        assert not any(TOKEN in name for name in os.listdir(where)), where
    assert_data_dir_holds_only_registry_files(data_dir)
    if resp.status_code == 201:
        body = resp.json()
        assert TOKEN not in resp.text and "passwd" not in body["model_path"]
        dl = await api.client.get(f"/api/v1/models/{model['id']}/versions/1/download", headers=api.headers)
        assert dl.status_code == 200 and dl.content == sklearn_pickle
        assert dl.headers["content-disposition"] == 'attachment; filename="model_v1.pkl"'
        assert "x-injected" not in dl.headers and TOKEN not in str(dl.headers)


async def test_download_name_is_always_model_v_n_dot_ext(api: Api, sklearn_pickle: bytes, onnx_bytes: bytes) -> None:
    """Whatever was uploaded (name, label, format field), the download name is the spec's, RFC 6266 well-formed."""
    model = await api.create_model()
    uploads: list[tuple[bytes, str, dict[str, str], str]] = [
        (sklearn_pickle, '../../x";.sh', {"version": 'v1"; filename=evil.sh'}, "pkl"),
        (onnx_bytes, "m.pkl", {"version": "v2\r\nX-Evil: 1", "description": '"; filename="x'}, "onnx"),
        (sklearn_pickle, "model.pt", {"version": "%2e%2e%2f"}, "pkl"),
        (sklearn_pickle, "a\\b\\c.onnx", {}, "pkl"),
    ]
    for content, name, fields, ext in uploads:
        resp = await api.upload(model["id"], content, name, expect=None, **fields)
        if resp.status_code == 400:  # a label the registry refuses: fine, try without it
            fields = {k: v for k, v in fields.items() if k != "version"}
            resp = await api.upload(model["id"], content, name, expect=None, **fields)
        assert resp.status_code == 201, resp.text
        for ref in (str(resp.json()["version"]), "latest"):
            for method in ("GET", "HEAD"):
                dl = await api.client.request(method, f"/api/v1/models/{model['id']}/versions/{ref}/download",
                                              headers=api.headers)
                assert dl.status_code == 200, dl.text
                disposition = dl.headers["content-disposition"]
                assert disposition == f'attachment; filename="model_v{resp.json()["version"]}.{ext}"', disposition
                assert DISPOSITION.fullmatch(disposition)
                assert len(dl.headers.get_list("content-disposition")) == 1
                assert "x-evil" not in dl.headers


# (bare ".." is not here: HTTP clients resolve it before sending; the raw-socket test below sends it as-is)
JUNK = ["..%2F..%2Fregistry.sqlite3", "%2e%2e", "%2e%2e%2f%2e%2e", "%2e%2e%2f%2e%2e%2fregistry.sqlite3",
        "%252e%252e%252fregistry.sqlite3", "..%5C..%5Cregistry.sqlite3", "%00", "1%00", "1%00.pkl", "1;", "1%3B",
        "1%23", "%0d%0a", "1%0d%0aX-Injected:%201", "%2Fetc%2Fpasswd", "file:%2F%2F%2Fetc%2Fpasswd",
        "registry.sqlite3", "secret.key", "sha256:" + "0" * 64, "0" * 64, "-1", "0", "1e3", "1.0", " 1",
        "99999999999999999999999999", "latest%00", "LATEST", "x" * 5000, "%C0%AE%C0%AE", "%ff%fe"]


async def test_junk_path_parameters_are_4xx_and_read_nothing(api: Api, sklearn_pickle: bytes) -> None:
    model = await api.create_model()
    await api.upload(model["id"], sklearn_pickle, "m.pkl")
    mid = model["id"]
    db_head = (api.registry.config.data_dir / "registry.sqlite3").read_bytes()[:16]
    secret_key = (api.registry.config.data_dir / "secret.key").read_bytes()
    for junk in JUNK:
        for url in (f"/api/v1/models/{junk}", f"/api/v1/models/{junk}/versions/1/download",
                    f"/api/v1/models/{mid}/versions/{junk}", f"/api/v1/models/{mid}/versions/{junk}/download",
                    f"/api/v1/models/{mid}/versions/1/download?format={junk}",
                    f"/api/v1/models/{mid}/versions/{junk}/download-url"):
            resp = await api.client.get(url, headers=api.headers)
            assert 400 <= resp.status_code < 500, (url, resp.status_code, resp.text[:200])
            assert db_head not in resp.content and secret_key not in resp.content and b"root:" not in resp.content
            assert resp.headers["content-type"].startswith("application/json"), url


STATIC_ESCAPES = ["/static/../app.py", "/static/%2e%2e/app.py", "/static/..%2fapp.py", "/static/..%2F..%2Fapp.py",
                  "/static/%2e%2e%2f%2e%2e%2fapp.py", "/static/vendor/../../app.py", "/static//etc/passwd",
                  "/static/%2Fetc%2Fpasswd", "/static/..%5capp.py", "/static/%252e%252e%252fapp.py",
                  "/static/..%00/app.py", "/schema/..%2f..%2fapp.py", "/schema/%2e%2e/%2e%2e/etc/passwd",
                  "/schema/../../../../etc/passwd", "/static/../../../../../../../etc/passwd",
                  "/static/../registry.sqlite3", "/api/v1/models/../../static/index.html"]


def _raw_get(port: int, target: str, key: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
                     "Connection: close\r\n\r\n".encode())
        out = b""
        while chunk := conn.recv(65536):
            out += chunk
        return out


def test_static_docs_and_api_paths_cannot_escape_over_a_raw_socket(tmp_path: Path, sklearn_pickle: bytes) -> None:
    """Unnormalised '..' (which HTTP clients would clean up) sent as-is to a real server."""
    home = tmp_path / "data"
    server = Server(home)
    try:
        key = subprocess.run([sys.executable, "-m", "octomil_lite.cli", "keys", "create", "--name", "p"],
                             env={**os.environ, "OCTOMIL_LITE_HOME": str(home)}, capture_output=True, text=True,
                             check=True).stdout.strip()
        source = Path(__file__).parents[1] / "octomil_lite" / "server" / "app.py"
        for target in STATIC_ESCAPES:
            out = _raw_get(server.port, target, key)
            status = int(out.split(b" ", 2)[1])
            assert status in (400, 401, 404), (target, out[:300])
            assert b"import " not in out and b"root:" not in out and b"SQLite format" not in out, target
            assert source.read_bytes()[:200] not in out
    finally:
        server.stop()


async def test_a_symlink_planted_over_a_blob_is_never_followed(api: Api, sklearn_pickle: bytes,
                                                               tmp_path: Path) -> None:
    secret = tmp_path / "outside-secret.bin"
    secret.write_bytes(SECRET)
    model = await api.create_model()
    body = (await api.upload(model["id"], sklearn_pickle, "m.pkl")).json()
    blob = api.registry.blobs.path(body["model_hash"].removeprefix("sha256:"))
    os.chmod(blob, 0o644)
    blob.unlink()
    blob.symlink_to(secret)
    for method in ("GET", "HEAD"):
        resp = await api.client.request(method, f"/api/v1/models/{model['id']}/versions/1/download",
                                        headers=api.headers)
        assert resp.status_code >= 400 and b"SECRET" not in resp.content, (method, resp.status_code)
        assert resp.headers.get("content-length") != str(len(SECRET))
    assert secret.read_bytes() == SECRET


async def test_uploading_onto_a_planted_symlink_replaces_the_link_not_its_target(api: Api, sklearn_pickle: bytes,
                                                                                 tmp_path: Path) -> None:
    secret = tmp_path / "outside-secret.bin"
    secret.write_bytes(SECRET)
    digest = hashlib.sha256(sklearn_pickle).hexdigest()
    final = api.registry.blobs.path(digest)
    final.parent.mkdir(parents=True, exist_ok=True)
    final.symlink_to(secret)
    model = await api.create_model()
    await api.upload(model["id"], sklearn_pickle, "m.pkl")
    assert secret.read_bytes() == SECRET
    assert not final.is_symlink() and final.read_bytes() == sklearn_pickle
    dl = await api.client.get(f"/api/v1/models/{model['id']}/versions/1/download", headers=api.headers)
    assert dl.content == sklearn_pickle


async def test_a_symlinked_shard_directory_is_never_followed(api: Api, sklearn_pickle: bytes, tmp_path: Path) -> None:
    """blobs/sha256/<ab> replaced by a link to a directory elsewhere: nothing is written or read there."""
    outside = tmp_path / "outside-dir"
    outside.mkdir()
    digest = hashlib.sha256(sklearn_pickle).hexdigest()
    shard = api.registry.blobs.root / digest[:2]
    shard.symlink_to(outside, target_is_directory=True)
    model = await api.create_model()
    resp = await api.upload(model["id"], sklearn_pickle, "m.pkl", expect=None)
    assert resp.status_code in (201, 500, 507), resp.text
    assert list(outside.iterdir()) == [], "the upload was written through a planted symlink"
    # reading: a file named by the digest, planted outside, is not served through the link
    (outside / digest).write_bytes(SECRET)
    if resp.status_code == 201:
        dl = await api.client.get(f"/api/v1/models/{model['id']}/versions/1/download", headers=api.headers)
        assert b"SECRET" not in dl.content


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "octomil_lite.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "OCTOMIL_LITE_HOME": str(home)}, timeout=60)


async def test_gc_and_verify_do_not_follow_planted_symlinks(api: Api, sklearn_pickle: bytes, tmp_path: Path) -> None:
    """gc deletes nothing outside the store and verify reports (not crashes on) a planted link."""
    model = await api.create_model()
    body = (await api.upload(model["id"], sklearn_pickle, "m.pkl")).json()
    digest = body["model_hash"].removeprefix("sha256:")
    outside = tmp_path / "outside-dir"
    outside.mkdir()
    victim_name = "ee" + "1" * 62  # looks like an unreferenced blob, but lives outside the data directory
    (outside / victim_name).write_bytes(SECRET)
    os.utime(outside / victim_name, (1, 1))
    (api.registry.blobs.root / "ee").symlink_to(outside, target_is_directory=True)
    linked = api.registry.blobs.root / "ff" / ("ff" + "2" * 62)
    linked.parent.mkdir()
    linked.symlink_to(outside / victim_name)
    home = api.registry.config.data_dir
    gc = _cli(home, "gc", "--grace", "0")
    assert gc.returncode == 0, gc.stdout + gc.stderr
    assert (outside / victim_name).read_bytes() == SECRET
    verify = _cli(home, "verify")
    assert "Traceback" not in verify.stderr, verify.stderr
    assert "SECRET" not in verify.stdout + verify.stderr
    assert api.registry.blobs.path(digest).read_bytes() == sklearn_pickle


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def test_model_path_and_hash_describe_the_stored_blob_only(api: Api, sklearn_pickle: bytes) -> None:
    """model_path is the file:// URI of the digest-named blob, never anything derived from the client's name."""
    model = await api.create_model()
    body = (await api.upload(model["id"], sklearn_pickle, "/etc/passwd")).json()
    digest = body["model_hash"].removeprefix("sha256:")
    assert body["model_hash"] == _sha(sklearn_pickle)
    assert body["model_path"] == api.registry.blobs.path(digest).resolve().as_uri()


def _unused(_: Any) -> None:  # keep imports honest for linters
    bearer("x")
