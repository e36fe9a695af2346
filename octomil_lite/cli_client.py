"""`octomil-lite models|upload|download`: command-line use of a registry through the Python client.

httpx is imported only when one of these commands runs, so `octomil-lite --help` and `serve` stay light.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from .config import human_size
from .schemas import FRAMEWORKS

if TYPE_CHECKING:
    from .client import Client, OctomilLiteError, Progress

F = TypeVar("F", bound=Callable[..., Any])

UPLOAD_FORMATS = ("pytorch", "tensorflow", "onnx", "sklearn", "xgboost", "lightgbm", "numpy")
INTERRUPTED = 130  # the shell's exit status for a command stopped by Ctrl-C (128 + SIGINT)


def _connection(command: F) -> F:
    """Add --url/--api-key, hand the command a Client, and turn every client error into a one-line message."""

    @click.option("--url", default=None, metavar="URL",
                  help="Registry base URL [default: $OCTOMIL_LITE_URL, else http://127.0.0.1:8080].")
    @click.option("--api-key", default=None, metavar="KEY", help="API key [default: $OCTOMIL_API_KEY].")
    @functools.wraps(command)
    def wrapper(url: str | None, api_key: str | None, **kwargs: Any) -> Any:
        from .client import Client, OctomilLiteError

        client = Client(url, api_key)
        try:
            with client:
                return command(client, **kwargs)
        except OctomilLiteError as exc:
            raise click.ClickException(_cli_message(exc, client.base_url, client.api_key is not None)) from None

    return wrapper  # type: ignore[return-value]


def _cli_message(exc: OctomilLiteError, url: str, had_key: bool) -> str:
    """The server's message, in the CLI's own terms where it names HTTP headers or form fields."""
    if exc.status == 401:
        if not had_key:
            return ("No API key: set OCTOMIL_API_KEY or pass --api-key "
                    "(make one with: octomil-lite keys create --name NAME).")
        return f"The registry at {url} refused the API key; set OCTOMIL_API_KEY or pass --api-key with a valid one."
    if exc.status == 400 and any(d.get("key") == "format" for d in exc.details if isinstance(d, dict)):
        return f"Could not tell the model format from the file; pass --format ({', '.join(UPLOAD_FORMATS)})."
    return exc.message


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2))


def _size(value: int | None) -> str:
    return "-" if value is None else human_size(value)


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(headers: list[str], rows: list[list[str]]) -> None:
    """Print left-aligned columns as wide as their widest cell; the last column is not padded."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]  # rows may be empty
    for line in [headers, *rows]:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(line[:-1], widths, strict=False)) + "  " + line[-1])


def _short(text: str | None, width: int = 40) -> str:
    text = " ".join((text or "-").split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _print_model(model: dict[str, Any]) -> None:
    for field in ("id", "name", "framework", "framework_version", "description", "is_baseline", "round_id",
                  "accuracy", "loss", "model_size_bytes", "model_hash", "model_path", "created_at"):
        if field in model:
            value = model[field]
            click.echo(f"{field + ':':<19}{_size(value) if field == 'model_size_bytes' else _text(value)}")
    if model.get("architecture"):
        click.echo(f"{'architecture:':<19}{_metrics(model['architecture'])}")
    if model.get("events"):
        counts = ", ".join(f"{name}={event['count']}" for name, event in model["events"].items())
        click.echo(f"{'events:':<19}{counts}")
    versions = model.get("versions")
    if versions:
        click.echo()
        _versions_table(versions)


def _metrics(values: dict[str, Any]) -> str:
    return " ".join(f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}"
                    for name, value in values.items()) or "-"


def _versions_table(versions: list[dict[str, Any]]) -> None:
    _table(["VERSION", "LABEL", "STATUS", "FORMAT", "SIZE", "UPLOADED", "METRICS", "DESCRIPTION"],
           [[str(v["version"]), _text(v.get("label")), v.get("status", "-"), v["format"], _size(v["model_size_bytes"]),
             v["uploaded_at"], _metrics(v.get("metrics") or {}), _short(v.get("description"), 30)] for v in versions])


