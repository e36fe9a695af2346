"""Build the Litestar application for one Config: auth and rate limiting, error rendering, routes."""

from __future__ import annotations

import errno
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
from litestar import Litestar, Request, Response
from litestar.datastructures import State
from litestar.di import Provide
from litestar.exceptions import HTTPException, SerializationException, ValidationException
from litestar.types import ASGIApp, Receive, Scope, Send
from litestar.utils import normalize_path

from ..auth import ASGI_SCOPE_KEY, RateLimiter, scope_allows
from ..config import Config, human_size
from ..convert.routes import available_conversions
from ..errors import DISK_FULL, UNEXPECTED, BadRequest, Forbidden, OctomilError, RateLimited, Unauthorized
from ..keys import KeyInfo
from ..registry import Registry
from ..schemas import DOWNLOAD_FORMATS, FRAMEWORKS, ErrorBody
from . import api_docs
from .controllers import ModelController, health, import_bundle, signed_download
from .federations import route_handlers as federation_routes
from .lifecycle import VersionLifecycleController, signed_put
from .training import DeviceController, TrainingController
from .web import openapi_config
from .web import route_handlers as web_routes

log = logging.getLogger("octomil_lite")

_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                 405: "method_not_allowed", 409: "conflict", 413: "payload_too_large",
                 415: "unsupported_media_type", 422: "bad_request", 429: "rate_limited"}
_ALLOWED = {"framework": FRAMEWORKS, "format": DOWNLOAD_FORMATS}  # named in the message when a value is not one
REQUEST_MAX_BODY = 1024 * 1024  # every body but an upload's


def _error(status: int, code: str, message: str, details: list[Any] | None = None,
           headers: dict[str, str] | None = None) -> Response[ErrorBody]:
    return Response(ErrorBody(error=code, message=message, details=details), status_code=status,
                    headers=headers, media_type="application/json")


def _on_octomil_error(request: Request[Any, Any, Any], exc: OctomilError) -> Response[ErrorBody]:
    if exc.status >= 500:
        log.error("%s %s failed: %s", request.method, request.url.path, exc.message)
    return _error(exc.status, exc.code, exc.message, exc.details, exc.headers)


def _on_http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[ErrorBody]:
    status = exc.status_code
    if status >= 500:
        log.error("%s %s failed: %s", request.method, request.url.path, exc.detail)
        return _error(500, "internal_error", UNEXPECTED)
    code = _STATUS_CODES.get(status, "bad_request")
    if isinstance(exc, ValidationException) and isinstance(exc.extra, list) and exc.extra:
        first = exc.extra[0]
        where = {"query": "query parameter", "path": "path parameter"}.get(first.get("source"), "field")
        message = f"Invalid {where} '{first.get('key')}': {first.get('message')}."
        if str(first.get("message", "")).startswith("Invalid enum value") and first.get("key") in _ALLOWED:
            message = message[:-1] + f"; it must be one of {', '.join(_ALLOWED[first['key']])}."
        if first.get("source") == "body" and first.get("key") == "data":
            message = f"The request body must be a JSON object ({first.get('message')})."
        return _error(400, "bad_request", message, details=exc.extra)
    if isinstance(exc.__cause__, SerializationException):
        detail = str(exc.detail)
        why = "it ends too early" if "truncated" in detail else detail.removeprefix("JSON is malformed: ")
        message = f"The request body is not valid JSON ({why})."
    elif status == 404:
        message = f"No such resource: {request.method} {request.url.path}."
    elif status == 405:
        message = f"{request.method} is not allowed on {request.url.path}."
    elif status == 413:
        message = f"The request body is larger than the {human_size(REQUEST_MAX_BODY)} limit."
    else:
        message = str(exc.detail)
    return _error(status, code, message, headers=exc.headers)


def _disk_full(exc: BaseException) -> bool:
    """A full disk (or quota) met by a write nobody translated into storage.StorageFull."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


async def _no_html_errors(response: Response[Any]) -> Response[Any]:
    """Litestar's OpenAPI router answers unknown /schema/* paths with an HTML page; clients get JSON errors."""
    if not isinstance(response, Response):
        return response  # files and streams: never an error page
    media_type = getattr(response.media_type, "value", response.media_type)
    if (response.status_code or 200) >= 400 and str(media_type).startswith("text/html"):
        return _error(response.status_code, _STATUS_CODES.get(response.status_code, "bad_request"),
                      "No such page.")
    return response


def _on_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
    if _disk_full(exc):
        log.error("%s %s failed: disk full (%s)", request.method, request.url.path, exc)
        return _error(507, "insufficient_storage", DISK_FULL)
    if isinstance(exc, RecursionError) and "deserializing" in str(exc):
        # msgspec's answer to JSON nested thousands deep, raised by Litestar's body parsing before any handler runs
        return _error(400, "bad_request", "The request body is not acceptable JSON: it is nested too deeply.")
    log.exception("%s %s raised", request.method, request.url.path, exc_info=exc)
    return _error(500, "internal_error", UNEXPECTED)


