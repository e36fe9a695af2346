"""The registry's web page and its API docs, served from files inside the package so they work with no network."""

from __future__ import annotations

from pathlib import Path

from litestar import MediaType, Response, get
from litestar.datastructures import CacheControlHeader
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin, YamlRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme
from litestar.static_files import create_static_files_router

from .. import __version__

WEB_DIR = Path(__file__).with_name("web")
ASSETS = "/static"

# The page holds no data and talks only to this server; the browser enforces that too.
_PAGE_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
                               "base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


@get("/", include_in_schema=False, sync_to_thread=False)
def index() -> Response[bytes]:
    return Response((WEB_DIR / "index.html").read_bytes(), media_type=MediaType.HTML, headers=_PAGE_HEADERS)


assets = create_static_files_router(path=ASSETS, directories=[WEB_DIR], name="web-assets",
                                    cache_control=CacheControlHeader(no_cache=True))

route_handlers = [index, assets]


def openapi_config() -> OpenAPIConfig:
    """Swagger UI at /schema (and /schema/swagger) with every asset served from ASSETS; schema as JSON and YAML."""
    docs = SwaggerRenderPlugin(
        path=["/", "/swagger"],
        js_url=f"{ASSETS}/vendor/swagger-ui-bundle.js",
        css_url=f"{ASSETS}/vendor/swagger-ui.css",
        standalone_preset_js_url=f"{ASSETS}/vendor/swagger-ui-standalone-preset.js",
        favicon=f"<link rel='icon' type='image/svg+xml' href='{ASSETS}/favicon.svg'>",
    )
    return OpenAPIConfig(
        title="octomil-lite",
        version=__version__,
        path="/schema",
        render_plugins=[docs, YamlRenderPlugin()],
        components=Components(security_schemes={"apiKey": SecurityScheme(
            type="http", scheme="bearer", description="An API key: octomil-lite keys create --name NAME")}),
        security=[{"apiKey": []}],
    )
