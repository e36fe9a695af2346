"""Stream a multipart/form-data body into a staged blob and a handful of text fields."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from multipart import MultipartError, MultipartSegment, PushMultipartParser, parse_options_header

from ..errors import BadRequest, PayloadTooLarge
from ..registry import UploadedFile
from ..schemas import UploadForm
from ..storage import StagedBlob

FORM_OVERHEAD = 1024 * 1024  # room for boundaries and text fields on top of the file itself
MAX_FIELD_BYTES = 64 * 1024
MAX_PARTS = 64


FILE_PARTS = ("file", "onnx_data")  # the model, and (Octomil SDK) an ONNX model's external weights


@dataclass
class ParsedUpload:
    """What a finished upload body held: its files (staged, not yet committed) and its text fields."""

    files: dict[str, UploadedFile] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=dict)

    async def discard(self) -> None:
        for upload in self.files.values():
            await upload.staged.discard()


def boundary_of(content_type: str) -> str:
    kind, options = parse_options_header(content_type)
    if kind != "multipart/form-data" or not options.get("boundary"):
        raise BadRequest("Upload the model as multipart/form-data with a 'file' part.")
    if len(options["boundary"]) > 70:  # RFC 2046 section 5.1.1: 1 to 70 characters
        raise BadRequest("The multipart boundary is longer than 70 characters.")
    return options["boundary"]


def too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"The upload is larger than this registry's limit of {limit} bytes "
                           "(octomil-lite serve --max-upload-size).")


async def receive_upload(chunks: AsyncIterator[bytes], boundary: str, limit: int,
                         stage: Callable[[], StagedBlob]) -> ParsedUpload:
    """Parse the body as it arrives; file parts are hashed and written as they stream.

    On any error the staged blobs are discarded before the error propagates.
    """
    result = ParsedUpload()
    parser = PushMultipartParser(boundary, max_header_size=8 * 1024, max_header_count=16,
                                 max_segment_count=MAX_PARTS)
    current: str | None = None
    text = bytearray()
    received = 0
    try:
        async for chunk in chunks:
            received += len(chunk)
            if received > limit + FORM_OVERHEAD:
                raise too_large(limit)
            for event in parser.parse(chunk):
                if isinstance(event, MultipartSegment):
                    current, text = _start_part(event, result, stage), bytearray()
                elif event is None:
                    if current not in (None, "", *FILE_PARTS) and current not in result.fields:
                        result.fields[current] = _decode(current, text)
                    current = None
                elif current in FILE_PARTS:
                    staged = result.files[current].staged
                    if staged.size + len(event) > limit:
                        raise too_large(limit)
                    await staged.write(event)
                elif current:
                    text += event
                    if len(text) > MAX_FIELD_BYTES:
                        raise BadRequest(f"Form field '{current[:50]}' is longer than {MAX_FIELD_BYTES} bytes.")
        parser.close()
        if "file" not in result.files:
            raise BadRequest("The upload has no 'file' part; send the model as the form field 'file'.")
        for upload in result.files.values():
            await upload.staged.finish()
    except MultipartError as exc:
        await result.discard()
        raise BadRequest(f"The multipart body is malformed: {exc}.") from None
    except BaseException:
        await result.discard()
        raise
    return result


def _start_part(segment: MultipartSegment, result: ParsedUpload, stage: Callable[[], StagedBlob]) -> str | None:
    name = segment.name or ""
    if name in FILE_PARTS:
        if name in result.files:
            raise BadRequest(f"The upload has more than one '{name}' part; send one model per upload.")
        result.files[name] = UploadedFile(stage(), segment.filename or "")
        return name
    if segment.filename is not None:
        return None  # a file part this registry does not use: its bytes are skipped
    return name


def _decode(name: str, raw: bytearray) -> str:
    try:
        value = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"Form field '{name[:50]}' is not valid UTF-8.") from None
    if "\x00" in value:
        raise BadRequest(f"Form field '{name[:50]}' contains a NUL character.")
    return value


def _number(name: str, value: str | None) -> float | None:
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except ValueError:
        raise BadRequest(f"Form field '{name}' must be a number; got '{value[:50]}'.") from None
    if not math.isfinite(number):
        raise BadRequest(f"Form field '{name}' must be a finite number.")
    return number


def _text(name: str, value: str | None, limit: int) -> str | None:
    if value is None:
        return None
    if len(value) > limit:
        raise BadRequest(f"Form field '{name}' must be at most {limit} characters.")
    return value


def _shape(value: str | None) -> list[int] | None:
    if not value:
        return None
    parts = value.strip().strip("[]()").replace(" ", "").split(",")
    if not 1 <= len(parts) <= 8 or not all(p.isdigit() and 0 < int(p) <= 1_000_000 for p in parts):
        raise BadRequest("Form field 'input_shape' must be 1-8 positive integers such as 1,3,32,32; "
                         f"got '{value[:50]}'.")
    return [int(p) for p in parts]


def _label(value: str | None) -> str | None:
    label = _text("version", value.strip() if value else None, 100)
    if not label:
        return None
    if label.isdigit() or label == "latest" or "/" in label:
        raise BadRequest(f"Form field 'version' is a label such as 1.0.0; '{label[:50]}' would clash with version "
                         "numbers, 'latest' or paths.")
    return label


def _targets(value: str | None) -> list[str]:
    # The Octomil SDK's `formats`: conversions wanted, comma-separated; ones we cannot make are ignored.
    wanted = [part.strip().lower() for part in (value or "").split(",")]
    return [target for target in ("onnx", "tflite", "coreml") if target in wanted]


def upload_form(fields: dict[str, str]) -> UploadForm:
    """Validate the text fields of an upload; unknown fields are ignored, as the hosted API does."""
    return UploadForm(
        format=(fields.get("format") or "").strip() or None,
        targets=_targets(fields.get("formats")),
        description=_text("description", fields.get("description"), 1000),
        label=_label(fields.get("version")),
        round_id=_text("round_id", fields.get("round_id") or None, 200),
        accuracy=_number("accuracy", fields.get("accuracy")),
        loss=_number("loss", fields.get("loss")),
        input_shape=_shape(fields.get("input_shape")),
    )
