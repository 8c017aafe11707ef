"""GraphiQL for admins, served entirely by the gateway: our page at GET /graphql (for a browser)
and GraphiQL's JS/CSS at /graphiql/static/ (see static/THIRD_PARTY_LICENSES.txt).

The page's Content-Security-Policy lets it load and connect only to the gateway itself.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from aiohttp import web

STATIC_PREFIX = "/graphiql/static"
CSP = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self' 'unsafe-inline'",  # CodeMirror and GraphiQL set inline styles
        "font-src 'self' data:",  # graphiql.min.css embeds its fonts
        "img-src 'self' data:",
        "connect-src 'self'",  # /graphql over HTTP and websockets
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)


def static_dir() -> str:
    return str(resources.files("gpudeck.gateway") / "static")


@cache
def _html() -> str:
    return (resources.files("gpudeck.gateway") / "graphiql.html").read_text(encoding="utf-8")


def page() -> web.Response:
    return web.Response(
        text=_html(),
        content_type="text/html",
        headers={
            "Content-Security-Policy": CSP,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-cache",
        },
    )


def add_routes(app: web.Application) -> None:
    """Serve the files of static/ (no directory listing) at STATIC_PREFIX."""
    app.router.add_static(STATIC_PREFIX, static_dir(), show_index=False, follow_symlinks=False)
