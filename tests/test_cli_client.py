"""`octomil-lite models|upload|download` against a real `octomil-lite serve` subprocess."""

from __future__ import annotations

import json
import os
import pty
import signal
import socket
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
    assert line.startswith(f"version 1 of {model_id}: sklearn, 2.0 MiB, sha256:")
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


def test_versions_list_publish_deprecate_and_metrics(cli: Cli, tmp_path: Path) -> None:
    model_id = cli.ok("models", "create", "--framework", "sklearn").strip()
    source = model_file(tmp_path / "m.pkl", 1000)
    for label in ("1.0.0", "1.1.0"):
        cli.ok("upload", model_id, str(source), "--format", "sklearn", "--label", label)
    assert cli.ok("versions", "deprecate", model_id, "1.1.0").strip() == f"version 2 of {model_id}: deprecated"
    assert cli.ok("versions", "metrics", model_id, "1", "f1=0.91", "latency_ms=12").strip() == \
        f"version 1 of {model_id}: f1=0.91 latency_ms=12"
    table = cli.ok("versions", "list", model_id).splitlines()
    assert table[0].split()[:4] == ["VERSION", "LABEL", "STATUS", "FORMAT"]
    assert table[1].split()[:3] == ["2", "1.1.0", "deprecated"] and table[2].split()[:3] == ["1", "1.0.0", "published"]
    assert "f1=0.91 latency_ms=12" in table[2]
    only = json.loads(cli.ok("versions", "list", model_id, "--status", "deprecated", "--json"))
    assert [v["version"] for v in only] == [2]
    assert "published" in cli.ok("versions", "publish", model_id, "2")
    assert "f1=0.91" in cli.ok("models", "get", model_id)
    assert cli.ok("versions", "metrics", model_id, "1", "f1=").strip() == f"version 1 of {model_id}: latency_ms=12"
    bad = cli("versions", "metrics", model_id, "1", "f1")
    assert bad.exit_code == 2 and "NAME=NUMBER" in bad.output


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


def run_cli(cli: Cli, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The real `octomil-lite` command in a subprocess, with the URL and key from the environment."""
    env = {**os.environ, "OCTOMIL_LITE_URL": cli.url, "OCTOMIL_API_KEY": cli.key}
    return subprocess.run([sys.executable, "-m", "octomil_lite.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120)


def test_download_into_a_new_folder_ending_in_a_slash_saves_model_vn_inside(cli: Cli, tmp_path: Path) -> None:
    model_id = cli.ok("models", "create").strip()
    source = model_file(tmp_path / "m.pkl", 5000)
    cli.ok("upload", model_id, str(source), "--format", "sklearn")
    done = run_cli(cli, "download", model_id, "1", "-o", "newdir/", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(Path("newdir") / "model_v1.pkl")
    assert (tmp_path / "newdir" / "model_v1.pkl").read_bytes() == source.read_bytes()


def test_no_key_says_set_octomil_api_key_or_pass_api_key(cli: Cli) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OCTOMIL_API_KEY"}
    done = subprocess.run([sys.executable, "-m", "octomil_lite.cli", "models", "list", "--url", cli.url],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "set OCTOMIL_API_KEY or pass --api-key" in done.stderr and "Authorization" not in done.stderr
    wrong = run_cli(cli, "models", "list", "--api-key", "oml_wrong")
    assert wrong.returncode == 1 and "--api-key" in wrong.stderr and "Authorization" not in wrong.stderr


def test_an_upload_the_server_cannot_identify_says_pass_format(cli: Cli, tmp_path: Path) -> None:
    model_id = cli.ok("models", "create").strip()
    notes = tmp_path / "notes.txt"
    notes.write_text("hello, not a model")
    done = run_cli(cli, "upload", model_id, str(notes))
    assert done.returncode == 1 and "pass --format (pytorch," in done.stderr, done.stderr
    assert "'format' field" not in done.stderr


def test_models_get_shows_version_labels_and_sizes_in_mib(cli: Cli, tmp_path: Path) -> None:
    model_id = cli.ok("models", "create").strip()
    source = model_file(tmp_path / "m.pkl", 3 * 1024 * 1024)
    cli.ok("upload", model_id, str(source), "--format", "sklearn", "--label", "v1.0-rc")
    cli.ok("upload", model_id, str(source), "--format", "sklearn")
    shown = run_cli(cli, "models", "get", model_id)
    assert shown.returncode == 0, shown.stderr
    rows = shown.stdout.splitlines()
    header = next(i for i, line in enumerate(rows) if line.startswith("VERSION"))
    assert rows[header].split()[:5] == ["VERSION", "LABEL", "STATUS", "FORMAT", "SIZE"]
    assert rows[header + 1].split()[:6] == ["1", "v1.0-rc", "published", "sklearn", "3.0", "MiB"]
    assert rows[header + 2].split()[:2] == ["2", "-"]
    assert "3.0 MiB" in run_cli(cli, "models", "list").stdout


@pytest.mark.parametrize(("args", "said"), [
    (["download", "m", "1", "-o", "out/"], "Interrupted; run the same command again to resume the download."),
    (["models", "list"], "Interrupted."),
])
def test_ctrl_c_exits_130_with_one_line(tmp_path: Path, args: list[str], said: str) -> None:
    with socket.socket() as stalled:  # a server that accepts the connection and never answers
        stalled.bind(("127.0.0.1", 0))
        stalled.listen()
        url = f"http://127.0.0.1:{stalled.getsockname()[1]}"
        proc = subprocess.Popen([sys.executable, "-m", "octomil_lite.cli", *args, "--url", url, "--api-key", "oml_x"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
        stalled.settimeout(60)
        conn, _ = stalled.accept()
        with conn:
            conn.recv(65536)  # the request has been sent: the command is waiting for the answer
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == [said]
