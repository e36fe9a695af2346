"""FedAvg of a round's updates into the model's next version, with the round, participants and provenance."""

from __future__ import annotations

import contextlib
import json
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from . import storage
from .convert.routes import NO_GRAPH
from .convert.sandbox import Limits
from .errors import Conflict, NotFound
from .schemas import Aggregate

if TYPE_CHECKING:
    from .federated import Federated

Row = dict[str, Any]
EXTENSIONS = {"torch": ".pt", "npz": ".npz"}


def utc_now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def iso(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def iso_now() -> str:
    return iso(utc_now())


def json_or(text: str | None, default: Any = None) -> Any:
    return json.loads(text) if text else default


def weighted_metrics(rows: list[Row]) -> dict[str, float]:
    """Each metric's mean over the updates that report it, weighted by their sample counts."""
    sums: dict[str, list[float]] = {}
    for row in rows:
        for name, value in json_or(row["metrics"], {}).items():
            acc = sums.setdefault(name, [0.0, 0.0])
            acc[0] += value * row["sample_count"]
            acc[1] += row["sample_count"]
    return {name: total / weight for name, (total, weight) in sums.items() if weight > 0}


def status_of(r: Row) -> str:
    if r["status"] == "active" and r["deadline"] and r["deadline"] < iso_now():
        return "expired"
    return str(r["status"])


def _select(updates: list[Row], round_row: Row | None) -> tuple[list[Row], int | None]:
    """The updates to aggregate and the round they complete (None: a new round is recorded for them)."""
    if round_row is not None:
        return [u for u in updates if u["round_seq"] == round_row["seq"]], round_row["seq"]
    rounds = {u["round_seq"] for u in updates}
    return updates, (rounds.pop() if len(rounds) == 1 else None)


async def aggregate(fed: Federated, req: Aggregate) -> dict[str, Any]:
    round_row = await fed.round_row(req.round_id) if req.round_id else None
    if round_row is not None:
        if status_of(round_row) not in ("active", "expired"):
            raise Conflict(f"Round '{round_row['id']}' is {round_row['status']}; it was aggregated or stopped.")
        model, base = await fed.registry.version_rows(round_row["model_id"], round_row["base_number"])
    else:
        model, base = await fed.registry.version_rows(req.model_id, req.base_version)
    _, encoding = await fed.base_signature(base)
    pending = await fed.db.list_updates(base_version_seq=base["seq"], status="accepted")
    chosen, round_seq = _select(pending, round_row)
    if round_seq is not None and round_row is None:
        round_row = await fed.db.get_round(chosen[0]["round_id"])
    needed = max(req.min_updates, int(json.loads(round_row["config"]).get("min_updates", 1)) if round_row else 1)
    if len(chosen) < needed:
        raise Conflict(f"Version {base['number']} of model {model['id']} has {len(chosen)} accepted update(s) "
                       f"waiting; aggregation needs at least {needed}.")
    if req.new_version is not None and await fed.db.get_version(model["seq"], label=req.new_version):
        raise Conflict(f"Model '{model['id']}' already has a version labelled '{req.new_version}'.")
    out = fed.blobs.tmp / f"fedavg-{uuid.uuid4().hex}{EXTENSIONS[encoding]}"
    limits = Limits(timeout=fed.registry.config.conversion_timeout,
                    memory_bytes=fed.registry.config.conversion_memory_bytes)
    try:
        async with contextlib.AsyncExitStack() as stack:
            base_path = await stack.enter_async_context(fed.blobs.local_copy(base["digest"]))
            update_paths = [await stack.enter_async_context(fed.blobs.local_copy(u["digest"])) for u in chosen]
            inputs = {"base": base_path, **{f"updates/{i}": path for i, path in enumerate(update_paths)}}
            await fed.sandboxed("aggregate-weights", {
                "base": {"input": "base", "encoding": encoding},
                "updates": [{"input": f"updates/{i}", "encoding": u["encoding"], "weight": u["sample_count"],
                             "delta": u["update_format"] == "delta"} for i, u in enumerate(chosen)]},
                limits, inputs, out)
        staged = await fed.blobs.stage_file(out)
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    metrics = weighted_metrics(chosen)
    round_id = round_row["id"] if round_row else str(uuid.uuid4())
    participants = [{"device_id": u["device_id"], "device_identifier": u["device_identifier"],
                     "update_id": u["id"], "sample_count": u["sample_count"], "metrics": json.loads(u["metrics"])}
                    for u in chosen]
    samples = sum(u["sample_count"] for u in chosen)
    now = iso_now()
    provenance = {"strategy": "fedavg", "weighting": "sample_count", "base_version": base["number"],
                  "base_hash": f"sha256:{base['digest']}", "aggregated_at": now,
                  "updates": [{"update_id": u["id"], "hash": f"sha256:{u['digest']}", "encoding": u["encoding"],
                               "update_format": u["update_format"], "sample_count": u["sample_count"]}
                              for u in chosen]}
    kind = {"torch": "torch-zip", "npz": "numpy-npz"}[encoding]
    version = {"label": req.new_version, "format": base["format"], "kind": kind, "digest": staged.digest,
               "size": staged.size, "round_id": round_id, "accuracy": metrics.get("accuracy"),
               "loss": metrics.get("loss"), "uploaded_at": now, "input_shape": base["input_shape"],
               "description": f"FedAvg of {len(chosen)} updates ({samples} samples) on version {base['number']}, "
                              f"round {round_id}"}
    artifacts = []
    if encoding == "npz":
        artifacts.append({"format": "onnx", "status": "impossible", "reason": NO_GRAPH, "updated_at": now})
    new_round = None if round_seq is not None else {
        "id": round_id, "model_seq": model["seq"], "base_version_seq": base["seq"], "source": "octomil",
        "config": json.dumps({"min_updates": req.min_updates}), "created_at": now}
    fields = {"status": "completed", "closed_at": now, "metrics": json.dumps(metrics),
              "participants": json.dumps(participants), "provenance": json.dumps(provenance)}

    async def publish(record: storage.Recorder) -> None:
        await fed.blobs.commit(staged, record)

    try:
        number = await fed.db.insert_aggregate(model["seq"], version, artifacts, publish, new_round, round_seq, fields,
                                               [u["seq"] for u in chosen])
    except storage.Conflict:
        raise Conflict(f"Model '{model['id']}' already has a version labelled '{req.new_version}'.") from None
    finally:
        await staged.discard()
    if number is None:
        raise NotFound(f"Model '{model['id']}' was deleted during the aggregation.")
    return {"model_id": model["id"], "base_version": base["number"], "new_version": req.new_version or str(number),
            "version": number, "round_id": round_id, "status": "completed", "strategy": "fedavg",
            "update_count": len(chosen), "sample_count": samples, "participants": participants, "metrics": metrics,
            "model_hash": f"sha256:{staged.digest}", "format": base["format"], "provenance": provenance}
