"""octomil_lite.Client against a real `octomil-lite serve` subprocess."""

from __future__ import annotations

import hashlib
import os
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import Server, bearer, free_port, make_key

from octomil_lite import Client, OctomilLiteError

pytestmark = pytest.mark.backends  # every test here runs on SQLite + directory and on PostgreSQL + S3


class Live:
    """A running server with an admin and a read key."""

    def __init__(self, server: Server):
        self.server = server
        self.url = server.url
        self.key = make_key(server.data_dir, "test-admin", "admin", server.storage_env)
        self.read_key = make_key(server.data_dir, "test-read", "read", server.storage_env)

    def client(self, key: str | None = None) -> Client:
        return Client(self.url, key or self.key)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    server = Server(tmp_path_factory.mktemp("client") / "data")
    try:
        yield Live(server)
    finally:
        server.stop()


@pytest.fixture
def client(live: Live) -> Iterator[Client]:
    with live.client() as c:
        yield c


def model_file(path: Path, size: int) -> Path:
    """A file the server takes as a pickle (by its header) of about size bytes of random content."""
    with open(path, "wb") as f:
        f.write(b"\x80\x04\x95")
        while size > 0:
            f.write(os.urandom(min(size, 1024 * 1024)))
            size -= 1024 * 1024
    return path


def sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def uploaded(client: Client, tmp_path: Path) -> tuple[str, Path]:
    """A model with one 4 MB version, and the file it was uploaded from."""
    model = client.create_model(framework="sklearn")
    path = model_file(tmp_path / "source.pkl", 4 * 1024 * 1024)
    client.upload_version(model["id"], path, format="sklearn")
    return model["id"], path


def test_list_models_walks_every_page_and_filters(client: Client) -> None:
    made = [client.create_model(framework="xgboost", is_baseline=i % 2 == 0, description=f"m{i}") for i in range(5)]
    listed = [m["id"] for m in client.list_models(framework="xgboost", page_size=2)]
    assert listed == [m["id"] for m in reversed(made)]
    baselines = {m["id"] for m in client.list_models(framework="xgboost", is_baseline=True, page_size=1)}
    assert baselines == {m["id"] for m in made if m["is_baseline"]}


def test_create_and_get_model_round_trip_and_tolerate_extra_fields(client: Client) -> None:
    model = client.create_model(framework="sklearn", framework_version="1.5.2", description="iris",
                                is_baseline=True, name="iris", use_case="demo")
    got = client.get_model(model["id"])
    assert got["id"] == model["id"] and got["description"] == "iris" and got["is_baseline"] is True
    assert got["versions"] == []


def test_update_model_patches_only_the_given_fields(client: Client) -> None:
    model = client.create_model(framework="sklearn", description="before")
    updated = client.update_model(model["id"], description="after", accuracy=0.91, round_id="r7")
    assert (updated["description"], updated["accuracy"], updated["round_id"]) == ("after", 0.91, "r7")
    assert updated["framework"] == "sklearn"
    assert client.get_model(model["id"])["description"] == "after"


def test_delete_model_then_get_is_not_found(client: Client) -> None:
    model = client.create_model()
    client.delete_model(model["id"])
    with pytest.raises(OctomilLiteError) as err:
        client.get_model(model["id"])
    assert (err.value.status, err.value.code) == (404, "not_found")


def test_upload_streams_fields_and_progress_and_get_version_reads_them_back(client: Client, tmp_path: Path,
                                                                           sklearn_pickle: bytes) -> None:
    model = client.create_model(framework="sklearn")
    path = tmp_path / "model.pkl"
    path.write_bytes(sklearn_pickle)
    seen: list[tuple[int, int]] = []
    version = client.upload_version(model["id"], path, format="sklearn", description="round 3",
                                    progress=lambda done, total: seen.append((done, total)),
                                    round_id="r3", accuracy=0.875, loss=0.25, input_shape=(1, 4))
    assert version["version"] == 1 and version["model_hash"] == sha256(path)
    assert seen[0] == (0, len(sklearn_pickle)) and seen[-1] == (len(sklearn_pickle), len(sklearn_pickle))
    for ref in (1, "latest"):
        detail = client.get_version(model["id"], ref)
        assert (detail["version"], detail["description"], detail["round_id"]) == (1, "round 3", "r3")
        assert (detail["accuracy"], detail["loss"]) == (0.875, 0.25)
        assert "onnx" in detail["formats"]
    assert client.get_model(model["id"])["round_id"] == "r3"


