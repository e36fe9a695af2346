"""Federated learning coordinator: devices, rounds, validated updates and FedAvg into a new version.

What the Octomil SDK's FederatedClient and Federation need; devices authenticate with registry keys (a `device`
key can pull and submit, nothing more). Every weights file is untrusted: NumPy files are read with
allow_pickle=False here, torch files only by the sandboxed worker with weights_only=True.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import uuid
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import storage
from .aggregation import aggregate, iso, iso_now, json_or, status_of, utc_now
from .checked_jobs import CheckWording, run_check
from .convert import tensors
from .convert.sandbox import CHECK_LIMITS, Limits
from .errors import BadRequest, Conflict, Forbidden, NotFound, OctomilError
from .schemas import (
    Aggregate,
    Heartbeat,
    OpenRound,
    RegisterDevice,
    RoundMetrics,
    RoundResult,
    SubmitWeights,
    TrainingSession,
)

if TYPE_CHECKING:
    from .keys import KeyInfo
    from .registry import Registry

Row = dict[str, Any]
MAX_UPDATE_BYTES = 64 * 1024 * 1024
WEIGHTS_BODY_LIMIT = MAX_UPDATE_BYTES * 4 // 3 + 1024 * 1024  # base64 inflates by 4/3; the rest is JSON
_SIGNATURES_KEPT = 4096
BASE = "The base version"
_WEIGHT_KINDS = {"torch-zip": "torch", "numpy-npz": "npz"}
_WEIGHTS_CHECK = CheckWording(unavailable="Weights files are read in an isolated job",
                              failed="The weights could not be read", refused="The weights cannot be used")
NOT_HOSTED = ("is not implemented by octomil-lite: it needs the hosted Octomil platform (octomil-lite "
              "aggregates plain FedAvg in one process)")


def device_view(d: Row) -> dict[str, Any]:
    return {"id": d["id"], "device_identifier": d["identifier"], "status": d["status"], "platform": d["platform"],
            "os_version": d["os_version"], "sdk_version": d["sdk_version"], "app_version": d["app_version"],
            "metadata": json_or(d["metadata"], {}), "capabilities": json_or(d["capabilities"], {}),
            "registered_at": d["registered_at"], "last_seen_at": d["last_seen_at"]}


def update_view(u: Row) -> dict[str, Any]:
    return {"update_id": u["id"], "round_id": u["round_id"], "device_id": u["device_id"],
            "device_identifier": u["device_identifier"], "base_version": u["base_number"],
            "update_format": u["update_format"], "encoding": u["encoding"], "sample_count": u["sample_count"],
            "metrics": json_or(u["metrics"], {}), "size_bytes": u["size"], "hash": f"sha256:{u['digest']}",
            "status": u["status"], "submitted_at": u["submitted_at"]}


def round_view(r: Row) -> dict[str, Any]:
    config = json_or(r["config"], {})
    version = r["base_number"]
    return {"round_id": r["id"], "id": r["id"], "model_id": r["model_id"], "version": version,
            "base_version": version, "status": status_of(r), "source": r["source"],
            "participants": r["device_count"] or len(json_or(r["participants"], [])),
            "target_participants": config.get("target_participants"),
            "min_updates": config.get("min_updates"), "update_count": r["update_count"],
            "sample_count": r["sample_total"], "deadline": r["deadline"],
            "config": {**config, "model_id": r["model_id"], "version": version},
            "metrics": json_or(r["metrics"], {}), "result_version": r["result_number"],
            "participant_details": json_or(r["participants"]), "provenance": json_or(r["provenance"]),
            "created_at": r["created_at"], "closed_at": r["closed_at"]}


class Federated:
    """The coordinator of one registry: it reads models and versions through it and stores through its store."""

    def __init__(self, registry: Registry):
        self.registry = registry
        self.db = registry.db
        self.blobs = registry.blobs
        self._signatures: dict[str, tensors.Signature] = {}
        self._reading: dict[str, asyncio.Future[tensors.Signature]] = {}

    # devices

    async def register_device(self, req: RegisterDevice, key: KeyInfo) -> dict[str, Any]:
        """Idempotent per device_identifier; a device key cannot take over another key's device."""
        existing = await self.db.get_device(identifier=req.device_identifier)
        if existing and existing["key_name"] != key.name and key.scope == "device":
            raise Forbidden(f"Device '{req.device_identifier[:100]}' was registered with another key.")
        now = iso_now()
        fields = {"platform": req.platform, "os_version": req.os_version, "sdk_version": req.sdk_version,
                  "app_version": req.app_version, "metadata": json.dumps(req.metadata or {}),
                  "capabilities": json.dumps(req.capabilities or {}), "status": "active", "last_seen_at": now}
        row = await self.db.register_device(
            {"id": str(uuid.uuid4()), "identifier": req.device_identifier, "key_name": key.name,
             "registered_at": now, **fields}, fields)
        return device_view(row)

    async def _device(self, device_id: str, key: KeyInfo | None = None) -> Row:
        row = await self.db.get_device(device_id[:100])
        if row is None:
            raise NotFound(f"No device with id '{device_id[:100]}'; register it with POST /api/v1/devices/register.")
        if key is not None and key.scope == "device" and row["key_name"] != key.name:
            raise Forbidden(f"Device '{device_id[:100]}' belongs to another key.")
        return row

    async def heartbeat(self, device_id: str, req: Heartbeat, key: KeyInfo) -> dict[str, Any]:
        device = await self._device(device_id, key)
        now = iso_now()
        fields: Row = {"last_seen_at": now}
        fields.update({k: getattr(req, k) for k in ("sdk_version", "os_version", "platform") if getattr(req, k)})
        if req.metadata is not None:
            fields["metadata"] = json.dumps(req.metadata)
        await self.db.update_device(device["seq"], fields)
        return {"status": "ok", "device_id": device["id"], "server_time": now, "metadata": req.metadata or {}}

    async def assignments(self, device_id: str, key: KeyInfo) -> dict[str, Any]:
        rounds = (await self.list_rounds(device_id=device_id, status="active", key=key))["rounds"]
        return {"device_id": device_id, "assignments": rounds, "assignments_changed": bool(rounds),
                "rollouts": [], "config_version": str(len(rounds)), "updated": True}

    async def list_devices(self) -> list[dict[str, Any]]:
        return [device_view(d) for d in await self.db.list_devices()]

    # rounds

    async def open_round(self, req: OpenRound) -> dict[str, Any]:
        if req.source == "flower" and req.version is None:
            # Flower aggregates parameters the registry may never have seen: such a round has no base
            model, version = await self.registry.model_row(req.model_id), None
        else:
            model, version = await self.registry.version_rows(req.model_id, req.version)
        config = dict(req.config or {})
        if config.get("secure_aggregation"):
            raise NotImplementedByLite(f"Secure aggregation {NOT_HOSTED}.")
        for name in ("min_updates", "target_participants"):
            if getattr(req, name) is not None:
                config[name] = getattr(req, name)
        config.setdefault("min_updates", 1)
        now = utc_now()
        deadline = iso(now + timedelta(seconds=req.deadline_seconds)) if req.deadline_seconds else None
        round_id = str(uuid.uuid4())
        await self.db.insert_round({"id": round_id, "model_seq": model["seq"],
                                    "base_version_seq": version["seq"] if version else None,
                                    "source": req.source, "status": "active", "config": json.dumps(config),
                                    "deadline": deadline, "created_at": iso(now)})
        return await self.round_status(round_id)

    async def round_row(self, round_id: str) -> Row:
        row = await self.db.get_round(round_id[:100])
        if row is None:
            raise NotFound(f"No training round with id '{round_id[:100]}'.")
        return row

    async def round_status(self, round_id: str) -> dict[str, Any]:
        return round_view(await self.round_row(round_id))

    async def list_rounds(self, model_id: str | None = None, status: str | None = None,
                          device_id: str | None = None, key: KeyInfo | None = None) -> dict[str, Any]:
        """Rounds newest first; for a device, the open ones it has not yet submitted to."""
        model_seq = (await self.registry.model_row(model_id))["seq"] if model_id else None
        rows = await self.db.list_rounds(model_seq, "active" if status in ("active", "expired") else status)
        views = [round_view(r) for r in rows]
        if status is not None:
            views = [v for v in views if v["status"] == status]
        if device_id is not None:
            device = await self._device(device_id, key)
            done = {u["round_id"] for u in await self.db.list_updates(device_seq=device["seq"])}
            views = [v for v in views if v["status"] == "active" and v["round_id"] not in done]
        return {"rounds": views, "total": len(views)}

    async def round_updates(self, round_id: str) -> dict[str, Any]:
        row = await self.round_row(round_id)
        return {"round_id": row["id"], "updates": [update_view(u) for u in await self.db.list_updates(
            round_seq=row["seq"])]}

    async def record_result(self, round_id: str, req: RoundResult) -> dict[str, Any]:
        """A round aggregated outside (Flower): link the version it produced, with its metrics."""
        row = await self.round_row(round_id)
        _, version = await self.registry.version_rows(row["model_id"], req.version)
        fields = {"status": "completed", "closed_at": iso_now(), "result_version_seq": version["seq"],
                  "metrics": json.dumps({**json_or(row["metrics"], {}), **(req.metrics or {})}),
                  "participants": json.dumps(req.participants or [])}
        if not await self.db.update_round(row["seq"], fields, only_status="active"):
            raise Conflict(f"Round '{row['id']}' is {row['status']}, not active.")
        return await self.round_status(row["id"])

    async def merge_metrics(self, round_id: str, req: RoundMetrics) -> dict[str, Any]:
        row = await self.round_row(round_id)
        await self.db.update_round(row["seq"], {"metrics": json.dumps({**json_or(row["metrics"], {}), **req.metrics})})
        return await self.round_status(row["id"])

    async def start_session(self, req: TrainingSession) -> dict[str, Any]:
        opened = await self.open_round(OpenRound(model_id=req.model_id, min_updates=req.min_updates,
                                                 config={"strategy": req.strategy, "rounds": req.rounds}))
        return {**opened, "session_id": opened["round_id"]}

    async def model_status(self, model_id: str) -> dict[str, Any]:
        rounds = (await self.list_rounds(model_id=model_id))["rounds"]
        active = [r for r in rounds if r["status"] == "active"]
        done = [r for r in rounds if r["status"] == "completed"]
        latest = done[0]["metrics"] if done else {}
        return {"model_id": (await self.registry.model_row(model_id))["id"],
                "status": "training" if active else "idle", "current_round": len(done) + bool(active),
                "completed_rounds": len(done), "active_devices": sum(r["participants"] for r in active),
                "active_rounds": [r["round_id"] for r in active], "loss": latest.get("loss"),
                "accuracy": latest.get("accuracy")}

    async def stop(self, model_id: str) -> dict[str, Any]:
        model = await self.registry.model_row(model_id)
        stopped = []
        for r in await self.db.list_rounds(model["seq"], "active"):
            if await self.db.update_round(r["seq"], {"status": "stopped", "closed_at": iso_now()},
                                          only_status="active"):
                stopped.append(r["id"])
        return {"model_id": model["id"], "stopped_rounds": stopped, "status": "stopped"}

    # weights

    async def base_signature(self, version: Row) -> tuple[tensors.Signature, str]:
        """The base version's tensors (cached by content), and its encoding."""
        encoding = _WEIGHT_KINDS.get(version["kind"])
        if encoding is None:
            raise BadRequest(f"Version {version['number']} is {version['kind']}, not a weights file; federated "
                             "rounds need a base that is a torch.save(state_dict) or an .npz of arrays.")
        async with self.blobs.local_copy(version["digest"]) as path:
            return await self._inspect(path, encoding, BASE, version["digest"]), encoding

    async def _inspect(self, path: Path, encoding: str, what: str, digest: str) -> tensors.Signature:
        """The tensors of a weights file, remembered by content (a base is read once; a retried update too, even
        while the first attempt is still being read)."""
        if digest in self._signatures:
            return self._signatures[digest]
        reading = self._reading.get(digest)
        if reading is None:
            reading = self._reading[digest] = asyncio.ensure_future(self._read_signature(path, encoding, what))
            reading.add_done_callback(lambda _: self._reading.pop(digest, None))
        signature = await asyncio.shield(reading)
        if len(self._signatures) >= _SIGNATURES_KEPT:
            self._signatures.clear()
        self._signatures[digest] = signature
        return signature

    async def _read_signature(self, path: Path, encoding: str, what: str) -> tensors.Signature:
        if encoding == "torch":
            result = await self.sandboxed("inspect-weights", {"input": "weights", "encoding": encoding}, CHECK_LIMITS,
                                          {"weights": path})
            if result["nonfinite"]:
                raise BadRequest(f"{what} has NaN or infinite values in {result['nonfinite'][:5]}.")
            return {k: (list(s), d) for k, (s, d) in result["signature"].items()}

        def read() -> tensors.Signature:
            arrays = tensors.load_arrays(path, encoding)
            bad = tensors.nonfinite(arrays)
            if bad:
                raise tensors.WeightsError(f"NaN or infinite values in {bad[:5]}")
            return {k: (list(a.shape), a.dtype.name) for k, a in arrays.items()}

        try:
            headers = await asyncio.to_thread(tensors.npy_signature if encoding == "npy" else tensors.npz_signature,
                                              path)
            # a base may be large and came from a write key: headers suffice; a bounded update is read whole for NaNs
            return headers if what == BASE else await asyncio.to_thread(read)
        except tensors.WeightsError as exc:
            raise BadRequest(f"{what} cannot be used: {exc}.") from None

    async def sandboxed(self, task: str, payload: Row, limits: Limits, inputs: dict[str, Path],
                        output: Path | None = None) -> Row:
        """Run a weights task as an isolated job on INPUTS (bound read-only), its file result written to OUTPUT."""
        return await run_check(self.registry.sandbox, task, payload, limits, inputs, output, _WEIGHTS_CHECK)

    async def submit(self, req: SubmitWeights, key: KeyInfo) -> dict[str, Any]:
        """Validate one device's update against its base version and store it (content-addressed)."""
        device = await self._device(req.device_id, key)
        round_row = await self.round_row(req.round_id) if req.round_id else None
        if round_row is not None:
            if round_row["source"] == "flower":
                raise BadRequest(f"Round '{round_row['id']}' records a Flower run; Flower aggregates its updates.")
            if status_of(round_row) != "active":
                raise Conflict(f"Round '{round_row['id']}' is {status_of(round_row)}; it takes no more updates.")
            base_ref = req.version if req.version is not None else round_row["base_number"]
            model, version = await self.registry.version_rows(round_row["model_id"], base_ref)
            if version["seq"] != round_row["base_version_seq"] or req.model_id not in (model["id"], model["name"]):
                raise BadRequest(f"Round '{round_row['id']}' trains model {model['id']} version "
                                 f"{round_row['base_number']}; the update names another model or version.")
        else:
            model, version = await self.registry.version_rows(req.model_id, req.version)
        if req.sample_count < 1:
            raise BadRequest("Field 'sample_count' must be at least 1: FedAvg weights each update by it.")
        if len(req.weights_data) > WEIGHTS_BODY_LIMIT:
            raise BadRequest(f"Field 'weights_data' is larger than {MAX_UPDATE_BYTES} bytes once decoded.")
        try:
            raw = base64.b64decode(req.weights_data, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest("Field 'weights_data' is not valid base64.") from None
        if len(raw) > MAX_UPDATE_BYTES:
            raise BadRequest(f"The update is {len(raw)} bytes; updates are limited to {MAX_UPDATE_BYTES} bytes.")
        base_signature, _ = await self.base_signature(version)
        staged = self.blobs.stage()
        try:
            await staged.write(raw)
            await staged.finish()
            del raw
            async with staged.local_path() as path:
                encoding = await asyncio.to_thread(tensors.encoding_of, path)
                if encoding is None:
                    raise BadRequest("Field 'weights_data' is not np.save, np.savez or torch.save(state_dict) bytes.")
                try:
                    signature = await self._inspect(path, encoding, "The update", staged.digest)
                except tensors.WeightsError as exc:
                    raise BadRequest(f"The update cannot be used: {exc}.") from None
            if reason := tensors.fit_to_base(signature, base_signature):
                raise BadRequest(f"The update does not fit version {version['number']}: {reason}.")
            update_id = str(uuid.uuid4())
            row = {"id": update_id, "model_seq": model["seq"], "base_version_seq": version["seq"],
                   "round_seq": round_row["seq"] if round_row else None, "device_seq": device["seq"],
                   "update_format": req.update_format, "encoding": encoding, "digest": staged.digest,
                   "size": staged.size, "sample_count": req.sample_count, "metrics": json.dumps(req.metrics or {}),
                   "status": "accepted", "submitted_at": iso_now()}

            async def publish(record: storage.Recorder) -> None:
                await self.blobs.commit(staged, record)

            row = await self.db.insert_update(row, publish)
        finally:
            await staged.discard()
        await self.db.update_device(device["seq"], {"last_seen_at": iso_now()})
        return {"update_id": row["id"], "status": row["status"], "model_id": model["id"], "version": version["number"],
                "round_id": round_row["id"] if round_row else None, "sample_count": req.sample_count,
                "encoding": encoding, "hash": f"sha256:{row['digest']}"}

    async def aggregate(self, req: Aggregate) -> dict[str, Any]:
        """FedAvg the accepted updates on a base version into the model's next version (see aggregation.py)."""
        return await aggregate(self, req)


class NotImplementedByLite(OctomilError):
    status = 501
    code = "not_implemented"
