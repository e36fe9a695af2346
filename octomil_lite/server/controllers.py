"""HTTP only: parse requests, call the Registry, shape responses."""

from __future__ import annotations

import asyncio
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
from litestar.response import Stream

from .. import __version__, transfer
from ..auth import ASGI_SCOPE_KEY
from ..config import LINK_AGE_CEILING
from ..errors import BadRequest
from ..registry import Registry
from ..schemas import (
    UPLOAD_FORMATS,
    CreateModel,
    DownloadFormat,
    ErrorBody,
    Framework,
    Health,
    ImportSummary,
    Model,
    ModelDetail,
    ModelList,
    SignedUrl,
    UpdateModel,
    UploadedVersion,
    VersionDetail,
)
from .responses import BlobResponse, blob_response
from .uploads import FORM_OVERHEAD, BodyReader, boundary_of, receive_upload, too_large, upload_form

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
        raise BadRequest("The request body is not valid JSON.") from None


def _errors(*extra: int) -> dict[int, ResponseSpec]:
    """The JSON error responses an /api/v1 operation can give, for the OpenAPI document."""
    statuses = sorted({400, 401, 403, 404, 429, 500, *extra})
    return {status: ResponseSpec(ErrorBody, description=_ERROR_TEXT[status], generate_examples=False)
            for status in statuses}


_ERROR_TEXT = {400: "Bad request: a field, parameter or file is invalid", 401: "Missing or invalid API key",
               403: "The key's scope does not allow this", 404: "No such model, version or format (yet)",
               409: "Conflict: a name or version label already exists", 413: "The upload is too large",
               416: "The requested byte range is outside the file", 429: "Too many requests; see Retry-After",
               500: "Unexpected server error", 501: "Not implemented by octomil-lite (the reason says why)",
               507: "The registry's disk is full"}

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
        if "Head" in (self.operation_id or "") and self.summary and self.description:  # HEAD is no hosted operation
            self.summary = "Headers of a download (size, hash, ETag) without its bytes"
            self.description = self.description.removeprefix(HOSTED)


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


HOSTED = "Part of the hosted Octomil Models API (same path, fields and status codes). "
HOSTED_SUMMARY = " (hosted API)"
_FORMAT_LIST = r"^(original|onnx|tflite|coreml)(,(original|onnx|tflite|coreml))*$"
_TAR = {"application/x-tar": OpenAPIMediaType(schema=Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY))}


@dataclass
class ExportOperation(Operation):
    """An export answers with a tar bundle, not JSON."""

    def __post_init__(self) -> None:
        assert self.responses is not None
        self.responses["200"] = OpenAPIResponse(description="A bundle (tar) of the model", content=_TAR)


@dataclass
class ImportOperation(Operation):
    """An import's body is a tar bundle, read as it streams (any content type; documented as bytes)."""

    def __post_init__(self) -> None:
        self.request_body = RequestBody(required=True, content={"application/octet-stream": OpenAPIMediaType(
            schema=Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY))})


def uploader_of(request: Request[Any, Any, Any]) -> str:
    """The calling key's name: whose turn an upload's conversions wait for (jobs are claimed round-robin by key)."""
    return str(request.scope[ASGI_SCOPE_KEY].name)  # type: ignore[literal-required]


