"""HTTP for the version lifecycle (list, register, publish, deprecate, metrics) and the three-step upload."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, get, patch, post, put
from litestar.di import NamedDependency
from litestar.enums import RequestEncodingType
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIType, Operation, RequestBody, Schema
from litestar.params import Body, FromPath, FromQuery, JSONBody, QueryParameter

from ..errors import BadRequest
from ..registry import Registry
from ..schemas import (
    MAX_METRICS,
    CreateVersion,
    OptimizeReport,
    OptimizeRequest,
    UpdateMetrics,
    UploadedVersion,
    UploadUrl,
    VersionDetail,
    VersionList,
    VersionStatus,
)
from .controllers import PublicOperation, _chunks, _decode, _errors, uploader_of
from .uploads import receive_raw, too_large, upload_form


class UploadUrlForm(msgspec.Struct, kw_only=True):
    """Form fields of POST .../versions/upload-url, as newer Octomil SDKs send them."""

    version: Annotated[str, msgspec.Meta(pattern=r"\S", max_length=100, description="The version's label")]
    filename: str | None = None
    content_type: str | None = None


class ConfirmUploadForm(msgspec.Struct, kw_only=True):
    """Form fields of POST .../versions/confirm-upload; the other upload fields (formats, accuracy, ...) also apply."""

    storage_key: str
    version: str | None = None
    file_size: str | None = None
    description: str | None = None


_METRICS_BODY = Schema(type=OpenAPIType.OBJECT, required=["metrics"], properties={"metrics": Schema(
    type=OpenAPIType.OBJECT, max_properties=MAX_METRICS,
    property_names=Schema(type=OpenAPIType.STRING, min_length=1, max_length=64, pattern=r"^[^\u0000-\u001f]+$"),
    additional_properties=Schema(one_of=[Schema(type=OpenAPIType.NUMBER), Schema(type=OpenAPIType.NULL)]),
    description="Numbers of any name, merged into the version's; null removes one")})


@dataclass
class MetricsOperation(Operation):
    """Documented by hand: the OpenAPI generator does not describe the rules for a metric's name."""

    def __post_init__(self) -> None:
        self.request_body = RequestBody(required=True, content={
            "application/json": OpenAPIMediaType(schema=_METRICS_BODY)})


def _file_size(value: str | None) -> int | None:
    if value is None or not value.strip():
        return None
    if not value.strip().isdigit() or len(value.strip()) > 18:
        raise BadRequest(f"Form field 'file_size' must be a whole number of bytes; got '{value[:50]}'.")
    return int(value)


