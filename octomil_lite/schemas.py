"""Request and response shapes (msgspec Structs); field names follow the hosted Models API."""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

import msgspec

UPLOAD_FORMATS = ("pytorch", "tensorflow", "onnx", "sklearn", "xgboost", "lightgbm", "numpy")

Framework = Literal["pytorch", "tensorflow", "xgboost", "sklearn"]
FRAMEWORKS: tuple[str, ...] = get_args(Framework)
DownloadFormat = Literal["original", "pytorch", "tensorflow", "onnx", "sklearn", "xgboost", "lightgbm", "numpy",
                         "tflite", "coreml", "onnx-int8", "onnx-fp16"]
DOWNLOAD_FORMATS: tuple[str, ...] = get_args(DownloadFormat)
Description = Annotated[str, msgspec.Meta(max_length=1000)]
ShortText = Annotated[str, msgspec.Meta(max_length=200)]
VersionStatus = Literal["draft", "published", "deprecated"]
VERSION_STATUSES: tuple[str, ...] = get_args(VersionStatus)
MetricName = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f]+$")]
MAX_METRICS = 64


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
    warm_pool: dict[str, Any]


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
    architecture: dict[str, Any]


class VersionSummary(Schema):
    version: int
    label: str | None
    status: str
    format: str
    model_size_bytes: int
    model_hash: str
    description: str | None
    round_id: str | None
    accuracy: float | None
    loss: float | None
    metrics: dict[str, float]
    uploaded_at: str


class VersionList(Schema):
    """GET /models/{id}/versions: newest first (the Octomil SDK's rollback takes versions[1] as the previous)."""

    versions: list[VersionSummary]
    total: int
    limit: int
    offset: int


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
    status: str
    format: str
    model_path: str
    model_size_bytes: int
    model_hash: str
    description: str | None
    uploaded_at: str


class UploadedVersion(VersionFacts):
    formats: dict[str, str]


class ImportSummary(Schema):
    """What an import added: new models, versions and artifacts, and versions that were already here."""

    models: int
    versions: int
    versions_present: int
    artifacts: int
    files: int
    bytes: int


class VersionDetail(VersionFacts):
    round_id: str | None
    accuracy: float | None
    loss: float | None
    input_shape: list[int] | None
    metrics: dict[str, float]
    formats: dict[str, FormatStatus]


class EventCount(Schema):
    count: int
    last_at: str


class ModelDetail(Model):
    versions: list[VersionSummary]
    events: dict[str, EventCount]


class ModelList(Schema):
    models: list[Model]
    total: int
    limit: int
    offset: int


class SignedUrl(Schema):
    url: str
    expires_at: str


class UploadUrl(Schema):
    """POST .../versions/upload-url: where to PUT the bytes once, and the key to confirm them with."""

    upload_url: str
    storage_key: str
    method: str
    expires_at: str


class Federation(Schema):
    id: str
    name: str
    description: str | None
    org_id: str
    created_at: str


class EventsAccepted(Schema):
    accepted: int
    counted: int


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


class CreateVersion(msgspec.Struct, kw_only=True):
    """POST /models/{id}/versions: register bytes already in the store (a storage_key or a stored blob)."""

    version: Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
    storage_path: Annotated[str, msgspec.Meta(min_length=1, max_length=1000)]
    format: str | None = None
    checksum: Annotated[str, msgspec.Meta(max_length=100)]
    size_bytes: Annotated[int, msgspec.Meta(ge=0)]
    description: Description | None = None
    # names checked like UpdateMetrics' in the domain; the schema cannot state a rule for keys here
    metrics: dict[str, float] | None = None
    status: VersionStatus = "draft"


class UpdateMetrics(msgspec.Struct, kw_only=True):
    """PATCH .../versions/{v}/metrics: numbers of any name, merged in; null removes one."""

    metrics: dict[MetricName, float | None]