class ModelController(Controller):
    path = "/api/v1/models"

    @get("/", opt={"scope": "read"}, responses=_errors(), tags=["models"],
         summary="List models" + HOSTED_SUMMARY,
         description=HOSTED + "A page of models, newest first, filtered by framework, is_baseline, name or "
                     "use_case; `total` counts every match.")
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

    @post("/", opt={"scope": "write"}, status_code=201, tags=["models"], summary="Create a model" + HOSTED_SUMMARY,
          description=HOSTED + "Every field is optional. A `name` is unique: creating an existing name returns "
                      "that model (200) unless `framework` or `use_case` contradict it (409).",
          responses={**_errors(409), 200: ResponseSpec(Model, description="A model of that name already existed")})
    async def create_model(self, request: Request[Any, Any, Any], registry: NamedDependency[Registry],
                           data: JSONBody[CreateModel | None] = None) -> Response[Model]:
        model, created = await registry.create_model(_decode(await request.body(), CreateModel))
        return Response(model, status_code=201 if created else 200)

    @patch("/{model_id:str}", opt={"scope": "write"}, responses=_errors(409), tags=["models"],
           summary="Change some fields of a model",
           description="Only the fields present change (description, is_baseline, accuracy, loss, round_id, "
                       "framework_version, name, use_case); answers the updated model.")
    async def update_model(self, model_id: FromPath[str], request: Request[Any, Any, Any],
                           registry: NamedDependency[Registry], data: JSONBody[UpdateModel | None] = None) -> Model:
        return await registry.update_model(model_id, _decode(await request.body(), UpdateModel))

    @delete("/{model_id:str}", opt={"scope": "write"}, status_code=204, responses=_errors(), tags=["models"],
            summary="Delete a model and all its versions",
            description="The bytes stay in the store until `octomil-lite gc` reclaims them.")
    async def delete_model(self, model_id: FromPath[str], registry: NamedDependency[Registry]) -> None:
        await registry.delete_model(model_id)

    @get("/{model_id:str}/export", opt={"scope": "read"}, operation_class=ExportOperation, responses=_errors(),
         tags=["downloads"], summary="Export the model as a bundle (tar) for another registry",
         description="Streams the model, its versions and their ready formats, with a manifest of hashes.")
    async def export(self, model_id: FromPath[str], registry: NamedDependency[Registry],
                     formats: Annotated[str | None, QueryParameter(max_length=200, pattern=_FORMAT_LIST)] = None,
                     ) -> Stream:
        plan = await transfer.plan_export(registry, [model_id], formats)
        return Stream(plan.chunks(registry.blobs.open), media_type="application/x-tar",
                      headers={"content-length": str(plan.length()),
                               "content-disposition": f'attachment; filename="{plan.model_ids[0]}.tar"'})

    @get("/{model_id:str}/versions/{version:str}", opt={"scope": "read"}, responses=_errors(), tags=["versions"],
         summary="Show one version and the status of each format",
         description="`version` is a number, `latest` or a label. Each format says ready, pending, running, "
                     "failed, impossible or unavailable, with its reason, size, hash, parity and (ONNX) signature.")
    async def get_version(self, model_id: FromPath[str], version: FromPath[str],
                          registry: NamedDependency[Registry]) -> VersionDetail:
        return await registry.get_version(model_id, version)

    @delete("/{model_id:str}/versions/{version:str}", opt={"scope": "write"}, status_code=204, responses=_errors(),
            tags=["versions"], summary="Delete one version",
            description="Version numbers are never reused; the bytes stay until `octomil-lite gc` reclaims them.")
    async def delete_version(self, model_id: FromPath[str], version: FromPath[str],
                             registry: NamedDependency[Registry]) -> None:
        await registry.delete_version(model_id, version)

    @get("/{model_id:str}", opt={"scope": "read"}, responses=_errors(), tags=["models"],
         summary="Retrieve a model with its versions" + HOSTED_SUMMARY,
         description=HOSTED + "`model_id` is the model's id or its unique name; versions are listed oldest first.")
    async def get_model(self, model_id: FromPath[str], registry: NamedDependency[Registry]) -> ModelDetail:
        return await registry.get_model(model_id)

    @post("/{model_id:str}/versions/upload", opt={"scope": "write"}, status_code=201, request_max_body_size=None,
          operation_class=UploadOperation, responses=_errors(409, 413, 507), tags=["versions"],
          summary="Upload a version" + HOSTED_SUMMARY,
          description=HOSTED + "Multipart, streamed to disk as it arrives. `format` is inferred from the bytes when "
                      "absent and a contradicting one is refused; every non-ONNX upload is converted to ONNX.")
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
                                                 uploader=uploader_of(request))
        finally:
            await parsed.discard()

    @get("/{model_id:str}/versions/{version:str}/download-url", opt={"scope": "read"}, responses=_errors(),
         tags=["downloads"], summary="Make a signed download link",
         description="A link to one version and format that works without a key until it expires "
                     "(`expires_in` seconds); the local counterpart of a pre-signed S3 URL.")
    async def download_url(self, model_id: FromPath[str], version: FromPath[str], request: Request[Any, Any, Any],
                           registry: NamedDependency[Registry], format: FromQuery[DownloadFormat | None] = None,
                           expires_in: Annotated[int, QueryParameter(
                               ge=1, le=LINK_AGE_CEILING, description="Seconds the link is valid; at most the "
                               "server's --max-link-age (7 days by default), longer is a 400.")] = 3600) -> SignedUrl:
        path, expires_at = await registry.sign_download(model_id, version, format, expires_in)
        url = path if path.startswith(("http://", "https://")) else str(request.base_url).rstrip("/") + path
        return SignedUrl(url=url, expires_at=expires_at)

    @route("/{model_id:str}/versions/{version:str}/download", http_method=[HttpMethod.GET, HttpMethod.HEAD],
           opt={"scope": "read"}, operation_class=DownloadOperation, responses=_errors(416), tags=["downloads"],
           summary="Download a version" + HOSTED_SUMMARY,
           description=HOSTED + "`format` is original (default), onnx, tflite or coreml. Sends Content-Disposition "
                       "and X-Model-Hash; also HEAD, Range (206/416) and If-None-Match (304). A format still being "
                       "made answers 404 with Retry-After; one that cannot be made, 404 with the reason.")
    async def download(self, model_id: FromPath[str], version: FromPath[str], request: Request[Any, Any, Any],
                       registry: NamedDependency[Registry],
                       format: FromQuery[DownloadFormat | None] = None) -> BlobResponse:
        return await _serve(registry, request, model_id, version, format)


