"""The web playground: GET / is the page, GET /playground/<asset> its script, style and
icon. Static files shipped in the package (server/playground/); no build step, nothing
fetched from anywhere but this server. The page itself needs no API key; the API calls it
makes send the key the user types. Left out of the app with --no-playground."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

from .errors import APIError

PLAYGROUND_DIR = Path(__file__).parent / "playground"
PAGE_PATH = "/"
ASSET_PREFIX = "/playground/"
PAGE = "index.html"
MEDIA_TYPES = {
    PAGE: "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
# The page runs only its own script and style and talks only to this server: an injected
# token text could not load or send anything elsewhere even if it reached the DOM as HTML.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Small files: revalidating costs nothing and an upgraded server is seen at once.
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@cache
def _read(name: str) -> bytes:
    return (PLAYGROUND_DIR / name).read_bytes()


def _file(name: str) -> Response:
    return Response(_read(name), media_type=MEDIA_TYPES[name], headers=HEADERS)


@router.get(PAGE_PATH)
async def page() -> Response:
    return _file(PAGE)


@router.get(ASSET_PREFIX + "{name}")
async def asset(name: str) -> Response:
    if name not in MEDIA_TYPES or name == PAGE:
        raise APIError(404, f"no playground file {name!r}", code="not_found")
    return _file(name)
