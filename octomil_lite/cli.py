"""`octomil-lite` command line: thin wrappers over Registry and the app."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from . import __version__, maintenance, transfer
from .auth import SCOPES
from .cli_client import CLIENT_COMMANDS, INTERRUPTED
from .cli_training import TRAINING_COMMANDS
from .config import LINK_AGE_CEILING, Config, default_data_dir, human_size
from .errors import OctomilError

if TYPE_CHECKING:
    from .registry import Registry

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
    if not 1 <= seconds <= LINK_AGE_CEILING:
        raise click.BadParameter(f"'{value}' must be between one second and {LINK_AGE_CEILING // 86400} days")
    return seconds


data_dir_option = click.option(
    "--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Data directory [default: $OCTOMIL_LITE_HOME, else $XDG_DATA_HOME/octomil-lite "
         "or ~/.local/share/octomil-lite]")

database_option = click.option(
    "--database", envvar="OCTOMIL_LITE_DATABASE", default=None, metavar="URL",
    help="sqlite:///PATH or postgresql://USER:PASS@HOST:PORT/DB [env OCTOMIL_LITE_DATABASE; default: the data "
         "directory's registry.sqlite3].")
blobs_option = click.option(
    "--blobs", envvar="OCTOMIL_LITE_BLOBS", default=None, metavar="DIR|URL",
    help="A directory or s3://BUCKET/PREFIX (endpoint and credentials from the AWS variables and profiles) "
         "[env OCTOMIL_LITE_BLOBS; default: the data directory's blobs/].")


def storage_options(command: Callable[..., None]) -> Callable[..., None]:
    return data_dir_option(database_option(blobs_option(command)))


def _config(data_dir: Path | None, database: str | None, blobs: str | None, **settings: Any) -> Config:
    return Config(data_dir=data_dir or default_data_dir(), database=database, blobs=blobs, **settings)


class _Main(click.Group):
    """The command group; Ctrl-C ends any command with status 130 and one line, not click's 'Aborted!' (1)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            ctx.exit(INTERRUPTED)


@click.group(cls=_Main)
@click.version_option(__version__, prog_name="octomil-lite")
def main() -> None:
    """octomil-lite: a local model registry speaking the Octomil Models API."""


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="TCP port.")
@storage_options
@click.option("--max-upload-size", default="20G", show_default=True,
              help="Largest model file accepted (bytes, or 512M, 20G).")
@click.option("--rate-limit", default=6000, show_default=True, type=click.IntRange(0),
              help="Requests per minute per API key; 0 turns the limit off.")
@click.option("--max-link-age", default="7d", show_default=True,
              help="Longest validity of a download-url link (seconds, or 12h, 7d); longer requests are a 400.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
@click.option("--access-log/--no-access-log", default=False, show_default=True, help="Log every request.")
@click.option("--presigned-downloads", is_flag=True,
              help="With s3:// blobs, download-url hands out the bucket's own pre-signed URL.")
@click.option("--conversion-lease", default=60.0, show_default=True, type=click.FloatRange(1),
              help="Seconds a conversion stays claimed without a renewal; then any server takes it over.")
@click.option("--conversion-timeout", default=900.0, show_default=True, type=click.FloatRange(1),
              help="Seconds one conversion job may take before it is killed with every process it started.")
@click.option("--warm-pool/--no-warm-pool", default=True, show_default=True,
              help="Keep isolated conversion workers started ahead of time (frameworks imported, no upload seen).")
@click.option("--warm-pool-size", default=1, show_default=True, type=click.IntRange(1, 16),
              help="Idle warm workers kept per framework family (each holds its frameworks' memory).")
@click.option("--warm-idle-timeout", default=300.0, show_default=True, type=click.FloatRange(1),
              help="Seconds a framework family goes unused before its warm workers are ended.")
@click.option("--unsafe-conversions", is_flag=True,
              help="Run conversion jobs WITHOUT isolation where it cannot be set up (an uploaded model file can "
                   "then take over the server).")
def serve(host: str, port: int, data_dir: Path | None, database: str | None, blobs: str | None,
          max_upload_size: str, rate_limit: int, max_link_age: str, log_level: str, access_log: bool,
          presigned_downloads: bool, conversion_lease: float, conversion_timeout: float, warm_pool: bool,
          warm_pool_size: int, warm_idle_timeout: float, unsafe_conversions: bool) -> None:
    """Run the registry server (it keeps the terminal; stop it with Ctrl-C). Several may share one PostgreSQL
    database and bucket."""
    from .server.app import create_app
    from .server.httpserver import listen, run

    config = _config(data_dir, database, blobs, host=host, port=port, max_upload_size=_size(max_upload_size),
                     rate_limit=rate_limit, max_link_age=_duration(max_link_age), conversion_lease=conversion_lease,
                     presigned_downloads=presigned_downloads, conversion_timeout=conversion_timeout,
                     unsafe_conversions=unsafe_conversions, warm_pool_size=warm_pool_size if warm_pool else 0,
                     warm_idle_timeout=warm_idle_timeout)
    try:  # the port first: a start that cannot listen must not create (and lose) the first key
        sock = listen(host, port)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror or exc}; "
                                   "is another server running? Pick another port with --port.") from None
    port = sock.getsockname()[1]
    try:
        key = _with_registry(config, lambda r: r.first_admin_key())
    except (OSError, RuntimeError) as exc:
        sock.close()
        raise click.ClickException(f"cannot open the registry's storage ({config.data_dir}): {exc}") from None
    shown = "localhost" if host in ("127.0.0.1", "0.0.0.0", "::") else host
    url = f"http://[{shown}]:{port}" if ":" in shown else f"http://{shown}:{port}"
    if key:
        click.echo(f"Created the first API key (admin scope); it is shown only this once:\n\n  {key}\n\n"
                   f"Try it:\n  curl -H 'Authorization: Bearer {key}' {url}/api/v1/models\n")
    click.echo(f"Web page: {url}/   API docs: {url}/schema")
    where = ", ".join(filter(None, [str(config.data_dir), database and database.split("@")[-1], blobs]))
    click.echo(f"octomil-lite {__version__}: data in {where}, listening on http://{host}:{port}", err=True)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(create_app(config), sock, log_level=log_level, access_log=access_log)


