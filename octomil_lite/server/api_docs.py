"""Tag, one-line summary and description of the operations beyond the hosted Models API (the Octomil SDK's
lifecycle, federations, federated learning, events), applied to the generated OpenAPI document in one place."""

from __future__ import annotations

from typing import Any

V, M, D, K, F = "versions", "models", "downloads", "keys-health", "federated-learning"
_SDK = " Used by the Octomil SDK."

OPERATIONS: dict[tuple[str, str], tuple[str, str, str]] = {
    ("get", "/api/v1/models/{model_id}/versions"): (
        V, "List a model's versions, newest first", "Paged (`limit`, `offset`) with an optional `status` filter "
        "(draft, published, deprecated); answers `{versions, total, limit, offset}`." + _SDK),
    ("post", "/api/v1/models/{model_id}/versions"): (
        V, "Register bytes already stored as a draft version", "`storage_path` names a finished three-step "
        "upload or a stored blob; its size and checksum must match, else 400." + _SDK),
    ("post", "/api/v1/models/{model_id}/versions/{version}/publish"): (
        V, "Publish a version", "Idempotent; `latest` is the newest published version." + _SDK),
    ("post", "/api/v1/models/{model_id}/versions/{version}/deprecate"): (
        V, "Deprecate a version", "Idempotent; the bytes stay downloadable by number or label, but `latest` skips "
        "it." + _SDK),
    ("patch", "/api/v1/models/{model_id}/versions/{version}/metrics"): (
        V, "Merge metrics of any name into a version", "Numbers by name; null removes one; at most 64." + _SDK),
    ("post", "/api/v1/models/{model_id}/versions/upload-url"): (
        V, "Start a three-step upload: get a signed PUT URL", "Form `version`, `filename`; the URL takes one PUT "
        "of the raw bytes within an hour, then confirm-upload makes the version (newer Octomil SDKs)."),
    ("post", "/api/v1/models/{model_id}/versions/confirm-upload"): (
        V, "Finish a three-step upload", "Form `storage_key`, `version`, `file_size`; the same checks, conversions "
        "and answer as a multipart upload."),
    ("put", "/signed/models/{model_id}/uploads/{storage_key}"): (
        V, "Send a three-step upload's bytes", "No key: the URL's signature is the permission; one PUT, streamed, "
        "with the same size limit (413) as a multipart upload."),
    ("post", "/api/v1/models/{model_id}/optimize"): (
        M, "Make quantized ONNX forms of the newest version", "Dynamic int8 and fp16, each with parity against the "
        "float model; `feasible` says whether one meets `accuracy_threshold` (downloads as onnx-int8 / onnx-fp16)."
        + _SDK),
    ("get", "/api/v1/models/{model_id}/compatibility"): (
        M, "What the registry knows of a model's formats and sizes", "No device verdicts are invented: only sizes "
        "and the formats that are ready." + _SDK),
    ("get", "/api/v1/models/{model_id}/optimized-config/{device}"): (
        M, "The format and size to use on a device", "Answered from the ready formats (ONNX)." + _SDK),
    ("post", "/api/v1/inference/events"): (
        K, "Count inference events", "Accepted (202) and counted per model, shown in the model's `events`." + _SDK),
    ("post", "/api/v2/telemetry/events"): (
        K, "Count telemetry events", "Accepted (202) and counted per model; never an error for the SDK." + _SDK),
    ("get", "/api/v1/health"): (K, "Health, with a key", "The same answer as /health (`octomil.init()` probes it)."),
    ("get", "/api/v1/federations"): (
        F, "List federations", "Filter by `name`; one registry is one organisation." + _SDK),
    ("post", "/api/v1/federations"): (F, "Create a federation", "Names are unique." + _SDK),
    ("get", "/api/v1/federations/{federation_id}"): (F, "Show a federation", "By id." + _SDK),
    ("get", "/api/v1/federations/{federation_id}/models"): (
        F, "List a federation's models", "The models attached to it." + _SDK),
    ("post", "/api/v1/federations/{federation_id}/models"): (
        F, "Attach a model to a federation", "201, or 200 when it already was attached." + _SDK),
    ("post", "/api/v1/devices/register"): (
        F, "Register a device", "Idempotent per `device_identifier`; answers its `id` and `status`." + _SDK),
    ("get", "/api/v1/devices"): (F, "List devices", "Every registered device with its last heartbeat."),
    ("post", "/api/v1/devices/{device_id}/heartbeat"): (F, "A device's heartbeat", "Refreshes its fields." + _SDK),
    ("get", "/api/v1/devices/{device_id}/assignments"): (
        F, "The rounds a device may join", "Active rounds of the models it can pull." + _SDK),
    ("get", "/api/v1/training/rounds"): (
        F, "List training rounds", "Filter by `device_id` and `status` (the SDK asks for active ones)."),
    ("post", "/api/v1/training/rounds"): (
        F, "Open a training round", "On one version of a model, with `min_updates`, `target_participants` and a "
        "deadline."),
    ("get", "/api/v1/training/rounds/{round_id}/status"): (
        F, "A round's status", "Participants, target, model, version and config, as the SDK reads them."),
    ("patch", "/api/v1/training/rounds/{round_id}"): (F, "Merge metrics into a round", "Numbers by name."),
    ("post", "/api/v1/training/rounds/{round_id}/result"): (
        F, "Record a round aggregated elsewhere", "A Flower run's round and the version it produced."),
    ("get", "/api/v1/training/rounds/{round_id}/updates"): (
        F, "List a round's updates", "Each with its device, sample count and metrics."),
    ("get", "/api/v1/training/rounds/{round_id}/secagg/session"): (
        F, "Secure aggregation", "Answers 501: it needs the hosted platform's key exchange."),
    ("post", "/api/v1/training/weights"): (
        F, "Submit a device's weights or delta", "`weights_data` is base64 of np.save/np.savez or torch.save("
        "state_dict) bytes, checked against the base version's tensors; a bad update is a 400." + _SDK),
    ("post", "/api/v1/training/aggregate"): (
        F, "FedAvg the accepted updates into a new version", "Weighted by `sample_count`, full weights or deltas; "
        "the result is a new version with the round's participants, metrics and provenance." + _SDK),
    ("post", "/api/v1/training/sessions"): (
        F, "Start a training session", "Opens a round on the newest version (`OctomilClient.train`)."),
    ("get", "/api/v1/training/{model_id}/status"): (F, "A model's training status", "Its open and recent rounds."),
    ("post", "/api/v1/training/{model_id}/stop"): (F, "Stop a model's training", "Closes its open rounds."),
    ("get", "/api/v1/training/personalized/{device_id}"): (
        F, "Personalised model", "Answers 501: personalisation needs the hosted platform."),
    ("post", "/api/v1/training/personalized/{device_id}"): (
        F, "Personalised update", "Answers 501: personalisation needs the hosted platform."),
}


def document(paths: dict[str, Any]) -> None:
    """Fill in the tag, summary and description of each operation listed above (OpenAPI PathItem objects)."""
    for (method, path), (tag, summary, description) in OPERATIONS.items():
        item = paths.get(path)
        operation = getattr(item, method, None) if item is not None else None
        if operation is not None:
            operation.tags, operation.summary, operation.description = [tag], summary, description