async def _serve(registry: Registry, request: Request[Any, Any, Any], model_id: str, version: str,
                 fmt: str | None) -> BlobResponse:
    artifact = await registry.find_artifact(model_id, version, fmt)
    source = await registry.open_artifact(artifact)
    return blob_response(source, artifact.size, artifact.digest, artifact.filename, request.method, request.headers)


@route("/signed/models/{model_id:str}/versions/{version:str}/download", http_method=[HttpMethod.GET, HttpMethod.HEAD],
       opt={"public": True}, operation_class=SignedDownloadOperation, responses=_errors(416), tags=["downloads"],
       summary="Download through a signed link",
       description="What a download-url link points at: no key, the signature in the query is the permission.")
async def signed_download(model_id: FromPath[str], version: FromPath[str], request: Request[Any, Any, Any],
                          registry: NamedDependency[Registry], format: FromQuery[DownloadFormat] = "original",
                          expires: FromQuery[str] = "", signature: FromQuery[str] = "") -> BlobResponse:
    """A download-url link: no key, the signature is the permission."""
    await registry.check_signature(model_id, version, format, expires, signature)
    return await _serve(registry, request, model_id, version, format)


@post("/api/v1/import", opt={"scope": "admin"}, status_code=200, request_max_body_size=None,
      operation_class=ImportOperation, responses=_errors(409, 507), tags=["keys-health"],
      summary="Import a bundle made by export",
      description="Admin scope. Every file is verified before anything becomes visible; ids, numbers and "
                  "labels are kept.")
async def import_bundle(request: Request[Any, Any, Any], registry: NamedDependency[Registry]) -> ImportSummary:
    """Import a bundle streamed as the body (curl -T models.tar): verified in full, then added in one go."""
    body = BodyReader(_chunks(request), asyncio.get_running_loop())
    return ImportSummary(**await transfer.import_bundle(registry.db, registry.blobs, body))


@get("/health", opt={"public": True}, sync_to_thread=False, operation_class=PublicOperation, tags=["keys-health"],
     summary="Is the server up, and which conversions can it make",
     description="No key needed. `conversions` maps each source format to the targets this install can produce.")
def health(request: Request[Any, Any, Any]) -> Health:
    return Health(status="ok", version=__version__, conversions=request.app.state.conversions,
                  isolation=request.app.state.registry.sandbox.isolation.as_dict(),
                  warm_pool=request.app.state.registry.warm_pool_status())