@main.group()
def keys() -> None:
    """Create, list and revoke API keys."""


@keys.command("create")
@click.option("--name", required=True, help="A name to recognise and revoke the key by.")
@click.option("--scope", type=click.Choice(SCOPES), default="write", show_default=True,
              help="read: list and download; device: also register devices and submit training updates; "
                   "write: also change models; admin: also manage keys")
@storage_options
def keys_create(name: str, scope: str, data_dir: Path | None, database: str | None, blobs: str | None) -> None:
    """Create a key and print it (alone, so KEY=$(octomil-lite keys create --name ci) works)."""
    config = _config(data_dir, database, blobs)
    click.echo(_with_registry(config, lambda r: r.create_key(name, scope)))


@keys.command("list")
@storage_options
def keys_list(data_dir: Path | None, database: str | None, blobs: str | None) -> None:
    """List keys (never the keys themselves)."""
    config = _config(data_dir, database, blobs)
    rows = _with_registry(config, lambda r: r.list_keys())
    click.echo(f"{'NAME':<24} {'PREFIX':<10} {'SCOPE':<6} {'CREATED':<21} REVOKED")
    for row in rows:
        click.echo(f"{row['name']:<24} {row['prefix'] + '…':<10} {row['scope']:<6} {row['created_at']:<21} "
                   f"{row['revoked_at'] or '-'}")


@keys.command("revoke")
@click.argument("name")
@storage_options
def keys_revoke(name: str, data_dir: Path | None, database: str | None, blobs: str | None) -> None:
    """Revoke the active key called NAME."""
    config = _config(data_dir, database, blobs)
    _with_registry(config, lambda r: r.revoke_key(name))
    click.echo(f"revoked {name}", err=True)


@main.group()
def secret() -> None:
    """The secret that signs download links."""


@secret.command("rotate")
@storage_options
def secret_rotate(data_dir: Path | None, database: str | None, blobs: str | None) -> None:
    """Replace the signing secret: every download link made so far stops working, also on a running server."""
    home = data_dir or default_data_dir()
    if database is None and not home.is_dir():
        raise click.ClickException(f"no data directory at {home}")
    _with_registry(_config(data_dir, database, blobs), lambda r: r.rotate_link_secret())
    click.echo("rotated the download-link secret; every link made before now is invalid", err=True)


@main.command()
@click.option("--grace", default=3600.0, show_default=True, type=click.FloatRange(0),
              help="Only delete what has been untouched for this many seconds (protects uploads in flight).")
@click.option("--dry-run", is_flag=True, help="Say what would be deleted; delete nothing.")
@storage_options
def gc(grace: float, dry_run: bool, data_dir: Path | None, database: str | None, blobs: str | None) -> None:
    """Delete blobs that no version references, and leftover temp files."""
    config = _config(data_dir, database, blobs)
    done = _with_registry(config, lambda r: maintenance.gc(r.db, r.blobs, grace, dry_run, r.direct))
    verb = "would delete" if dry_run else "deleted"
    click.echo(f"{verb} {done['blobs']} unreferenced blob(s), {human_size(done['blob_bytes'])}; "
               f"{done['temp_files']} temp file(s), {human_size(done['temp_bytes'])}")
    if done["held_blobs"]:
        click.echo(f"kept {done['held_blobs']} unreferenced blob(s), {human_size(done['held_bytes'])}, "
                   f"untouched for less than the {grace:g} s grace period (it protects uploads in flight); "
                   "'octomil-lite gc --grace 0' reclaims them now")


