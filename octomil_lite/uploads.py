"""Stream a multipart/form-data body into a staged blob and a handful of text fields."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from multipart import MultipartError, MultipartSegment, PushMultipartParser, parse_options_header

from .blobstore import StagedBlob
from .errors import BadRequest, PayloadTooLarge

FORM_OVERHEAD = 1024 * 1024  # room for boundaries and text fields on top of the file itself
MAX_FIELD_BYTES = 64 * 1024
MAX_PARTS = 64


@dataclass
class ParsedUpload:
    """What a finished upload body held: the file (staged, not yet committed) and the text fields."""

    staged: StagedBlob | None = None
    filename: str = ""
    fields: dict[str, str] = field(default_factory=dict)


def boundary_of(content_type: str) -> str:
    kind, options = parse_options_header(content_type)
    if kind != "multipart/form-data" or not options.get("boundary"):
        raise BadRequest("Upload the model as multipart/form-data with a 'file' part.")
    return options["boundary"]


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"The upload is larger than this registry's limit of {limit} bytes "
                           "(octomil-lite serve --max-upload-size).")


async def receive_upload(chunks: AsyncIterator[bytes], boundary: str, limit: int,
                         stage: Callable[[], StagedBlob]) -> ParsedUpload:
    """Parse the body as it arrives; the 'file' part is hashed and written as it streams.

    On any error the staged blob (if any) is discarded before the error propagates.
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
                raise _too_large(limit)
            for event in parser.parse(chunk):
                if isinstance(event, MultipartSegment):
                    current, text = _start_part(event, result, stage), bytearray()
                elif event is None:
                    if current not in (None, "file", "") and current not in result.fields:
                        result.fields[current] = _decode(current, text)
                    current = None
                elif current == "file":
                    assert result.staged is not None
                    if result.staged.size + len(event) > limit:
                        raise _too_large(limit)
                    await result.staged.write(event)
                elif current:
                    text += event
                    if len(text) > MAX_FIELD_BYTES:
                        raise BadRequest(f"Form field '{current[:50]}' is longer than {MAX_FIELD_BYTES} bytes.")
        parser.close()
        if result.staged is None:
            raise BadRequest("The upload has no 'file' part; send the model as the form field 'file'.")
        await result.staged.finish()
    except MultipartError as exc:
        if result.staged is not None:
            await result.staged.discard()
        raise BadRequest(f"The multipart body is malformed: {exc}.") from None
    except BaseException:
        if result.staged is not None:
            await result.staged.discard()
        raise
    return result


def _start_part(segment: MultipartSegment, result: ParsedUpload, stage: Callable[[], StagedBlob]) -> str | None:
    name = segment.name or ""
    if name == "file":
        if result.staged is not None:
            raise BadRequest("The upload has more than one 'file' part; send one model per upload.")
        result.staged = stage()
        result.filename = segment.filename or ""
        return "file"
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
