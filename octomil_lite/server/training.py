"""HTTP only, federated learning: devices, rounds, weight updates, aggregation (the Octomil SDK's paths)."""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

import msgspec
from litestar import Controller, Request, get, patch, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, QueryParameter

from ..errors import BadRequest
from ..federated import NOT_HOSTED, WEIGHTS_BODY_LIMIT, NotImplementedByLite
from ..keys import KeyInfo
from ..registry import Registry
from ..schemas import (
    Aggregate,
    Heartbeat,
    OpenRound,
    RegisterDevice,
    RoundMetrics,
    RoundResult,
    SubmitWeights,
    TrainingSession,
)
from .controllers import _decode, _errors

T = TypeVar("T")
Json = dict[str, Any]
Req = Request[Any, Any, Any]
Status = Annotated[str | None, QueryParameter(max_length=20)]
Ref = Annotated[str | None, QueryParameter(max_length=200)]


def _integral(value: Any) -> Any:
    """JSON numbers as JSON Schema reads them: 3.0 is the integer 3 (a float field takes either)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


def _strict(body: bytes, schema: type[T]) -> T:
    """Strict decoding (a wrong type is a 400 naming the field), integral floats taken as integers."""
    try:
        raw = msgspec.json.decode(body) if body.strip() else None
    except msgspec.DecodeError:
        raise BadRequest("The request body must be a JSON object.") from None
    return _decode(msgspec.json.encode(_integral(raw)), schema)


def _key(request: Req) -> KeyInfo:
    return request.scope["octomil_lite.key"]  # type: ignore[typeddict-item,no-any-return]  # set by the auth check


class DeviceController(Controller):
    path = "/api/v1/devices"

    @post("/register", opt={"scope": "device"}, status_code=200, responses=_errors())
    async def register(self, request: Req, registry: NamedDependency[Registry],
                       data: JSONBody[RegisterDevice]) -> Json:
        """Idempotent per device_identifier: the same identifier always gets the same id."""
        return await registry.training.register_device(_strict(await request.body(), RegisterDevice), _key(request))

    @post("/{device_id:str}/heartbeat", opt={"scope": "device"}, status_code=200, responses=_errors())
    async def heartbeat(self, device_id: FromPath[str], request: Req, registry: NamedDependency[Registry],
                        data: JSONBody[Heartbeat | None] = None) -> Json:
        return await registry.training.heartbeat(device_id, _strict(await request.body(), Heartbeat), _key(request))

    @get("/{device_id:str}/assignments", opt={"scope": "device"}, responses=_errors())
    async def assignments(self, device_id: FromPath[str], request: Req, registry: NamedDependency[Registry]) -> Json:
        return await registry.training.assignments(device_id, _key(request))

    @get("/", opt={"scope": "read"}, responses=_errors())
    async def list_devices(self, registry: NamedDependency[Registry]) -> Json:
        return {"devices": await registry.training.list_devices()}


class TrainingController(Controller):
    path = "/api/v1/training"

    @post("/rounds", opt={"scope": "write"}, status_code=201, responses=_errors(501))
    async def open_round(self, request: Req, registry: NamedDependency[Registry],
                         data: JSONBody[OpenRound]) -> Json:
        return await registry.training.open_round(_strict(await request.body(), OpenRound))

    @get("/rounds", opt={"scope": "read"}, responses=_errors())
    async def list_rounds(self, request: Req, registry: NamedDependency[Registry], model_id: Ref = None,
                          status: Status = None, device_id: Ref = None) -> Json:
        key = _key(request) if device_id else None
        return await registry.training.list_rounds(model_id, status, device_id, key)

    @get("/rounds/{round_id:str}/status", opt={"scope": "read"}, responses=_errors())
    async def round_status(self, round_id: FromPath[str], registry: NamedDependency[Registry]) -> Json:
        return await registry.training.round_status(round_id)

    @get("/rounds/{round_id:str}/updates", opt={"scope": "read"}, responses=_errors())
    async def round_updates(self, round_id: FromPath[str], registry: NamedDependency[Registry]) -> Json:
        return await registry.training.round_updates(round_id)

    @post("/rounds/{round_id:str}/result", opt={"scope": "write"}, status_code=200, responses=_errors(409))
    async def round_result(self, round_id: FromPath[str], request: Req, registry: NamedDependency[Registry],
                           data: JSONBody[RoundResult]) -> Json:
        return await registry.training.record_result(round_id, _strict(await request.body(), RoundResult))

    @patch("/rounds/{round_id:str}", opt={"scope": "write"}, responses=_errors())
    async def round_metrics(self, round_id: FromPath[str], request: Req, registry: NamedDependency[Registry],
                            data: JSONBody[RoundMetrics]) -> Json:
        return await registry.training.merge_metrics(round_id, _strict(await request.body(), RoundMetrics))

    @post("/weights", opt={"scope": "device"}, status_code=200, request_max_body_size=WEIGHTS_BODY_LIMIT,
          responses=_errors(409, 413))
    async def submit_weights(self, request: Req, registry: NamedDependency[Registry],
                             data: JSONBody[SubmitWeights]) -> Json:
        return await registry.training.submit(_strict(await request.body(), SubmitWeights), _key(request))

    @post("/aggregate", opt={"scope": "write"}, status_code=200, responses=_errors(409))
    async def aggregate(self, request: Req, registry: NamedDependency[Registry],
                        data: JSONBody[Aggregate]) -> Json:
        return await registry.training.aggregate(_strict(await request.body(), Aggregate))

    @post("/sessions", opt={"scope": "write"}, status_code=201, responses=_errors())
    async def start_session(self, request: Req, registry: NamedDependency[Registry],
                            data: JSONBody[TrainingSession]) -> Json:
        return await registry.training.start_session(_strict(await request.body(), TrainingSession))

    @get("/{model_id:str}/status", opt={"scope": "read"}, responses=_errors())
    async def model_status(self, model_id: FromPath[str], registry: NamedDependency[Registry]) -> Json:
        return await registry.training.model_status(model_id)

    @post("/{model_id:str}/stop", opt={"scope": "write"}, status_code=200, responses=_errors())
    async def stop(self, model_id: FromPath[str], registry: NamedDependency[Registry]) -> Json:
        return await registry.training.stop(model_id)

    @get("/rounds/{round_id:str}/secagg/session", opt={"scope": "device"}, responses=_errors(501))
    async def secagg(self, round_id: FromPath[str]) -> Json:
        raise NotImplementedByLite(f"Secure aggregation {NOT_HOSTED}.")

    @get("/personalized/{device_id:str}", opt={"scope": "device"}, responses=_errors(501))
    async def personalized(self, device_id: FromPath[str]) -> Json:
        raise NotImplementedByLite(f"Personalisation {NOT_HOSTED}.")

    @post("/personalized/{device_id:str}", opt={"scope": "device"}, status_code=200, responses=_errors(501))
    async def personalized_update(self, device_id: FromPath[str]) -> Json:
        raise NotImplementedByLite(f"Personalisation {NOT_HOSTED}.")
