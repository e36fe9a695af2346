"""HTTP only: parse requests, call the Registry, shape responses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import msgspec
from litestar import Controller, HttpMethod, Request, Response, delete, get, patch, post, route
from litestar.di import NamedDependency
from litestar.exceptions import InternalServerException
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import (
    OpenAPIFormat,
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    RequestBody,
    Schema,
)
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter

from .. import __version__
from ..auth import ASGI_SCOPE_KEY
from ..errors import BadRequest
from ..registry import Registry
from ..schemas import (
    UPLOAD_FORMATS,
    CreateModel,
    DownloadFormat,
    ErrorBody,
    Framework,
    Health,
    Model,
    ModelDetail,
    ModelList,
    SignedUrl,
    UpdateModel,
    UploadedVersion,
    VersionDetail,
)
from .responses import BlobResponse, blob_response
from .uploads import FORM_OVERHEAD, boundary_of, receive_upload, too_large, upload_form

T = TypeVar("T")


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
        return msgspec.json.decode(body if body.strip() not in (b"", b"null") else b"{}", type=schema, strict=True)
    except msgspec.ValidationError as exc:
        problem, _, where = str(exc).partition(" - at `$.")
        if not where:
            raise BadRequest(f"The request body must be a JSON object ({problem}).") from None
        raise BadRequest(f"Invalid field '{where.rstrip('`')}': {problem}.") from None
    except msgspec.DecodeError:
        raise BadRequest("The request body must be a JSON object.") from None


def _errors(*extra: int) -> dict[int, ResponseSpec]:
    """The JSON error responses an /api/v1 operation can give, for the OpenAPI document."""
    statuses = sorted({400, 401, 403, 404, 429, 500, *extra})
    return {status: ResponseSpec(ErrorBody, description=_ERROR_TEXT[status], generate_examples=False)
            for status in statuses}


_ERROR_TEXT = {400: "Bad request: a field, parameter or file is invalid", 401: "Missing or invalid API key",
               403: "The key's scope does not allow this", 404: "No such model, version or format (yet)",
               409: "Conflict: a name or version label already exists", 413: "The upload is too large",
               416: "The requested byte range is outside the file", 429: "Too many requests; see Retry-After",
               500: "Unexpected server error", 507: "The registry's disk is full"}

_NO_NUL = r"^[^\u0000]*$"
_UPLOAD_FORM = Schema(type=OpenAPIType.OBJECT, required=["file"], properties={
    "file": Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY, description="The model file"),
    "format": Schema(type=OpenAPIType.STRING, enum=list(UPLOAD_FORMATS),
                     description="Source format; inferred from the bytes when absent"),
    "description": Schema(type=OpenAPIType.STRING, max_length=1000, pattern=_NO_NUL),
    "version": Schema(type=OpenAPIType.STRING, max_length=100, description="A label such as 1.0.0",
                      pattern=r"^(?!\s*latest\s*$)(?!\s*[0-9]+\s*$)[^/\u0000]*$"),
    "formats": Schema(type=OpenAPIType.STRING, description="Conversions wanted now, e.g. onnx,coreml,tflite",
                      pattern=_NO_NUL),
    "round_id": Schema(type=OpenAPIType.STRING, max_length=200, pattern=_NO_NUL),
    "accuracy": Schema(type=OpenAPIType.NUMBER),
    "loss": Schema(type=OpenAPIType.NUMBER),
    "input_shape": Schema(type=OpenAPIType.STRING, description="Example input shape, e.g. 1,3,32,32",
                          pattern=r"^[1-9][0-9]{0,5}(,[1-9][0-9]{0,5}){0,7}$"),
    "onnx_data": Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY,
                        description="External weights of an ONNX model; folded into it"),
})


@dataclass
class UploadOperation(Operation):
    """The upload is parsed as it streams, so its multipart body is documented by hand."""

    def __post_init__(self) -> None:
        self.request_body = RequestBody(required=True, content={
            "multipart/form-data": OpenAPIMediaType(schema=_UPLOAD_FORM)})


@dataclass
class DownloadOperation(Operation):
    """Downloads answer with the model's bytes, not JSON."""

    def __post_init__(self) -> None:
        binary = {"application/octet-stream": OpenAPIMediaType(
            schema=Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY))}
        assert self.responses is not None
        self.responses["200"] = OpenAPIResponse(description="The model file", content=binary)
        self.responses["206"] = OpenAPIResponse(description="Part of the model file (Range)", content=binary)
        self.responses["304"] = OpenAPIResponse(description="Not modified (If-None-Match)")


@dataclass
class PublicOperation(Operation):
    """No key needed (the global bearer requirement does not apply)."""

    def __post_init__(self) -> None:
        self.security = []


