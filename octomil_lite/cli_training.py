"""`octomil-lite rounds|updates`: federated-learning rounds and the updates devices sent, through the client."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from .cli_client import _connection, _print_json, _short, _size, _table, _text, json_option

if TYPE_CHECKING:
    from .client import Client


def _metrics(metrics: dict[str, Any]) -> str:
    return _short(" ".join(f"{k}={_text(v)}" for k, v in sorted(metrics.items())), 60)


@click.command()
@click.argument("model_id", required=False)
@click.option("--status", type=click.Choice(["active", "expired", "completed", "stopped"]), default=None)
@json_option
@_connection
def rounds(client: Client, model_id: str | None, status: str | None, as_json: bool) -> None:
    """List training rounds (of MODEL_ID, or all), newest first: base and result versions, participants, metrics."""
    found = client.list_rounds(model_id, status)
    if as_json:
        _print_json(found)
        return
    if not found:
        click.echo("No training rounds.")
        return
    _table(["ROUND", "STATUS", "SOURCE", "BASE", "RESULT", "DEVICES", "SAMPLES", "CREATED", "METRICS"],
           [[r["round_id"], r["status"], r["source"], _text(r["base_version"]), _text(r["result_version"]),
             str(r["participants"]), str(r["sample_count"] or _text(r["metrics"].get("num_examples"))),
             r["created_at"], _metrics(r["metrics"])] for r in found])


@click.command()
@click.argument("round_id")
@json_option
@_connection
def updates(client: Client, round_id: str, as_json: bool) -> None:
    """List the updates devices submitted to ROUND_ID, with their sample counts and metrics."""
    found = client.round_updates(round_id)
    if as_json:
        _print_json(found)
        return
    if not found:
        click.echo("No updates in this round.")
        return
    _table(["UPDATE", "DEVICE", "KIND", "SAMPLES", "SIZE", "STATUS", "SUBMITTED", "METRICS"],
           [[u["update_id"], u["device_identifier"], f"{u['update_format']}/{u['encoding']}", str(u["sample_count"]),
             _size(u["size_bytes"]), u["status"], u["submitted_at"], _metrics(u["metrics"])] for u in found])


TRAINING_COMMANDS: list[click.Command] = [rounds, updates]