class VersionLifecycleController(Controller):
    path = "/api/v1/models"

    @get("/{model_id:str}/versions", opt={"scope": "read"}, responses=_errors())
    async def list_versions(
        self,
        model_id: FromPath[str],
        registry: NamedDependency[Registry],
        limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
        offset: Annotated[int, QueryParameter(ge=0, le=2**62)] = 0,
        status: FromQuery[VersionStatus | None] = None,
    ) -> VersionList:
        return await registry.lifecycle.list_versions(model_id, limit, offset, status)

    @post("/{model_id:str}/versions", opt={"scope": "write"}, status_code=201, responses=_errors(409))
    async def create_version(self, model_id: FromPath[str], request: Request[Any, Any, Any],
                             registry: NamedDependency[Registry],
                             data: JSONBody[CreateVersion]) -> UploadedVersion:
        await registry.require_model(model_id)  # a missing model is a 404 whatever the body holds
        return await registry.lifecycle.create_version(model_id, _decode(await request.body(), CreateVersion),
                                                       uploader_of(request))

    @post("/{model_id:str}/versions/{version:str}/publish", opt={"scope": "write"}, status_code=200,
          responses=_errors())
    async def publish(self, model_id: FromPath[str], version: FromPath[str],
                      registry: NamedDependency[Registry]) -> VersionDetail:
        return await registry.lifecycle.set_status(model_id, version, "published")

    @post("/{model_id:str}/versions/{version:str}/deprecate", opt={"scope": "write"}, status_code=200,
          responses=_errors())
    async def deprecate(self, model_id: FromPath[str], version: FromPath[str],
                        registry: NamedDependency[Registry]) -> VersionDetail:
        return await registry.lifecycle.set_status(model_id, version, "deprecated")

    @patch("/{model_id:str}/versions/{version:str}/metrics", opt={"scope": "write"}, responses=_errors(),
           operation_class=MetricsOperation)
    async def update_metrics(self, model_id: FromPath[str], version: FromPath[str], request: Request[Any, Any, Any],
                             registry: NamedDependency[Registry],
                             data: JSONBody[UpdateMetrics]) -> VersionDetail:
        return await registry.lifecycle.update_metrics(model_id, version, _decode(await request.body(), UpdateMetrics))

    @post("/{model_id:str}/optimize", opt={"scope": "write"}, status_code=200, responses=_errors())
    async def optimize(self, model_id: FromPath[str], request: Request[Any, Any, Any],
                       registry: NamedDependency[Registry],
                       data: JSONBody[OptimizeRequest | None] = None) -> OptimizeReport:
        await registry.require_model(model_id)
        return await registry.optimizer.optimize(model_id, _decode(await request.body(), OptimizeRequest))

    @get("/{model_id:str}/compatibility", opt={"scope": "read"}, responses=_errors())
    async def compatibility(self, model_id: FromPath[str], registry: NamedDependency[Registry],
                            devices: Annotated[str | None, QueryParameter(max_length=2000)] = None) -> dict[str, Any]:
        wanted = [d.strip() for d in (devices or "").split(",") if d.strip()]
        return await registry.optimizer.compatibility(model_id, wanted)

    @get("/{model_id:str}/optimized-config/{device:str}", opt={"scope": "read"}, responses=_errors())
    async def optimized_config(self, model_id: FromPath[str], device: FromPath[str],
                               registry: NamedDependency[Registry]) -> dict[str, Any]:
        return await registry.optimizer.optimized_config(model_id, device[:200])

    @post("/{model_id:str}/versions/upload-url", opt={"scope": "write"}, status_code=200, responses=_errors(409))
    async def upload_url(
        self, model_id: FromPath[str], request: Request[Any, Any, Any], registry: NamedDependency[Registry],
        data: Annotated[UploadUrlForm, Body(media_type=RequestEncodingType.URL_ENCODED)],
    ) -> UploadUrl:
        storage_key, path, expires_at = await registry.lifecycle.upload_url(model_id, data.version, data.filename or "")
        return UploadUrl(upload_url=str(request.base_url).rstrip("/") + path, storage_key=storage_key, method="PUT",
                         expires_at=expires_at)

    @post("/{model_id:str}/versions/confirm-upload", opt={"scope": "write"}, status_code=201,
          responses=_errors(409))
    async def confirm_upload(
        self, model_id: FromPath[str], request: Request[Any, Any, Any], registry: NamedDependency[Registry],
        data: Annotated[ConfirmUploadForm, Body(media_type=RequestEncodingType.URL_ENCODED)],
    ) -> UploadedVersion:
        await registry.require_model(model_id)
        fields = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
        return await registry.lifecycle.confirm_upload(model_id, data.storage_key, _file_size(data.file_size),
                                                       upload_form(fields), uploader=uploader_of(request))


@put("/signed/models/{model_id:str}/uploads/{storage_key:str}", opt={"public": True}, request_max_body_size=None,
     operation_class=PublicOperation, responses=_errors(409, 413, 507), status_code=200)
async def signed_put(model_id: FromPath[str], storage_key: FromPath[str], request: Request[Any, Any, Any],
                     registry: NamedDependency[Registry], expires: FromQuery[str] = "",
                     signature: FromQuery[str] = "") -> Response[dict[str, Any]]:
    """An upload-url link: one PUT of the raw bytes, streamed into the store like a multipart upload."""
    limit = registry.config.max_upload_size
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    model = await registry.model_row(model_id)
    await registry.direct.check_put(model, storage_key, expires, signature)
    try:
        staged = await receive_raw(_chunks(request), limit, registry.stage_upload)
    except BaseException:
        await registry.direct.failed(storage_key)
        raise
    await registry.direct.received(storage_key, staged)
    return Response({"storage_key": storage_key, "size": staged.size, "model_hash": f"sha256:{staged.digest}"},
                    headers={"etag": f'"{staged.digest}"'})
