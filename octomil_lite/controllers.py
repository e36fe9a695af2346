"""HTTP only: parse requests, call the Registry, shape responses."""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

import msgspec
from litestar import Controller, HttpMethod, Request, delete, get, patch, post, route
from litestar.di import NamedDependency
from litestar.exceptions import InternalServerException
from litestar.params import FromPath, FromQuery, QueryParameter

from . import __version__
from .errors import BadRequest, PayloadTooLarge
from .registry import Registry
from .responses import BlobResponse, blob_response
from .schemas import CreateModel, Health, Model, ModelDetail, ModelList, UpdateModel, UploadedVersion, VersionDetail
from .uploads import FORM_OVERHEAD, boundary_of, receive_upload, upload_form

T = TypeVar("T")


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


def _decode(body: bytes, schema: type[T]) -> T:
    """Strict JSON decoding: a wrong type is a 400 naming the field, never a silent coercion."""
    try:
        return msgspec.json.decode(body or b"{}", type=schema, strict=True)
    except msgspec.ValidationError as exc:
        problem, _, where = str(exc).partition(" - at `$.")
        if not where:
            raise BadRequest(f"The request body must be a JSON object ({problem}).") from None
        raise BadRequest(f"Invalid field '{where.rstrip('`')}': {problem}.") from None
    except msgspec.DecodeError:
        raise BadRequest("The request body must be a JSON object.") from None


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
        return await registry.create_model(_decode(await request.body(), CreateModel))

    @patch("/{model_id:str}", opt={"scope": "write"})
    async def update_model(self, model_id: FromPath[str], request: Request[Any, Any, Any],
                           registry: NamedDependency[Registry]) -> Model:
        return await registry.update_model(model_id, _decode(await request.body(), UpdateModel))

    @delete("/{model_id:str}", opt={"scope": "write"}, status_code=204)
    async def delete_model(self, model_id: FromPath[str], registry: NamedDependency[Registry]) -> None:
        await registry.delete_model(model_id)

    @get("/{model_id:str}/versions/{version:str}", opt={"scope": "read"})
    async def get_version(self, model_id: FromPath[str], version: FromPath[str],
                          registry: NamedDependency[Registry]) -> VersionDetail:
        return await registry.get_version(model_id, version)

    @delete("/{model_id:str}/versions/{version:str}", opt={"scope": "write"}, status_code=204)
    async def delete_version(self, model_id: FromPath[str], version: FromPath[str],
                             registry: NamedDependency[Registry]) -> None:
        await registry.delete_version(model_id, version)

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
        try:
            return await registry.upload_version(model_id, parsed.staged, parsed.filename, upload_form(parsed.fields))
        finally:
            await parsed.staged.discard()

    @route("/{model_id:str}/versions/{version:str}/download", http_method=[HttpMethod.GET, HttpMethod.HEAD],
           opt={"scope": "read"})
    async def download(self, model_id: FromPath[str], version: FromPath[str], request: Request[Any, Any, Any],
                       registry: NamedDependency[Registry], format: FromQuery[str | None] = None) -> BlobResponse:
        artifact = await registry.find_artifact(model_id, version, format)
        fd = registry.open_artifact(artifact)
        return blob_response(fd, artifact.size, artifact.digest, artifact.filename, request.method, request.headers)
