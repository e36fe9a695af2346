"""HTTP for federations (minimal), inference and telemetry events, and the /api/v1/health alias."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, HttpMethod, Request, Response, get, post, route
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, JSONBody, QueryParameter

from .. import usage
from ..errors import NotImplementedHere
from ..federations import HOSTED_ONLY
from ..registry import Registry, utc_now
from ..schemas import AttachModel, CreateFederation, EventsAccepted, Federation, Health, Model
from .controllers import _decode, _errors, health


class FederationController(Controller):
    path = "/api/v1/federations"

    @get("/", opt={"scope": "read"}, responses=_errors())
    async def list_federations(
        self, registry: NamedDependency[Registry],
        name: Annotated[str | None, QueryParameter(max_length=200)] = None,
        org_id: Annotated[str | None, QueryParameter(max_length=200)] = None,
    ) -> list[Federation]:
        return await registry.federations.list(name)

    @post("/", opt={"scope": "write"}, status_code=201,
          responses={**_errors(), 200: ResponseSpec(Federation, description="A federation of that name existed")})
    async def create_federation(self, request: Request[Any, Any, Any], registry: NamedDependency[Registry],
                                data: JSONBody[CreateFederation]) -> Response[Federation]:
        federation, created = await registry.federations.create(_decode(await request.body(), CreateFederation))
        return Response(federation, status_code=201 if created else 200)

    @get("/{federation_id:str}", opt={"scope": "read"}, responses=_errors())
    async def get_federation(self, federation_id: FromPath[str], registry: NamedDependency[Registry]) -> Federation:
        return await registry.federations.get(federation_id)

    @get("/{federation_id:str}/models", opt={"scope": "read"}, responses=_errors())
    async def list_models(self, federation_id: FromPath[str], registry: NamedDependency[Registry]) -> list[Model]:
        return [registry.model_of(row) for row in await registry.federations.models(federation_id)]

    @post("/{federation_id:str}/models", opt={"scope": "write"}, status_code=201,
          responses={**_errors(), 200: ResponseSpec(Model, description="The model was already in the federation")})
    async def attach_model(self, federation_id: FromPath[str], request: Request[Any, Any, Any],
                           registry: NamedDependency[Registry],
                           data: JSONBody[AttachModel]) -> Response[Model]:
        req = _decode(await request.body(), AttachModel)
        model = await registry.model_row(req.model_id)
        added = await registry.federations.attach(federation_id, model)
        return Response(registry.model_of(model), status_code=201 if added else 200)

    @route("/{federation_id:str}/{rest:path}", http_method=[HttpMethod.GET, HttpMethod.POST, HttpMethod.PUT,
                                                             HttpMethod.DELETE],
           opt={"scope": "read"}, responses=_errors(501), include_in_schema=False)
    async def hosted_only(self, federation_id: FromPath[str], rest: FromPath[str],
                          registry: NamedDependency[Registry]) -> None:
        """Invitations, joining, members, analytics, privacy budgets: the hosted platform's, not a registry's."""
        await registry.federations.row(federation_id)
        what = rest.strip("/").split("/")[0] or "This"
        raise NotImplementedHere(HOSTED_ONLY.format(what=f"'{what[:50]}'"))


@post("/api/v1/inference/events", opt={"scope": "read"}, status_code=202, responses=_errors())
async def inference_events(registry: NamedDependency[Registry],
                           data: JSONBody[Any] = None) -> EventsAccepted:
    """FederatedClient.inference reports each generation here; counted per model and event type."""
    events = usage.inference_event(data)
    return EventsAccepted(accepted=len(events) or 1, counted=await usage.count_events(registry, utc_now(), events))


@post("/api/v2/telemetry/events", opt={"scope": "read"}, status_code=202, responses=_errors())
async def telemetry_events(registry: NamedDependency[Registry], data: JSONBody[Any] = None) -> EventsAccepted:
    """The Octomil SDK's OTLP log envelope; records naming a model (model.id) are counted by event name."""
    seen, events = usage.telemetry_events(data)
    return EventsAccepted(accepted=seen, counted=await usage.count_events(registry, utc_now(), events))


@get("/api/v1/health", opt={"scope": "read"}, sync_to_thread=False, responses=_errors())
def api_health(request: Request[Any, Any, Any]) -> Health:
    """octomil.init() checks its key here: /health, behind the key."""
    return health.fn(request)  # type: ignore[no-any-return]


route_handlers = [FederationController, inference_events, telemetry_events, api_health]