class CreateFederation(msgspec.Struct, kw_only=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    org_id: ShortText = "default"
    description: Description | None = None


class AttachModel(msgspec.Struct, kw_only=True):
    model_id: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


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
    architecture: dict[str, Any] | None = None
    status: str = "published"
    metrics: dict[str, float] | None = None


class OptimizeRequest(msgspec.Struct, kw_only=True):
    """POST /models/{id}/optimize (Octomil SDK): quantize the newest published version's ONNX form."""

    accuracy_threshold: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.95
    target_devices: list[ShortText] | None = None
    size_budget_mb: Annotated[float, msgspec.Meta(ge=0, description="Largest variant wanted; 0: no budget")] = 0


class Candidate(Schema):
    """One optimized variant: its size, parity against the float ONNX model, and whether it qualifies."""

    status: str
    reason: str | None
    size_bytes: int | None
    parity: dict[str, Any] | None
    retention: float | None
    meets_threshold: bool
    within_budget: bool


class OptimizeReport(Schema):
    model_id: str
    version: int
    feasible: bool
    reason: str | None
    criterion: str
    accuracy_threshold: float
    original_size_mb: float
    optimized_size_mb: float | None
    compression_ratio: float | None
    optimizations_applied: list[str]
    converted_paths: dict[str, str]
    report: dict[str, Candidate]
    runtime_recommendation: str
    target_devices: list[str]
    device_note: str


# federated learning (the Octomil SDK's FederatedClient and Federation)

Metrics = dict[ShortText, float]
VersionRef = Annotated[str, msgspec.Meta(max_length=100)] | int


class RegisterDevice(msgspec.Struct, kw_only=True):
    """POST /api/v1/devices/register; unknown fields are ignored."""

    device_identifier: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    org_id: ShortText | None = None
    platform: ShortText | None = None
    os_version: ShortText | None = None
    sdk_version: ShortText | None = None
    app_version: ShortText | None = None
    metadata: dict[str, Any] | None = None
    capabilities: dict[str, Any] | None = None
    feature_schema: list[ShortText] | None = None


class Heartbeat(msgspec.Struct, kw_only=True):
    sdk_version: ShortText | None = None
    os_version: ShortText | None = None
    platform: ShortText | None = None
    status: ShortText | None = None
    metadata: dict[str, Any] | None = None


class OpenRound(msgspec.Struct, kw_only=True):
    """POST /api/v1/training/rounds: a round on one version of a model (None: the newest)."""

    model_id: ShortText
    version: VersionRef | None = None
    min_updates: Annotated[int, msgspec.Meta(ge=1, le=100_000)] | None = None
    target_participants: Annotated[int, msgspec.Meta(ge=1, le=100_000)] | None = None
    deadline_seconds: Annotated[int, msgspec.Meta(ge=1, le=366 * 86400)] | None = None
    config: dict[str, Any] | None = None
    source: Literal["octomil", "flower"] = "octomil"


class SubmitWeights(msgspec.Struct, kw_only=True):
    """POST /api/v1/training/weights, as FederatedClient.train / join_round send it."""

    model_id: ShortText
    device_id: ShortText
    weights_data: str
    version: VersionRef | None = None
    round_id: ShortText | None = None
    sample_count: Annotated[int, msgspec.Meta(ge=0)] = 0
    metrics: Metrics | None = None
    update_format: Literal["weights", "delta"] = "weights"


class Aggregate(msgspec.Struct, kw_only=True):
    """POST /api/v1/training/aggregate, as Federation.train sends it (architecture fields are ignored)."""

    model_id: ShortText
    base_version: VersionRef | None = None
    new_version: ShortText | None = None
    round_id: ShortText | None = None
    min_updates: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 1
    publish: bool = True
    strategy: Literal["fedavg", "metrics"] = "fedavg"  # "metrics", Federation.train's default, is FedAvg too
    update_format: ShortText | None = None


class RoundResult(msgspec.Struct, kw_only=True):
    """POST /api/v1/training/rounds/{id}/result: a round aggregated elsewhere (a Flower run) and its version."""

    version: VersionRef
    metrics: Metrics | None = None
    participants: list[dict[str, Any]] | None = None


class RoundMetrics(msgspec.Struct, kw_only=True):
    """PATCH /api/v1/training/rounds/{id}: metrics merged into the round's."""

    metrics: Metrics


class TrainingSession(msgspec.Struct, kw_only=True):
    """POST /api/v1/training/sessions (OctomilClient.train): opens a round on the newest version."""

    model_id: ShortText
    rounds: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 1
    min_updates: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 1
    strategy: ShortText = "fedavg"
    group: ShortText | None = None
