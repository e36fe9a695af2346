"""Pure-ASGI download responses: one blob streamed from disk in large chunks, with HEAD, Range and ETag."""

from __future__ import annotations

import asyncio
import os
import re
from typing import Any

CHUNK_BYTES = 1024 * 1024
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class BlobResponse:
    """Serve `length` bytes of an open file from `start`; closes the descriptor when done."""

    def __init__(self, fd: int | None, status: int, headers: dict[str, str], start: int = 0, length: int = 0,
                 *, head_only: bool = False, body: bytes = b""):
        self.fd = fd
        self.status = status
        self.headers = headers
        self.start = start
        self.length = length
        self.head_only = head_only
        self.body = body

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        ahead: asyncio.Future[bytes] | None = None
        try:
            raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
            await send({"type": "http.response.start", "status": self.status, "headers": raw})
            if self.head_only or self.fd is None:
                await send({"type": "http.response.body", "body": b"" if self.head_only else self.body})
                return
            loop = asyncio.get_running_loop()
            offset, end = self.start, self.start + self.length
            # The next chunk is read (in a worker thread) while this one is sent: disk and socket work in parallel.
            ahead = loop.run_in_executor(None, os.pread, self.fd, min(CHUNK_BYTES, end - offset), offset) \
                if offset < end else None
            while ahead is not None:
                data = await ahead
                ahead = None
                if not data:
                    raise OSError(f"blob shorter than recorded ({offset} of {end} bytes)")
                offset += len(data)
                if offset < end:
                    ahead = loop.run_in_executor(None, os.pread, self.fd, min(CHUNK_BYTES, end - offset), offset)
                await send({"type": "http.response.body", "body": data, "more_body": offset < end})
            if self.length == 0:
                await send({"type": "http.response.body", "body": b""})
        finally:
            if ahead is not None:  # the client went away: the read in flight is not needed (its result is dropped)
                ahead.add_done_callback(_drop)
            if self.fd is not None:
                os.close(self.fd)


def _drop(read: asyncio.Future[bytes]) -> None:
    if not read.cancelled():
        read.exception()  # retrieved, so that asyncio does not log it


def _byte_range(header: str, size: int) -> tuple[int, int] | None | bool:
    """(start, length) of a single satisfiable range; None to ignore the header; False if unsatisfiable."""
    match = _RANGE.fullmatch(header.strip())
    if not match or (not match[1] and not match[2]):
        return None  # malformed or multi-range: RFC 9110 lets us answer with the whole file
    if not match[1]:
        suffix = int(match[2])
        return (max(0, size - suffix), min(suffix, size)) if suffix and size else False
    start = int(match[1])
    end = min(int(match[2]), size - 1) if match[2] else size - 1
    if start >= size or (match[2] and int(match[2]) < start):
        return False
    return start, end - start + 1


def _etag_matches(header: str, etag: str) -> bool:
    return any(tag.strip().removeprefix("W/") in (etag, "*") for tag in header.split(","))


def blob_response(fd: int, size: int, digest: str, filename: str, method: str, headers: Any) -> BlobResponse:
    """The right response (200, 206, 304 or 416) for a download request, from the artifact's recorded facts."""
    etag = f'"{digest}"'
    base = {
        "content-type": "application/octet-stream",
        "content-disposition": f'attachment; filename="{filename}"',
        "x-model-hash": f"sha256:{digest}",
        "etag": etag,
        "accept-ranges": "bytes",
        "cache-control": "private, max-age=0, must-revalidate",
    }
    head_only = method == "HEAD"
    if_none_match = headers.get("if-none-match")
    if if_none_match and _etag_matches(if_none_match, etag):
        os.close(fd)
        return BlobResponse(None, 304, {k: v for k, v in base.items() if k in ("etag", "cache-control")},
                            head_only=True)
    range_header = headers.get("range")
    if_range = headers.get("if-range")
    if range_header and (not if_range or if_range.strip() == etag):
        wanted = _byte_range(range_header, size)
        if wanted is False:
            os.close(fd)
            body = (b'{"error":"range_not_satisfiable","message":"The requested range is outside the file of '
                    + str(size).encode() + b' bytes."}')
            return BlobResponse(None, 416, {"content-type": "application/json", "content-range": f"bytes */{size}",
                                            "content-length": str(len(body))}, head_only=head_only, body=body)
        if wanted is not None:
            start, length = wanted
            return BlobResponse(fd, 206, {**base, "content-range": f"bytes {start}-{start + length - 1}/{size}",
                                          "content-length": str(length)}, start, length, head_only=head_only)
    return BlobResponse(fd, 200, {**base, "content-length": str(size)}, 0, size, head_only=head_only)
