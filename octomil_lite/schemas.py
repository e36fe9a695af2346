"""Request and response shapes (msgspec Structs); field names follow the hosted Models API."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

FRAMEWORKS = ("pytorch", "tensorflow", "xgboost", "sklearn")
UPLOAD_FORMATS = ("pytorch", "tensorflow", "onnx", "sklearn", "xgboost", "lightgbm")
DOWNLOAD_FORMATS = ("original", "pytorch", "tensorflow", "onnx", "sklearn", "xgboost", "lightgbm", "tflite", "coreml")

Framework = Literal["pytorch", "tensorflow", "xgboost", "sklearn"]
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


class Model(Schema):
    id: str
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
    format: str
    model_size_bytes: int
    model_hash: str
    description: str | None
    uploaded_at: str


class ModelDetail(Model):
    versions: list[VersionSummary]


class ModelList(Schema):
    models: list[Model]
    total: int
    limit: int
    offset: int


class UploadedVersion(Schema):
    model_id: str
    version: int
    format: str
    model_path: str
    model_size_bytes: int
    model_hash: str
    description: str | None
    uploaded_at: str


class CreateModel(msgspec.Struct, kw_only=True):
    """POST /api/v1/models body; unknown fields (name, use_case, org_id, ...) are ignored."""

    framework: Framework | None = None
    framework_version: ShortText | None = None
    description: Description | None = None
    is_baseline: bool | None = None


class UploadForm(msgspec.Struct, kw_only=True):
    """The text fields of an upload, after multipart parsing."""

    format: str | None = None
    description: str | None = None
