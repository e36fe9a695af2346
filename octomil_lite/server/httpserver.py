"""uvicorn on httptools, bounded: request heads have size and count limits, and protocol errors are JSON."""

from __future__ import annotations

import json
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 64 * 1024  # request line plus headers, as parsed
MAX_HEADERS = 100
MAX_UNPARSED_HEAD_BYTES = 1024 * 1024  # what one request head may buffer before it is parsed


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """httptools puts no bound on a request's head; this protocol refuses an oversized one with a 400."""

    def connection_made(self, transport: Any) -> None:
        self._head_bytes = 0
        self._in_head = True
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_UNPARSED_HEAD_BYTES:
                self.send_400_response("The request's headers are too large.")
                return
        super().data_received(data)

    def on_message_begin(self) -> None:
        self._in_head = True
        self._parsed_head = 0
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._grow(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._grow(len(name) + len(value))
        if len(self.headers) >= MAX_HEADERS:
            raise ValueError("too many request headers")  # httptools turns this into a parser error: a 400
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        super().on_headers_complete()

    def _grow(self, size: int) -> None:
        self._parsed_head += size
        if self._parsed_head > MAX_HEAD_BYTES:
            raise ValueError("request head too large")

    def send_400_response(self, msg: str) -> None:
        body = json.dumps({"error": "bad_request", "message": msg}).encode()
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
                             b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)
        self.transport.close()


def run(app: Any, host: str, port: int, log_level: str, access_log: bool) -> None:
    """Serve `app` until interrupted."""
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=access_log,
                http=BoundedHttpToolsProtocol, loop="auto", timeout_graceful_shutdown=5)
