"""`octomil-lite models|upload|download` against a real `octomil-lite serve` subprocess."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest import Server, free_port, make_key
from test_client import model_file

from octomil_lite.cli import main


class Cli:
    """Runs octomil-lite commands in-process against one server, with the URL and key given as options."""

    def __init__(self, server: Server):
        self.url = server.url
        self.key = make_key(server.data_dir, "test-admin", "admin")

    def __call__(self, *args: str, input: str | None = None, key: str | None = None) -> Result:
        return CliRunner().invoke(main, [*args, "--url", self.url, "--api-key", key or self.key], input=input)

    def ok(self, *args: str) -> str:
        result = self(*args)
        assert result.exit_code == 0, result.output
        return result.stdout


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cli]:
    server = Server(tmp_path_factory.mktemp("cli") / "data")
    try:
        yield Cli(server)
    finally:
        server.stop()


def assert_one_line_error(result: Result, *words: str) -> None:
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert all(w in lines[0] for w in words), lines[0]


def test_models_create_prints_the_id_alone_and_get_shows_it(cli: Cli) -> None:
    model_id = cli.ok("models", "create", "--framework", "sklearn", "--description", "iris", "--baseline").strip()
    assert len(model_id) == 36
    shown = cli.ok("models", "get", model_id)
    assert f"id:                {model_id}" in shown and "is_baseline:       yes" in shown and "iris" in shown
    assert json.loads(cli.ok("models", "get", model_id, "--json"))["framework"] == "sklearn"


def test_models_list_prints_a_table_or_json_of_every_model(cli: Cli) -> None:
    ids = [cli.ok("models", "create", "--framework", "pytorch", "--description", f"net {i}").strip() for i in range(3)]
    table = cli.ok("models", "list", "--framework", "pytorch").splitlines()
    assert table[0].split() == ["ID", "FRAMEWORK", "BASELINE", "ROUND", "ACCURACY", "SIZE", "CREATED", "DESCRIPTION"]
    assert [line.split()[0] for line in table[1:]] == ids[::-1]
    listed = json.loads(cli.ok("models", "list", "--framework", "pytorch", "--json"))
    assert [m["id"] for m in listed] == ids[::-1]
    assert json.loads(cli.ok("models", "list", "--framework", "pytorch", "--baseline", "--json")) == []
    assert cli.ok("models", "list", "--framework", "pytorch", "--baseline").split() == table[0].split()  # headings


def test_models_update_changes_the_given_fields(cli: Cli) -> None:
    model_id = cli.ok("models", "create", "--description", "before").strip()
    shown = cli.ok("models", "update", model_id, "--description", "after", "--accuracy", "0.5", "--round-id", "r2")
    assert "after" in shown and "r2" in shown
    model = json.loads(cli.ok("models", "get", model_id, "--json"))
    assert (model["description"], model["accuracy"], model["round_id"]) == ("after", 0.5, "r2")
    assert cli("models", "update", model_id).exit_code == 2


def test_models_delete_asks_first_unless_yes(cli: Cli) -> None:
    model_id = cli.ok("models", "create").strip()
    declined = cli("models", "delete", model_id, input="n\n")
    assert declined.exit_code == 1 and cli("models", "get", model_id).exit_code == 0
    assert cli("models", "delete", model_id, "--yes").exit_code == 0
    assert_one_line_error(cli("models", "get", model_id), model_id)


def test_upload_sends_the_fields_and_download_writes_the_file(cli: Cli, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    model_id = cli.ok("models", "create", "--framework", "sklearn").strip()
    source = model_file(tmp_path / "weights.pkl", 2 * 1024 * 1024)
    line = cli.ok("upload", model_id, str(source), "--format", "sklearn", "--description", "round 4",
                  "--round-id", "r4", "--accuracy", "0.93", "--loss", "0.2", "--input-shape", "1,64",
                  "--label", "best")
    assert line.startswith(f"version 1 of {model_id}: sklearn, 2.0 MB, sha256:")
    uploaded = json.loads(cli.ok("upload", model_id, str(source), "--json"))
    assert uploaded["version"] == 2

    out = tmp_path / "named.pkl"
    assert cli.ok("download", model_id, "best", "-o", str(out)).strip() == str(out)
    assert out.read_bytes() == source.read_bytes()
    monkeypatch.chdir(tmp_path)
    assert cli.ok("download", model_id, "latest").strip() == "model_v2.pkl"
    assert (tmp_path / "model_v2.pkl").read_bytes() == source.read_bytes()

    from octomil_lite import Client

    with Client(cli.url, cli.key) as client:
        version = client.get_version(model_id, 1)
    assert (version["round_id"], version["accuracy"], version["loss"]) == ("r4", 0.93, 0.2)


def test_download_of_a_format_that_cannot_be_made_is_a_one_line_error(cli: Cli, tmp_path: Path) -> None:
    model_id = cli.ok("models", "create").strip()
    cli.ok("upload", model_id, str(model_file(tmp_path / "m.pkl", 1000)), "--format", "sklearn")
    assert_one_line_error(cli("download", model_id, "1", "--format", "pytorch", "-o", str(tmp_path)), "pytorch")


def test_wrong_key_is_a_one_line_error(cli: Cli) -> None:
    assert_one_line_error(cli("models", "list", key="oml_not_a_key"), "API key")


def test_unreachable_server_is_a_one_line_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = CliRunner().invoke(main, ["models", "list", "--url", url, "--api-key", "k"])
    assert_one_line_error(result, "Cannot reach", url)


def test_options_override_the_environment_and_the_environment_is_the_default(cli: Cli) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    result = CliRunner(env={"OCTOMIL_LITE_URL": dead, "OCTOMIL_API_KEY": "oml_wrong"}).invoke(
        main, ["models", "create", "--url", cli.url, "--api-key", cli.key])
    assert result.exit_code == 0, result.output
    from_env = CliRunner(env={"OCTOMIL_LITE_URL": cli.url, "OCTOMIL_API_KEY": cli.key}).invoke(main, ["models", "list"])
    assert from_env.exit_code == 0 and result.stdout.strip() in from_env.stdout


def test_progress_bar_is_drawn_only_when_stderr_is_a_terminal(cli: Cli, tmp_path: Path) -> None:
    model_id = cli.ok("models", "create").strip()
    source = model_file(tmp_path / "m.pkl", 3 * 1024 * 1024)
    command = [sys.executable, "-m", "octomil_lite.cli", "upload", model_id, str(source), "--format", "sklearn",
               "--url", cli.url, "--api-key", cli.key]
    piped = subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)
    assert piped.returncode == 0 and piped.stderr == ""

    leader, follower = pty.openpty()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    drawn = b""
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        drawn += data
    os.close(leader)
    assert proc.wait(60) == 0
    assert b"uploading m.pkl" in drawn and b"100%" in drawn


def test_help_and_the_server_commands_do_not_import_httpx() -> None:
    code = ("import sys; from click.testing import CliRunner; from octomil_lite.cli import main; "
            "calls = (['--help'], ['upload', '--help'], ['models', 'list', '--help']); "
            "[CliRunner().invoke(main, args) for args in calls]; "
            "print('httpx' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