def _needed_scope(scope: Scope) -> str | None:
    """The key scope a request needs, or None for public routes (everything outside /api/v1)."""
    if not _is_api(scope["path"]):
        return None
    opt = scope["route_handler"].opt
    if "scope" in opt:
        return str(opt["scope"])
    return "read" if scope.get("method") in ("GET", "HEAD", "OPTIONS") else "write"


def _is_api(path: str) -> bool:
    path = normalize_path(path)  # as the router will see it: '//api/v1/models/' is '/api/v1/models'
    return path == "/api" or path.startswith("/api/")


_KEY_INFO = ASGI_SCOPE_KEY


async def _authenticate(scope: Scope) -> KeyInfo:
    """The request's valid key, after taking a rate-limit token; Unauthorized or RateLimited otherwise."""
    state = scope["litestar_app"].state
    registry: Registry = state.registry
    limiter: RateLimiter = state.rate_limiter
    header = ""
    for name, value in scope["headers"]:
        if name == b"authorization":
            header = value.decode("latin-1")
            break
    scheme, _, key = header.partition(" ")
    info = await registry.authenticate(key.strip()) if scheme.lower() == "bearer" else None
    # Failed attempts share one bucket: a client address is no identity (X-Forwarded-For is trusted from loopback).
    identity = f"key:{info.name}" if info else "anonymous"
    wait = limiter.hit(identity)
    if wait is not None:
        raise RateLimited(f"Too many requests; retry in {wait} s.", headers={"Retry-After": str(wait)})
    if info is None:
        raise Unauthorized("Send a valid API key as 'Authorization: Bearer <key>' "
                           "(create one with: octomil-lite keys create --name NAME).",
                           headers={"WWW-Authenticate": "Bearer"})
    return info


async def _send_error(scope: Scope, send: Send, exc: OctomilError) -> None:
    """Render an error outside Litestar's exception handling (before routing), in the same JSON shape."""
    body = msgspec.json.encode(ErrorBody(error=exc.code, message=exc.message))
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in exc.headers.items())]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})


def authenticate_first(app: ASGIApp) -> ASGIApp:
    """Check the key of every /api/ request before routing, so that nothing (not even whether a route or method
    exists) is answered to a caller without a valid key; scopes are checked after routing, by auth_middleware."""

    async def handler(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and "\x00" in scope["path"]:
            # no route takes a NUL, and the static files router would pass it to os.stat (a 500)
            await _send_error(scope, send, BadRequest("The request path contains a NUL character."))
            return
        if scope["type"] == "http" and _is_api(scope["path"]):
            try:
                scope[_KEY_INFO] = await _authenticate(scope)  # type: ignore[literal-required]
            except OctomilError as exc:
                await _send_error(scope, send, exc)
                return
            except Exception:  # outside Litestar's exception handling: render it here
                log.exception("authenticating %s %s raised", scope["method"], scope["path"])
                await _send_error(scope, send, OctomilError(UNEXPECTED))
                return
        await app(scope, receive, send)

    return handler


def auth_middleware(app: ASGIApp) -> ASGIApp:
    """The scope check for every /api/ route (the key was checked before routing, by authenticate_first)."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        needed = _needed_scope(scope) if scope["type"] == "http" else None
        if needed is None:
            await app(scope, receive, send)
            return
        info: KeyInfo = scope[_KEY_INFO]  # type: ignore[literal-required]  # set by authenticate_first
        if not scope_allows(info.scope, needed):
            raise Forbidden(f"The key '{info.name}' has scope '{info.scope}'; this request needs '{needed}'.")
        await app(scope, receive, send)

    return middleware


def create_app(config: Config) -> Litestar:
    """One registry application for one configuration."""

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        app.state.registry = await Registry.open(config)
        await app.state.registry.start()
        # What exists now (modules, Litestar's routes and signature models, the registry) lives as long as the
        # server: take it out of the cyclic GC's reach, so that a full collection under load scans only what
        # requests left behind (measured: ~16 ms of CPU per gen-2 collection, about one a second at 3,000 req/s,
        # becomes ~1.5 ms).
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()  # an app that stops (in tests, many do) leaves its objects collectable again
            await app.state.registry.close()

    def provide_registry(state: State) -> Registry:
        return state.registry  # type: ignore[no-any-return]

    app = Litestar(
        route_handlers=[health, ModelController, VersionLifecycleController, DeviceController, TrainingController,
                        import_bundle, signed_download, signed_put, *federation_routes, *web_routes],
        lifespan=[lifespan],
        state=State({"rate_limiter": RateLimiter(config.rate_limit), "conversions": available_conversions()}),
        dependencies={"registry": Provide(provide_registry, sync_to_thread=False)},
        middleware=[auth_middleware],
        exception_handlers={OctomilError: _on_octomil_error, HTTPException: _on_http_error,
                            Exception: _on_unexpected},
        after_request=_no_html_errors,
        request_max_body_size=REQUEST_MAX_BODY,
        openapi_config=openapi_config(),
        logging_config=None,
        debug=False,
    )
    api_docs.document(app.openapi_schema.paths or {})
    app.asgi_handler = authenticate_first(app.asgi_handler)
    return app
