"""HTTP only: parse requests, call the Registry, shape responses."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Request, get, post
from litestar.exceptions import InternalServerException
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery, QueryParameter

from . import __version__
from .errors import BadRequest, PayloadTooLarge
from .registry import Registry
from .responses import BlobResponse
from .schemas import CreateModel, Health, ModelDetail, ModelList, Model, UploadedVersion, UploadForm
from .uploads import FORM_OVERHEAD, boundary_of, receive_upload


@get("/health", opt={"public": True}, sync_to_thread=False)
def health(request: Request[Any, Any, Any]) -> Health:
    return Health(status="ok", version=__version__, conversions=request.app.state.conversions)


async def _chunks(request: Request[Any, Any, Any]) -> Any:
    # Litestar signals a client that went away as a 500; it is the client's doing, so a 400.
    try:
        async for chunk in request.stream():
            yield chunk
    except InternalServerException:
        raise BadRequest("The client disconnected before the upload finished.") from None


def _body_error(exc: msgspec.ValidationError) -> BadRequest:
    problem, _, where = str(exc).partition(" - at `$.")
    if not where:
        return BadRequest(f"The request body must be a JSON object ({problem}).")
    return BadRequest(f"Invalid field '{where.rstrip('`')}': {problem}.")


class ModelController(Controller):
    path = "/api/v1/models"

    @get("/", opt={"scope": "read"})
    async def list_models(
        self,
        registry: NamedDependency[Registry],
        limit: Annotated[int, QueryParameter(ge=1, le=100)] = 20,
        offset: Annotated[int, QueryParameter(ge=0, le=2**62)] = 0,
        framework: FromQuery[Literal["pytorch", "tensorflow", "xgboost", "sklearn"] | None] = None,
        is_baseline: FromQuery[bool | None] = None,
    ) -> ModelList:
        return await registry.list_models(limit, offset, framework, is_baseline)

    @post("/", opt={"scope": "write"}, status_code=201)
    async def create_model(self, request: Request[Any, Any, Any], registry: NamedDependency[Registry]) -> Model:
        body = await request.body()
        try:
            req = msgspec.json.decode(body or b"{}", type=CreateModel, strict=True)
        except msgspec.ValidationError as exc:
            raise _body_error(exc) from None
        except msgspec.DecodeError:
            raise BadRequest("The request body must be a JSON object.") from None
        return await registry.create_model(req)

    @get("/{model_id:str}", opt={"scope": "read"})
    async def get_model(self, model_id: FromPath[str], registry: NamedDependency[Registry]) -> ModelDetail:
        return await registry.get_model(model_id)

    @post("/{model_id:str}/versions/upload", opt={"scope": "write"}, status_code=201, request_max_body_size=None)
    async def upload_version(self, model_id: FromPath[str], request: Request[Any, Any, Any], registry: NamedDependency[Registry]) -> UploadedVersion:
        await registry.require_model(model_id)
        boundary = boundary_of(request.headers.get("content-type", ""))
        limit = registry.config.max_upload_size
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit + FORM_OVERHEAD:
            raise PayloadTooLarge(f"The upload is larger than this registry's limit of {limit} bytes "
                                  "(octomil-lite serve --max-upload-size).")
        parsed = await receive_upload(_chunks(request), boundary, limit, registry.stage_upload)
        assert parsed.staged is not None
        fields = parsed.fields
        form = UploadForm(format=fields.get("format") or None, description=fields.get("description"))
        try:
            return await registry.upload_version(model_id, parsed.staged, parsed.filename, form)
        finally:
            await parsed.staged.discard()

    @get("/{model_id:str}/versions/{version:str}/download", opt={"scope": "read"})
    async def download(self, model_id: FromPath[str], version: FromPath[str], registry: NamedDependency[Registry],
                       format: FromQuery[str | None] = None) -> BlobResponse:
        artifact = await registry.find_artifact(model_id, version, format)
        fd = registry.open_artifact(artifact)
        return BlobResponse(fd, artifact.size, {
            "content-type": "application/octet-stream",
            "content-disposition": f'attachment; filename="{artifact.filename}"',
            "x-model-hash": artifact.hash,
        })
