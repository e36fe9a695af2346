"""Inference and telemetry events from Octomil SDKs, reduced to (model reference, event name) pairs to count."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import NotFound

if TYPE_CHECKING:
    from .registry import Registry

MAX_EVENTS_PER_REQUEST = 1000
MAX_NAME = 64
MAX_NAMES_PER_MODEL = 32  # further names of one model are counted as "other": the counters stay bounded


def _name(value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return None
    return "".join(c for c in value.strip() if c.isprintable())[:MAX_NAME] or None


def inference_event(body: Any) -> list[tuple[str, str]]:
    """POST /inference/events: one {model_id, event_type, ...} object (or a list of them)."""
    items = body if isinstance(body, list) else [body]
    found = []
    for item in items[:MAX_EVENTS_PER_REQUEST]:
        if isinstance(item, dict) and (model := _name(item.get("model_id"))) and (
                event := _name(item.get("event_type")) or "inference"):
            found.append((model, event))
    return found


def _attribute(record: dict[str, Any], key: str) -> Any:
    for kv in record.get("attributes") or []:
        if isinstance(kv, dict) and kv.get("key") == key and isinstance(kv.get("value"), dict):
            return next(iter(kv["value"].values()), None)
    return None


def telemetry_events(body: Any) -> tuple[int, list[tuple[str, str]]]:
    """POST /api/v2/telemetry/events: an OTLP logs envelope; (records seen, those naming a model)."""
    seen, found = 0, []
    resources = body.get("resourceLogs") if isinstance(body, dict) else None
    for resource in resources if isinstance(resources, list) else []:
        scopes = resource.get("scopeLogs") if isinstance(resource, dict) else None
        for scope in scopes if isinstance(scopes, list) else []:
            records = scope.get("logRecords") if isinstance(scope, dict) else None
            for record in records if isinstance(records, list) else []:
                if seen >= MAX_EVENTS_PER_REQUEST or not isinstance(record, dict):
                    continue
                seen += 1
                body_value = record.get("body")
                event = _name(body_value.get("stringValue") if isinstance(body_value, dict) else None)
                if (model := _name(_attribute(record, "model.id"))) and event:
                    found.append((model, event))
    return seen, found


async def count_events(registry: Registry, now: str, events: list[tuple[str, str]]) -> int:
    """Count (model reference, event name) pairs; events of unknown models are accepted but not kept."""
    counts: dict[tuple[int, str], int] = {}
    known: dict[str, int | None] = {}
    for ref, name in events:
        if ref not in known:
            try:
                known[ref] = (await registry.model_row(ref))["seq"]
            except NotFound:
                known[ref] = None
        if (seq := known[ref]) is not None:
            counts[seq, name] = counts.get((seq, name), 0) + 1
    if counts:
        await registry.db.count_events(counts, now, MAX_NAMES_PER_MODEL)
    return sum(counts.values())