@dataclass
class SignedDownloadOperation(DownloadOperation):
    """A download-url link: the signature in the query is the permission."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.security = []


class ModelController(Controller):
    path = "/api/v1/models"

    @get("/", opt={"scope": "read"}, responses=_errors())
    async def list_models(
        self,
        registry: NamedDependency[Registry],
        limit: Annotated[int, QueryParameter(ge=1, le=100)] = 20,
        offset: Annotated[int, QueryParameter(ge=0, le=2**62)] = 0,
        framework: FromQuery[Framework | None] = None,
        is_baseline: FromQuery[bool | None] = None,
        name: Annotated[str | None, QueryParameter(max_length=200)] = None,
        use_case: Annotated[str | None, QueryParameter(max_length=200)] = None,
    ) -> ModelList:
        return await registry.list_models(limit, offset, framework=framework, is_baseline=is_baseline, name=name,
                                          use_case=use_case)

    # `data` documents the body in the OpenAPI schema; the handler re-decodes it strictly (Litestar coerces types).

    @post("/", opt={"scope": "write"}, status_code=201,
          responses={**_errors(409), 200: ResponseSpec(Model, description="A model of that name already existed")})
    async def create_model(self, request: Request[Any, Any, Any], registry: NamedDependency[Registry],
                           data: JSONBody[CreateModel | None] = None) -> Response[Model]:
        model, created = await registry.create_model(_decode(await request.body(), CreateModel))
        return Response(model, status_code=201 if created else 200)

    @patch("/{model_id:str}", opt={"scope": "write"}, responses=_errors(409))
    async def update_model(self, model_id: FromPath[str], request: Request[Any, Any, Any],
                           registry: NamedDependency[Registry], data: JSONBody[UpdateModel | None] = None) -> Model:
        return await registry.update_model(model_id, _decode(await request.body(), UpdateModel))

    @delete("/{model_id:str}", opt={"scope": "write"}, status_code=204, responses=_errors())
    async def delete_model(self, model_id: FromPath[str], registry: NamedDependency[Registry]) -> None:
        await registry.delete_model(model_id)

    @get("/{model_id:str}/versions/{version:str}", opt={"scope": "read"}, responses=_errors())
    async def get_version(self, model_id: FromPath[str], version: FromPath[str],
                          registry: NamedDependency[Registry]) -> VersionDetail:
        return await registry.get_version(model_id, version)

    @delete("/{model_id:str}/versions/{version:str}", opt={"scope": "write"}, status_code=204, responses=_errors())
    async def delete_version(self, model_id: FromPath[str], version: FromPath[str],
                             registry: NamedDependency[Registry]) -> None:
        await registry.delete_version(model_id, version)

    @get("/{model_id:str}", opt={"scope": "read"}, responses=_errors())
    async def get_model(self, model_id: FromPath[str], registry: NamedDependency[Registry]) -> ModelDetail:
        return await registry.get_model(model_id)

    @post("/{model_id:str}/versions/upload", opt={"scope": "write"}, status_code=201, request_max_body_size=None,
          operation_class=UploadOperation, responses=_errors(409, 413, 507))
    async def upload_version(self, model_id: FromPath[str], request: Request[Any, Any, Any],
                             registry: NamedDependency[Registry]) -> UploadedVersion:
        await registry.require_model(model_id)
        boundary = boundary_of(request.headers.get("content-type", ""))
        limit = registry.config.max_upload_size
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit + FORM_OVERHEAD:
            raise too_large(limit)
        parsed = await receive_upload(_chunks(request), boundary, limit, registry.stage_upload)
        try:
            return await registry.upload_version(model_id, parsed.files, upload_form(parsed.fields),
                                                 uploader=request.scope[ASGI_SCOPE_KEY].name)  # type: ignore[literal-required]
        finally:
            await parsed.discard()

    @get("/{model_id:str}/versions/{version:str}/download-url", opt={"scope": "read"}, responses=_errors())
    async def download_url(self, model_id: FromPath[str], version: FromPath[str], request: Request[Any, Any, Any],
                           registry: NamedDependency[Registry], format: FromQuery[DownloadFormat | None] = None,
                           expires_in: Annotated[int, QueryParameter(
                               ge=1, description="Seconds the link is valid; at most the server's --max-link-age "
                               "(7 days by default), longer is a 400.")] = 3600) -> SignedUrl:
        path, expires_at = await registry.sign_download(model_id, version, format, expires_in)
        return SignedUrl(url=str(request.base_url).rstrip("/") + path, expires_at=expires_at)

    @route("/{model_id:str}/versions/{version:str}/download", http_method=[HttpMethod.GET, HttpMethod.HEAD],
           opt={"scope": "read"}, operation_class=DownloadOperation, responses=_errors(416))
    async def download(self, model_id: FromPath[str], version: FromPath[str], request: Request[Any, Any, Any],
                       registry: NamedDependency[Registry],
                       format: FromQuery[DownloadFormat | None] = None) -> BlobResponse:
        return await _serve(registry, request, model_id, version, format)


async def _serve(registry: Registry, request: Request[Any, Any, Any], model_id: str, version: str,
                 fmt: str | None) -> BlobResponse:
    artifact = await registry.find_artifact(model_id, version, fmt)
    fd = registry.open_artifact(artifact)
    return blob_response(fd, artifact.size, artifact.digest, artifact.filename, request.method, request.headers)


@route("/signed/models/{model_id:str}/versions/{version:str}/download", http_method=[HttpMethod.GET, HttpMethod.HEAD],
       opt={"public": True}, operation_class=SignedDownloadOperation, responses=_errors(416))
async def signed_download(model_id: FromPath[str], version: FromPath[str], request: Request[Any, Any, Any],
                          registry: NamedDependency[Registry], format: FromQuery[DownloadFormat] = "original",
                          expires: FromQuery[str] = "", signature: FromQuery[str] = "") -> BlobResponse:
    """A download-url link: no key, the signature is the permission."""
    registry.check_signature(model_id, version, format, expires, signature)
    return await _serve(registry, request, model_id, version, format)


@get("/health", opt={"public": True}, sync_to_thread=False, operation_class=PublicOperation)
def health(request: Request[Any, Any, Any]) -> Health:
    return Health(status="ok", version=__version__, conversions=request.app.state.conversions,
                  isolation=request.app.state.registry.sandbox.isolation.as_dict())