def _show(model: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _print_json(model)
    else:
        _print_model(model)


@contextmanager
def _progress_bar(label: str) -> Iterator[Progress | None]:
    """A progress callback drawing on stderr when it is a terminal, else None."""
    if not sys.stderr.isatty():
        yield None
        return
    bar: Any = None
    shown = 0

    def update(done: int, total: int) -> None:
        nonlocal bar, shown
        if bar is None:
            bar = click.progressbar(length=total, label=label, file=sys.stderr, show_pos=False, show_percent=True)
            bar.__enter__()
        bar.update(done - shown)
        shown = done

    try:
        yield update
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)


def _fields(**options: Any) -> dict[str, Any]:
    return {name: value for name, value in options.items() if value is not None}


def _model_options(command: F) -> F:
    """The fields shared by `models create` and `models update`."""
    for option in reversed([
        click.option("--framework-version", default=None, help="e.g. 1.5.2"),
        click.option("--description", default=None, help="Up to 1000 characters."),
        click.option("--baseline/--no-baseline", "is_baseline", default=None, help="Mark as a baseline model."),
        click.option("--round-id", default=None, help="Federated-learning round that produced the model."),
        click.option("--accuracy", type=float, default=None),
        click.option("--loss", type=float, default=None),
    ]):
        command = option(command)
    return command


@click.group()
def models() -> None:
    """List, show, create, update and delete models on a registry."""


@models.command("list")
@click.option("--framework", type=click.Choice(FRAMEWORKS), default=None, help="Only this framework.")
@click.option("--baseline/--no-baseline", "is_baseline", default=None, help="Only baselines, or only non-baselines.")
@json_option
@_connection
def models_list(client: Client, framework: str | None, is_baseline: bool | None, as_json: bool) -> None:
    """List every model, newest first."""
    found = list(client.list_models(framework=framework, is_baseline=is_baseline))
    if as_json:
        _print_json(found)
        return
    _table(["ID", "FRAMEWORK", "BASELINE", "ROUND", "ACCURACY", "SIZE", "CREATED", "DESCRIPTION"],
           [[m["id"], _text(m.get("framework")), _text(m.get("is_baseline")), _text(m.get("round_id")),
             _text(m.get("accuracy")), _size(m.get("model_size_bytes")), m.get("created_at", "-"),
             _short(m.get("description"))] for m in found])


@models.command("get")
@click.argument("model_id")
@json_option
@_connection
def models_get(client: Client, model_id: str, as_json: bool) -> None:
    """Show one model and its versions."""
    model = client.get_model(model_id)
    _show(model, as_json)


@models.command("create")
@click.option("--framework", type=click.Choice(FRAMEWORKS), default=None)
@_model_options
@json_option
@_connection
def models_create(client: Client, as_json: bool, **options: Any) -> None:
    """Create a model and print its id (alone, so MODEL=$(octomil-lite models create ...) works)."""
    model = client.create_model(**_fields(**options))
    if as_json:
        _print_json(model)
    else:
        click.echo(model["id"])


@models.command("update")
@click.argument("model_id")
@_model_options
@json_option
@_connection
def models_update(client: Client, model_id: str, as_json: bool, **options: Any) -> None:
    """Change some fields of a model and show it."""
    fields = _fields(**options)
    if not fields:
        raise click.UsageError("Give at least one field to change, e.g. --description TEXT.")
    model = client.update_model(model_id, **fields)
    _show(model, as_json)


@models.command("delete")
@click.argument("model_id")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@_connection
def models_delete(client: Client, model_id: str, yes: bool) -> None:
    """Delete a model and all its versions."""
    if not yes:
        click.confirm(f"Delete model {model_id} and all its versions?", abort=True, err=True)
    client.delete_model(model_id)
    click.echo(f"deleted {model_id}", err=True)


@click.command()
@click.argument("model_id")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--format", "format_", type=click.Choice(UPLOAD_FORMATS), default=None,
              help="The file's format [default: inferred from its bytes].")
