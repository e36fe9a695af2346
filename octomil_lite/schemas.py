"""Request and response shapes (msgspec Structs); field names follow the hosted Models API."""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

import msgspec

UPLOAD_FORMATS = ("pytorch", "tensorflow", "onnx", "sklearn", "xgboost", "lightgbm")

Framework = Literal["pytorch", "tensorflow", "xgboost", "sklearn"]
FRAMEWORKS: tuple[str, ...] = get_args(Framework)
DownloadFormat = Literal["original", "pytorch", "tensorflow", "onnx", "sklearn", "xgboost", "lightgbm", "tflite",
                         "coreml"]
DOWNLOAD_FORMATS: tuple[str, ...] = get_args(DownloadFormat)
Description = Annotated[str, msgspec.Meta(max_length=1000)]
ShortText = Annotated[str, msgspec.Meta(max_length=200)]


class Schema(msgspec.Struct, kw_only=True):
    """Base of every response body."""


class ErrorBody(Schema, omit_defaults=True):
    error: str
    message: str
    details: list[Any] | None = None


class Health(Schema):
    status: str
    version: str
    conversions: dict[str, list[str]]
    isolation: dict[str, Any]


class Model(Schema):
    id: str
    name: str | None
    use_case: str | None
    round_id: str | None
    model_path: str | None
    model_size_bytes: int | None
    model_hash: str | None
    framework: str | None
    framework_version: str | None
    accuracy: float | None
    loss: float | None
    is_baseline: bool
    description: str | None
    created_at: str


class VersionSummary(Schema):
    version: int
    label: str | None
    format: str
    model_size_bytes: int
    model_hash: str
    description: str | None
    round_id: str | None
    accuracy: float | None
    loss: float | None
    uploaded_at: str


class FormatStatus(Schema):
    """One format of a version: ready, pending/running, or failed/impossible/unavailable and why."""

    status: str
    reason: str | None = None
    model_size_bytes: int | None = None
    model_hash: str | None = None
    parity: dict[str, Any] | None = None
    signature: dict[str, Any] | None = None
    converter: str | None = None
    updated_at: str | None = None


class VersionFacts(Schema):
    """What the upload answer and the version detail both say of a version (the hosted upload's fields)."""

    model_id: str
    version: int
    label: str | None
    format: str
    model_path: str
    model_size_bytes: int
    model_hash: str
    description: str | None
    uploaded_at: str


class UploadedVersion(VersionFacts):
    formats: dict[str, str]


class VersionDetail(VersionFacts):
    round_id: str | None
    accuracy: float | None
    loss: float | None
    input_shape: list[int] | None
    formats: dict[str, FormatStatus]


class ModelDetail(Model):
    versions: list[VersionSummary]


class ModelList(Schema):
    models: list[Model]
    total: int
    limit: int
    offset: int


class SignedUrl(Schema):
    url: str
    expires_at: str


class CreateModel(msgspec.Struct, kw_only=True):
    """POST /api/v1/models body; unknown fields (name, use_case, org_id, ...) are ignored."""

    name: ShortText | None = None
    use_case: ShortText | None = None
    framework: Framework | None = None
    framework_version: ShortText | None = None
    description: Description | None = None
    is_baseline: bool | None = None
    round_id: ShortText | None = None
    accuracy: float | None = None
    loss: float | None = None


class UpdateModel(msgspec.Struct, kw_only=True):
    """PATCH /api/v1/models/{id} body: only the fields present change."""

    description: Description | None | msgspec.UnsetType = msgspec.UNSET
    is_baseline: bool | msgspec.UnsetType = msgspec.UNSET
    accuracy: float | None | msgspec.UnsetType = msgspec.UNSET
    loss: float | None | msgspec.UnsetType = msgspec.UNSET
    round_id: ShortText | None | msgspec.UnsetType = msgspec.UNSET
    framework_version: ShortText | None | msgspec.UnsetType = msgspec.UNSET
    name: ShortText | None | msgspec.UnsetType = msgspec.UNSET
    use_case: ShortText | None | msgspec.UnsetType = msgspec.UNSET


class UploadForm(msgspec.Struct, kw_only=True):
    """The text fields of an upload, after multipart parsing and validation."""

    format: str | None = None
    targets: list[str] = msgspec.field(default_factory=list)
    description: str | None = None
    label: str | None = None
    round_id: str | None = None
    accuracy: float | None = None
    loss: float | None = None
    input_shape: list[int] | None = None
