"""The gateway's aiohttp application: routes, and what opens at start and closes at shutdown.

/graphql               GraphQL over POST and GET, websockets, and GraphiQL for a browser
/invoices/{id}.pdf     an invoice as a PDF (same Authorization as /graphql)
/graphiql/static/...   GraphiQL's JS and CSS
/healthz               200 {"status": "ok"} while the gateway is up
/metrics               Prometheus metrics
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gpudeck.gateway import graphiql, invoices
from gpudeck.gateway.auth import Authenticator
from gpudeck.gateway.backends import Backends
from gpudeck.gateway.config import Settings
from gpudeck.gateway.live import LiveEvents
from gpudeck.gateway.metrics import handle_metrics
from gpudeck.gateway.schema import build_schema
from gpudeck.gateway.view import MAX_BODY_BYTES, GatewayView

BACKENDS = web.AppKey("backends", Backends)
VIEW = web.AppKey("view", GatewayView)
LIVE = web.AppKey("live", LiveEvents)


async def handle_healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


class ClientsBadHttp(logging.Filter):
    """A request that is not HTTP as it should be (`Content-Length: abc`), or a client gone
    before its body came, is the client's doing: aiohttp logged it at ERROR with a traceback,
    and anyone could fill the error log with them. Said at INFO, in one line (aiohttp still
    answers a bad request 400)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError | ConnectionResetError):
            said = error.message if isinstance(error, HttpProcessingError) else str(error)
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = "bad HTTP request: %s", (said or type(error).__name__,)
            record.exc_info, record.exc_text = None, None
        return True


def quiet_clients_bad_http() -> None:
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, ClientsBadHttp) for f in server.filters):
        server.addFilter(ClientsBadHttp())


def make_app(settings: Settings, *, backends: Backends | None = None) -> web.Application:
    """The application for `settings`; channels and the NATS connection open on start-up and
    close on clean-up.

    Run it with aiohttp's AppRunner (see gpudeck.gateway.__main__) or a test server.
    """
    quiet_clients_bad_http()
    if backends is None:
        backends = Backends(
            settings.service_addresses,
            token=settings.service_token,
            health_timeout=settings.health_timeout,
        )
    auth = Authenticator(backends, admin_token=settings.admin_token)
    live = LiveEvents(settings.events) if settings.events is not None else None
    view = GatewayView(build_schema(), backends, auth, live)
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[BACKENDS] = backends
    app[VIEW] = view
    if live is not None:
        app[LIVE] = live
    app.router.add_route("GET", "/graphql", view)
    app.router.add_route("POST", "/graphql", view)
    app.router.add_get(invoices.PATH, invoices.handler(backends, auth))
    app.router.add_get("/healthz", handle_healthz)
    app.router.add_get("/metrics", handle_metrics)
    graphiql.add_routes(app)

    async def channels(app: web.Application) -> AsyncIterator[None]:
        await app[BACKENDS].open()
        if live is not None:
            await live.start()
        yield
        if live is not None:
            await live.close()
        await app[BACKENDS].close(grace=1.0)

    async def close_websockets(app: web.Application) -> None:
        await app[VIEW].close_websockets()

    app.cleanup_ctx.append(channels)
    app.on_shutdown.append(close_websockets)
    return app