def test_upload_label_names_the_version(client: Client, tmp_path: Path, sklearn_pickle: bytes) -> None:
    model = client.create_model(framework="sklearn")
    path = tmp_path / "model.pkl"
    path.write_bytes(sklearn_pickle)
    client.upload_version(model["id"], path, version="v1.0-rc1")
    assert client.get_version(model["id"], "v1.0-rc1")["version"] == 1


def test_upload_does_not_hold_the_file_in_memory(client: Client, tmp_path: Path) -> None:
    model = client.create_model(framework="sklearn")
    path = model_file(tmp_path / "big.pkl", 40 * 1024 * 1024)
    tracemalloc.start()
    try:
        version = client.upload_version(model["id"], path, format="sklearn")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert version["model_size_bytes"] == path.stat().st_size
    assert peak < 8 * 1024 * 1024, f"uploading 40 MB peaked at {peak} bytes of Python memory"


def test_delete_version_removes_only_that_version(client: Client, tmp_path: Path, sklearn_pickle: bytes) -> None:
    model = client.create_model(framework="sklearn")
    path = tmp_path / "model.pkl"
    path.write_bytes(sklearn_pickle)
    client.upload_version(model["id"], path)
    client.upload_version(model["id"], path)
    client.delete_version(model["id"], 1)
    assert [v["version"] for v in client.get_model(model["id"])["versions"]] == [2]


def test_download_verifies_and_renames_into_place(client: Client, uploaded: tuple[str, Path], tmp_path: Path) -> None:
    model_id, source = uploaded
    dest = tmp_path / "out" / "model.pkl"
    dest.parent.mkdir()
    assert client.download_version(model_id, 1, dest) == dest
    assert dest.read_bytes() == source.read_bytes()
    assert not dest.with_name("model.pkl.part").exists()


def test_download_into_a_directory_uses_the_servers_file_name(client: Client, uploaded: tuple[str, Path],
                                                             tmp_path: Path) -> None:
    model_id, source = uploaded
    path = client.download_version(model_id, "latest", tmp_path)
    assert path == tmp_path / "model_v1.pkl" and path.read_bytes() == source.read_bytes()


def test_download_to_a_new_folder_ending_in_a_slash_creates_it(client: Client, uploaded: tuple[str, Path],
                                                               tmp_path: Path) -> None:
    model_id, source = uploaded
    path = client.download_version(model_id, 1, f"{tmp_path}/out/nested/")
    assert path == tmp_path / "out" / "nested" / "model_v1.pkl" and path.read_bytes() == source.read_bytes()
    assert sorted(p.name for p in (tmp_path / "out" / "nested").iterdir()) == ["model_v1.pkl"]


class Interrupted(Exception):
    """Raised from a progress callback to cut a download short."""


def test_interrupted_download_resumes_with_only_the_missing_bytes(client: Client, uploaded: tuple[str, Path],
                                                                  tmp_path: Path) -> None:
    model_id, source = uploaded
    dest = tmp_path / "model.pkl"

    def stop_after_first_chunk(done: int, total: int) -> None:
        if done > 0:
            raise Interrupted

    with pytest.raises(Interrupted):
        client.download_version(model_id, 1, dest, progress=stop_after_first_chunk)
    kept = dest.with_name("model.pkl.part").stat().st_size
    size = source.stat().st_size
    assert 0 < kept < size and not dest.exists()

    seen: list[tuple[int, int]] = []
    client.download_version(model_id, 1, dest, progress=lambda done, total: seen.append((done, total)))
    assert seen[0] == (kept, size), "the second download must continue where the first stopped"
    assert all(done >= kept for done, _ in seen) and seen[-1] == (size, size)
    assert dest.read_bytes() == source.read_bytes()


