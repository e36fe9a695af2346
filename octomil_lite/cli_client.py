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

from .schemas import FRAMEWORKS

if TYPE_CHECKING:
    from .client import Client, Progress

F = TypeVar("F", bound=Callable[..., Any])

UPLOAD_FORMATS = ("pytorch", "tensorflow", "onnx", "sklearn", "xgboost", "lightgbm", "numpy")


def _connection(command: F) -> F:
    """Add --url/--api-key, hand the command a Client, and turn every client error into a one-line message."""

    @click.option("--url", default=None, metavar="URL",
                  help="Registry base URL [default: $OCTOMIL_LITE_URL, else http://127.0.0.1:8080].")
    @click.option("--api-key", default=None, metavar="KEY", help="API key [default: $OCTOMIL_API_KEY].")
    @functools.wraps(command)
    def wrapper(url: str | None, api_key: str | None, **kwargs: Any) -> Any:
        from .client import Client, OctomilLiteError

        try:
            with Client(url, api_key) as client:
                return command(client, **kwargs)
        except OctomilLiteError as exc:
            raise click.ClickException(exc.message) from None

    return wrapper  # type: ignore[return-value]


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2))


def _size(value: int | None) -> str:
    if value is None:
        return "-"
    units = ["B", "KB", "MB", "GB", "TB"]
    size, unit = float(value), 0
    while size >= 1024 and unit < len(units) - 1:
        size, unit = size / 1024, unit + 1
    return f"{value} B" if unit == 0 else f"{size:.1f} {units[unit]}"


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
    versions = model.get("versions")
    if versions:
        click.echo()
        _table(["VERSION", "FORMAT", "SIZE", "UPLOADED", "DESCRIPTION"],
               [[str(v["version"]), v["format"], _size(v["model_size_bytes"]), v["uploaded_at"],
                 _short(v.get("description"))] for v in versions])


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
@click.option("--output", "-o", type=click.Path(path_type=Path), default=Path("."), show_default=True,
              help="File to write, or a directory to use the server's file name.")
@click.option("--wait", "wait", type=float, default=None, metavar="SECONDS",
              help="Wait up to SECONDS for a conversion that is still pending.")
@_connection
def download(client: Client, model_id: str, version: str, format_: str | None, output: Path,
             wait: float | None) -> None:
    """Download VERSION (a number, 'latest' or a label) of MODEL_ID; an interrupted download resumes."""
    if wait is not None and format_:
        client.wait_for_format(model_id, version, format_, timeout=wait)
    try:
        with _progress_bar(f"downloading v{version}") as progress:
            path = client.download_version(model_id, version, output, format=format_, progress=progress)
    except KeyboardInterrupt:
        raise click.ClickException("Interrupted; run the same command again to resume the download.") from None
    click.echo(str(path))


CLIENT_COMMANDS: list[click.Command] = [models, upload, download]