@main.command()
@storage_options
@click.option("--to-database", required=True, metavar="URL", help="The target: postgresql://USER:PASS@HOST:PORT/DB.")
@click.option("--to-blobs", required=True, metavar="DIR|URL", help="The target blob store: s3://BUCKET/PREFIX.")
def migrate(data_dir: Path | None, database: str | None, blobs: str | None, to_database: str, to_blobs: str) -> None:
    """Copy this registry (rows, ids, numbers, keys as hashes, link secret, blobs) to other stores.

    Every blob is re-hashed on the way; run it again after an interruption and it resumes. The source is only read.
    """
    source = _config(data_dir, database, blobs)
    target = _config(data_dir, to_database, to_blobs)
    try:
        done = asyncio.run(maintenance.migrate(source, target, lambda line: click.echo(line, err=True)))
    except OctomilError as exc:
        raise click.ClickException(exc.message) from None
    click.echo(", ".join(f"{k} {v}" for k, v in done.items()))


@main.command()
@storage_options
def verify(data_dir: Path | None, database: str | None, blobs: str | None) -> None:
    """Re-hash every blob and check every row against the store; exit 1 on any problem."""
    config = _config(data_dir, database, blobs)
    problems, counts = _with_registry(config, lambda r: maintenance.verify(r.db, r.blobs))
    for problem in problems:
        click.echo(f"PROBLEM: {problem}")
    click.echo(f"checked {counts['blobs']} blob(s) ({human_size(counts['bytes'])}) and {counts['rows']} row(s); "
               f"{counts['orphan_blobs']} unreferenced blob(s) and {counts['temp_files']} temp file(s) "
               f"(octomil-lite gc removes them); {len(problems)} problem(s)")
    if problems:
        raise SystemExit(1)


@main.command("export")
@click.argument("models", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Export every model.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
              help="The bundle to write ('-' for standard output).")
@click.option("--formats", default=None, metavar="LIST",
              help="Artifacts to carry, e.g. original,onnx [default: original and every ready conversion]. "
                   "A version's original bytes are always included.")
@data_dir_option
def export_bundle(models: tuple[str, ...], everything: bool, output: Path, formats: str | None,
                  data_dir: Path | None) -> None:
    """Write MODELS (ids or names) with every version and artifact into one tar bundle."""
    if everything == bool(models):
        raise click.UsageError("name the models to export, or give --all (not both)")
    config = Config(data_dir=data_dir or default_data_dir())

    async def write(registry: Registry) -> tuple[int, int]:
        plan = await transfer.plan_export(registry, None if everything else list(models), formats)
        await asyncio.to_thread(_write_bundle, plan.chunks(registry.blobs.open), output)
        return len(plan.files), plan.length()

    files, size = _with_registry(config, write)
    click.echo(f"exported {files} file(s), {human_size(size)} to {output}", err=True)


def _write_bundle(chunks: Iterator[bytes], output: Path) -> None:
    """Stream to OUTPUT.partial and rename it when complete, so a failed export leaves no file that looks whole."""
    if str(output) == "-":
        out = click.get_binary_stream("stdout")
        for chunk in chunks:
            out.write(chunk)
        out.flush()
        return
    partial = output.with_name(output.name + ".partial")
    try:
        with open(partial, "wb") as out:
            for chunk in chunks:
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, output)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


@main.command("import")
@click.argument("bundle", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path))
@data_dir_option
def import_bundle(bundle: Path, data_dir: Path | None) -> None:
    """Import a bundle ('-' for standard input): all of it, verified, or nothing."""
    config = Config(data_dir=data_dir or default_data_dir())

    async def read(registry: Registry) -> dict[str, int]:
        if str(bundle) == "-":
            return await transfer.import_bundle(registry.db, registry.blobs, click.get_binary_stream("stdin"))
        with open(bundle, "rb") as source:
            return await transfer.import_bundle(registry.db, registry.blobs, source)

    try:
        done = _with_registry(config, read)
    except OSError as exc:
        raise click.ClickException(f"cannot read {bundle}: {exc.strerror}") from None
    click.echo(f"imported {done['models']} new model(s), {done['versions']} version(s) and {done['artifacts']} "
               f"artifact(s) ({done['files']} file(s), {human_size(done['bytes'])}); {done['versions_present']} "
               "version(s) were already here", err=True)


for command in [*CLIENT_COMMANDS, *TRAINING_COMMANDS]:
    main.add_command(command)

if __name__ == "__main__":
    main()