def test_a_part_file_from_other_bytes_is_detected_and_downloaded_again(client: Client, uploaded: tuple[str, Path],
                                                                       tmp_path: Path) -> None:
    model_id, source = uploaded
    dest = tmp_path / "model.pkl"
    dest.with_name("model.pkl.part").write_bytes(b"not these bytes" * 1000)
    seen: list[int] = []
    client.download_version(model_id, 1, dest, progress=lambda done, total: seen.append(done))
    assert 0 in seen, "a wrong prefix must be thrown away and the file fetched from zero"
    assert dest.read_bytes() == source.read_bytes()


def test_a_part_file_longer_than_the_artifact_is_downloaded_again(client: Client, uploaded: tuple[str, Path],
                                                                  tmp_path: Path) -> None:
    model_id, source = uploaded
    dest = tmp_path / "model.pkl"
    dest.with_name("model.pkl.part").write_bytes(source.read_bytes() + b"trailing junk")
    client.download_version(model_id, 1, dest)
    assert dest.read_bytes() == source.read_bytes()


def test_server_does_range_requests_the_way_resume_relies_on(live: Live, uploaded: tuple[str, Path]) -> None:
    model_id, source = uploaded
    url = f"{live.url}/api/v1/models/{model_id}/versions/1/download"
    resp = httpx.get(url, headers={**bearer(live.key), "Range": "bytes=100-"})
    assert resp.status_code == 206 and resp.content == source.read_bytes()[100:]
    assert resp.headers["x-model-hash"] == sha256(source)


def test_wait_for_format_returns_once_onnx_is_ready_and_download_gets_it(client: Client, tmp_path: Path,
                                                                         sklearn_pickle: bytes) -> None:
    import onnx

    model = client.create_model(framework="sklearn")
    path = tmp_path / "model.pkl"
    path.write_bytes(sklearn_pickle)
    client.upload_version(model["id"], path, format="sklearn")
    client.wait_for_format(model["id"], 1, "onnx", timeout=120)
    onnx_path = client.download_version(model["id"], 1, tmp_path, format="onnx")
    assert onnx_path.name == "model_v1.onnx"
    onnx.checker.check_model(onnx.load(str(onnx_path)))
    assert client.get_version(model["id"], 1)["formats"]["onnx"]["status"] == "ready"


def test_wait_for_format_raises_with_the_servers_reason_when_it_cannot_be_made(
        client: Client, uploaded: tuple[str, Path]) -> None:
    model_id, _ = uploaded
    with pytest.raises(OctomilLiteError) as err:
        client.wait_for_format(model_id, 1, "pytorch", timeout=30)
    assert err.value.status == 404 and "pytorch" in err.value.message


def test_errors_carry_status_code_and_the_servers_message(live: Live) -> None:
    with live.client() as c, pytest.raises(OctomilLiteError) as missing:
        c.get_model("00000000-0000-0000-0000-000000000000")
    assert (missing.value.status, missing.value.code) == (404, "not_found") and missing.value.message
    with live.client("oml_wrong") as c, pytest.raises(OctomilLiteError) as wrong:
        c.get_model("00000000-0000-0000-0000-000000000000")
    assert (wrong.value.status, wrong.value.code) == (401, "unauthorized")
    with live.client(live.read_key) as c, pytest.raises(OctomilLiteError) as read_only:
        c.create_model()
    assert (read_only.value.status, read_only.value.code) == (403, "forbidden")


def test_unreachable_server_is_status_zero() -> None:
    with Client(f"http://127.0.0.1:{free_port()}", "k") as c, pytest.raises(OctomilLiteError) as err:
        next(c.list_models())
    assert (err.value.status, err.value.code) == (0, "unreachable") and "127.0.0.1" in err.value.message


def test_url_and_key_default_to_the_environment(live: Live, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OCTOMIL_LITE_URL", live.url)
    monkeypatch.setenv("OCTOMIL_API_KEY", live.key)
    with Client() as c:
        assert c.base_url == live.url
        assert c.create_model(description="from env")["description"] == "from env"