@click.option("--description", default=None)
@click.option("--input-shape", default=None, metavar="SHAPE", help="Input shape for conversion, e.g. 1,3,32,32.")
@click.option("--round-id", default=None, help="Federated-learning round that produced this version.")
@click.option("--accuracy", type=float, default=None)
@click.option("--loss", type=float, default=None)
@click.option("--label", default=None, help="A version label usable wherever a version number is.")
@json_option
@_connection
def upload(client: Client, model_id: str, file: Path, format_: str | None, description: str | None,
           input_shape: str | None, round_id: str | None, accuracy: float | None, loss: float | None,
           label: str | None, as_json: bool) -> None:
    """Upload FILE as the next version of MODEL_ID."""
    with _progress_bar(f"uploading {file.name}") as progress:
        version = client.upload_version(model_id, file, format=format_, description=description, progress=progress,
                                        **_fields(input_shape=input_shape, round_id=round_id, accuracy=accuracy,
                                                  loss=loss, version=label))
    if as_json:
        _print_json(version)
        return
    click.echo(f"version {version['version']} of {version['model_id']}: {version['format']}, "
               f"{_size(version['model_size_bytes'])}, {version['model_hash']}")


@click.command()
@click.argument("model_id")
@click.argument("version")
@click.option("--format", "format_", default=None, help="original (default), onnx, tflite, coreml, ...")
@click.option("--output", "-o", type=click.Path(), default=".", show_default=True,
              help="File to write, or a directory (existing, or ending in '/') to save model_vN.ext in.")
@click.option("--wait", "wait", type=float, default=None, metavar="SECONDS",
              help="Wait up to SECONDS for a conversion that is still pending.")
@_connection
def download(client: Client, model_id: str, version: str, format_: str | None, output: str,
             wait: float | None) -> None:
    """Download VERSION (a number, 'latest' or a label) of MODEL_ID; an interrupted download resumes."""
    if wait is not None and format_:
        client.wait_for_format(model_id, version, format_, timeout=wait)
    try:
        with _progress_bar(f"downloading v{version}") as progress:
            path = client.download_version(model_id, version, output, format=format_, progress=progress)
    except KeyboardInterrupt:
        click.echo("Interrupted; run the same command again to resume the download.", err=True)
        raise SystemExit(INTERRUPTED) from None
    click.echo(str(path))


@click.group()
def versions() -> None:
    """List versions, publish or deprecate one, and record its metrics."""


@versions.command("list")
@click.argument("model_id")
@click.option("--status", type=click.Choice(["draft", "published", "deprecated"]), default=None)
@json_option
@_connection
def versions_list(client: Client, model_id: str, status: str | None, as_json: bool) -> None:
    """List the versions of MODEL_ID, newest first."""
    found = list(client.list_versions(model_id, status=status))
    if as_json:
        _print_json(found)
    else:
        _versions_table(found)


def _status_command(name: str, status: str) -> click.Command:
    @versions.command(name)
    @click.argument("model_id")
    @click.argument("version")
    @json_option
    @_connection
    def command(client: Client, model_id: str, version: str, as_json: bool) -> None:
        got = client.set_version_status(model_id, version, status)
        if as_json:
            _print_json(got)
        else:
            click.echo(f"version {got['version']} of {got['model_id']}: {got['status']}")

    command.__doc__ = f"Mark VERSION of MODEL_ID {status} (again is a no-op)."
    return command


_status_command("publish", "published")
_status_command("deprecate", "deprecated")


def _metric(value: str) -> tuple[str, float | None]:
    name, sep, number = value.partition("=")
    if not sep or not name:
        raise click.BadParameter(f"'{value}' is not NAME=NUMBER (or NAME= to remove it).")
    try:
        return name, float(number) if number else None
    except ValueError:
        raise click.BadParameter(f"'{number}' in '{value}' is not a number.") from None


@versions.command("metrics")
@click.argument("model_id")
@click.argument("version")
@click.argument("metrics", nargs=-1, required=True, metavar="NAME=NUMBER...")
@json_option
@_connection
def versions_metrics(client: Client, model_id: str, version: str, metrics: tuple[str, ...], as_json: bool) -> None:
    """Set metrics of VERSION of MODEL_ID, e.g. f1=0.91 latency_ms=12 (NAME= removes one)."""
    got = client.update_version_metrics(model_id, version, dict(_metric(m) for m in metrics))
    if as_json:
        _print_json(got)
    else:
        click.echo(f"version {got['version']} of {got['model_id']}: {_metrics(got['metrics'])}")


CLIENT_COMMANDS: list[click.Command] = [models, versions, upload, download]
