"""A pure-ASGI response that streams one blob from disk in large chunks, never whole into memory."""

from __future__ import annotations

import asyncio
import os
from typing import Any

CHUNK_BYTES = 1024 * 1024


class BlobResponse:
    """Serve an open file descriptor with the download headers; closes the descriptor when done."""

    def __init__(self, fd: int, size: int, headers: dict[str, str], *, head_only: bool = False):
        self.fd = fd
        self.size = size
        self.headers = headers
        self.head_only = head_only

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
            raw.append((b"content-length", str(self.size).encode()))
            await send({"type": "http.response.start", "status": 200, "headers": raw})
            if self.head_only:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            loop = asyncio.get_running_loop()
            offset = 0
            while offset < self.size:
                data = await loop.run_in_executor(None, os.pread, self.fd, min(CHUNK_BYTES, self.size - offset), offset)
                if not data:
                    break
                offset += len(data)
                await send({"type": "http.response.body", "body": data, "more_body": offset < self.size})
            if offset < self.size or self.size == 0:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            os.close(self.fd)
