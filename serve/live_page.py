"""The live page: static HTML, CSS and JavaScript that speak the public API.

The page holds no secrets and no server-side state; it reads the balance and
the network over HTTP with the user's token and follows `/v1/live` like any
other client. Files are read once, at import, so serving them is a lookup.
"""

from __future__ import annotations

from importlib.resources import files

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

# The page loads only its own script and style and talks only to its own
# origin ('self' covers ws:// and wss:// to it): an injected script or a
# framing page gets nowhere near the token.
_SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                                "img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
_ASSETS = {  # path -> (file under static/, media type)
    "/live": ("live.html", "text/html; charset=utf-8"),
    "/live/live.js": ("live.js", "text/javascript; charset=utf-8"),
    "/live/live.css": ("live.css", "text/css; charset=utf-8"),
    "/live/favicon.svg": ("favicon.svg", "image/svg+xml"),
}


def live_page_routes() -> list[Route]:
    static = files(__package__) / "static"
    routes = []
    for path, (name, media_type) in _ASSETS.items():
        body = (static / name).read_bytes()

        async def serve_asset(request: Request, body: bytes = body, media_type: str = media_type) -> Response:
            return Response(body, media_type=media_type, headers=_SECURITY_HEADERS)

        routes.append(Route(path, serve_asset, methods=["GET", "HEAD"], name=f"live_page:{name}"))
    return routes
