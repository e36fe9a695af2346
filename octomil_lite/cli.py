"""`octomil-lite` command line: thin wrappers over Registry and the app."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import click

from . import __version__, maintenance
from .cli_client import CLIENT_COMMANDS
from .config import Config, default_data_dir
from .errors import OctomilError

T = TypeVar("T")


def _with_registry(config: Config, action: Callable[..., Awaitable[T]]) -> T:
    from .registry import Registry

    async def run() -> T:
        registry = await Registry.open(config)
        try:
            return await action(registry)
        finally:
            await registry.close()

    try:
        return asyncio.run(run())
    except OctomilError as exc:
        raise click.ClickException(exc.message) from None


def _size(value: str) -> int:
    units = {"k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
    text = value.strip().lower().removesuffix("ib").removesuffix("b")
    factor = units.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in units else text
    try:
        return int(float(number) * factor)
    except ValueError:
        raise click.BadParameter(f"'{value}' is not a size (e.g. 20G, 512M, 1048576)") from None


def _duration(value: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = value.strip().lower()
    factor = units.get(text[-1:], 1)
    try:
        seconds = int(float(text[:-1] if text[-1:] in units else text) * factor)
    except ValueError:
        raise click.BadParameter(f"'{value}' is not a duration (e.g. 7d, 12h, 3600)") from None
    if seconds < 1:
        raise click.BadParameter(f"'{value}' must be at least one second")
    return seconds


data_dir_option = click.option(
    "--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Data directory [default: $OCTOMIL_LITE_HOME, else $XDG_DATA_HOME/octomil-lite "
         "or ~/.local/share/octomil-lite]")


@click.group()
@click.version_option(__version__, prog_name="octomil-lite")
def main() -> None:
    """octomil-lite: a local model registry speaking the Octomil Models API."""


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="TCP port.")
@data_dir_option
@click.option("--max-upload-size", default="20G", show_default=True,
              help="Largest model file accepted (bytes, or 512M, 20G).")
@click.option("--rate-limit", default=6000, show_default=True, type=click.IntRange(0),
              help="Requests per minute per API key; 0 turns the limit off.")
@click.option("--max-link-age", default="7d", show_default=True,
              help="Longest validity of a download-url link (seconds, or 12h, 7d); longer requests are a 400.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
@click.option("--access-log/--no-access-log", default=False, show_default=True, help="Log every request.")
@click.option("--conversion-timeout", default=900.0, show_default=True, type=click.FloatRange(1),
              help="Seconds one conversion job may take before it is killed with every process it started.")
@click.option("--unsafe-conversions", is_flag=True,
              help="Run conversion jobs WITHOUT isolation where it cannot be set up (an uploaded model file can "
                   "then take over the server).")
def serve(host: str, port: int, data_dir: Path | None, max_upload_size: str, rate_limit: int,
          max_link_age: str, log_level: str, access_log: bool, conversion_timeout: float,
          unsafe_conversions: bool) -> None:
    """Run the registry server."""
    from .server.app import create_app
    from .server.httpserver import run

    config = Config(data_dir=data_dir or default_data_dir(), host=host, port=port,
                    max_upload_size=_size(max_upload_size), rate_limit=rate_limit,
                    max_link_age=_duration(max_link_age), conversion_timeout=conversion_timeout,
                    unsafe_conversions=unsafe_conversions)

    try:
        key = _with_registry(config, lambda r: r.first_admin_key())
    except (OSError, RuntimeError) as exc:
        raise click.ClickException(f"cannot open the data directory {config.data_dir}: {exc}") from None
    if key:
        shown = "localhost" if host in ("127.0.0.1", "0.0.0.0", "::") else host
        click.echo(f"Created the first API key (admin scope); it is shown only this once:\n\n  {key}\n\n"
                   f"Try it:\n  curl -H 'Authorization: Bearer {key}' http://{shown}:{port}/api/v1/models\n")
    click.echo(f"octomil-lite {__version__}: data in {config.data_dir}, listening on http://{host}:{port}", err=True)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(create_app(config), host=host, port=port, log_level=log_level, access_log=access_log)


@main.group()
def keys() -> None:
    """Create, list and revoke API keys."""


@keys.command("create")
@click.option("--name", required=True, help="A name to recognise and revoke the key by.")
@click.option("--scope", type=click.Choice(["read", "write", "admin"]), default="write", show_default=True)
@data_dir_option
def keys_create(name: str, scope: str, data_dir: Path | None) -> None:
    """Create a key and print it (alone, so KEY=$(octomil-lite keys create --name ci) works)."""
    config = Config(data_dir=data_dir or default_data_dir())
    click.echo(_with_registry(config, lambda r: r.create_key(name, scope)))


@keys.command("list")
@data_dir_option
def keys_list(data_dir: Path | None) -> None:
    """List keys (never the keys themselves)."""
    config = Config(data_dir=data_dir or default_data_dir())
    rows = _with_registry(config, lambda r: r.list_keys())
    click.echo(f"{'NAME':<24} {'PREFIX':<10} {'SCOPE':<6} {'CREATED':<21} REVOKED")
    for row in rows:
        click.echo(f"{row['name']:<24} {row['prefix'] + '…':<10} {row['scope']:<6} {row['created_at']:<21} "
                   f"{row['revoked_at'] or '-'}")


@keys.command("revoke")
@click.argument("name")
@data_dir_option
def keys_revoke(name: str, data_dir: Path | None) -> None:
    """Revoke the active key called NAME."""
    config = Config(data_dir=data_dir or default_data_dir())
    _with_registry(config, lambda r: r.revoke_key(name))
    click.echo(f"revoked {name}", err=True)


@main.group()
def secret() -> None:
    """The secret that signs download links."""


@secret.command("rotate")
@data_dir_option
def secret_rotate(data_dir: Path | None) -> None:
    """Replace the signing secret: every download link made so far stops working, also on a running server."""
    from .auth import LinkSecret

    home = data_dir or default_data_dir()
    if not home.is_dir():
        raise click.ClickException(f"no data directory at {home}")
    LinkSecret(home / "secret.key").rotate()
    click.echo("rotated the download-link secret; every link made before now is invalid", err=True)


def _bytes(n: int) -> str:
    return f"{n} B" if n < 1024 else f"{n / 1024**2:.1f} MiB" if n < 1024**3 else f"{n / 1024**3:.2f} GiB"


@main.command()
@click.option("--grace", default=3600.0, show_default=True, type=click.FloatRange(0),
              help="Only delete what has been untouched for this many seconds (protects uploads in flight).")
@click.option("--dry-run", is_flag=True, help="Say what would be deleted; delete nothing.")
@data_dir_option
def gc(grace: float, dry_run: bool, data_dir: Path | None) -> None:
    """Delete blobs that no version references, and leftover temp files."""
    config = Config(data_dir=data_dir or default_data_dir())
    done = _with_registry(config, lambda r: maintenance.gc(r.db, r.blobs, grace, dry_run))
    verb = "would delete" if dry_run else "deleted"
    click.echo(f"{verb} {done['blobs']} unreferenced blob(s), {_bytes(done['blob_bytes'])}; "
               f"{done['temp_files']} temp file(s), {_bytes(done['temp_bytes'])}")


@main.command()
@data_dir_option
def verify(data_dir: Path | None) -> None:
    """Re-hash every blob and check every row against the store; exit 1 on any problem."""
    config = Config(data_dir=data_dir or default_data_dir())
    problems, counts = _with_registry(config, lambda r: maintenance.verify(r.db, r.blobs))
    for problem in problems:
        click.echo(f"PROBLEM: {problem}")
    click.echo(f"checked {counts['blobs']} blob(s) ({_bytes(counts['bytes'])}) and {counts['rows']} row(s); "
               f"{counts['orphan_blobs']} unreferenced blob(s) and {counts['temp_files']} temp file(s) "
               f"(octomil-lite gc removes them); {len(problems)} problem(s)")
    if problems:
        raise SystemExit(1)


for command in CLIENT_COMMANDS:
    main.add_command(command)

if __name__ == "__main__":
    main()
