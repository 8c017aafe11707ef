"""/graphql: Strawberry's aiohttp view with our context (the caller is authenticated lazily, by
the fields that need it: only `health` needs no token), our GraphiQL page and
websocket bookkeeping (so shutdown can close them all).

Websockets speak graphql-transport-ws and the legacy graphql-ws; pages on other origins may not
open one (Strawberry's default). A connection_init with a token that is not valid, or an
`Authorization` that is not `Bearer <token>`, is refused (graphql-transport-ws: 4403, graphql-ws:
connection_error); one with no token is accepted, for `health`. The server pings
every websocket (HEARTBEAT) and closes one that stops answering, so a vanished client does not
hold its subscriptions; one that sends no connection_init within 10 s is closed (4408), and an
operation past 50 at once on one socket is an error with code RATE_LIMITED (websockets.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from typing import Any

from aiohttp import WSCloseCode, web
from cross_web import HTTPException
from strawberry.aiohttp.views import GraphQLView
from strawberry.exceptions import ConnectionRejectionError
from strawberry.schema import BaseSchema
from strawberry.subscriptions import GRAPHQL_TRANSPORT_WS_PROTOCOL, GRAPHQL_WS_PROTOCOL

from gpudeck.gateway import graphiql
from gpudeck.gateway.auth import Authenticator
from gpudeck.gateway.backends import Backends
from gpudeck.gateway.context import Context
from gpudeck.gateway.errors import BAD_REQUEST, UNAUTHENTICATED, GatewayError
from gpudeck.gateway.live import LiveEvents
from gpudeck.gateway.metrics import WEBSOCKETS
from gpudeck.gateway.websockets import CONNECTION_INIT_TIMEOUT, LegacyWSHandler, TransportWSHandler

log = logging.getLogger(__name__)

KEEP_ALIVE_INTERVAL = 10.0
HEARTBEAT = 30.0  # seconds between websocket pings; no pong within half of it closes the socket
CLOSE_TIMEOUT = 2.0  # seconds a websocket gets to close at shutdown before it is cut
# The largest request body the gateway reads (aiohttp's default): larger is REQUEST_TOO_LARGE.
MAX_BODY_BYTES = 1024 * 1024


class GatewayView(GraphQLView[Context, None]):
    graphql_transport_ws_handler_class = TransportWSHandler
    graphql_ws_handler_class = LegacyWSHandler

    def __init__(
        self,
        schema: BaseSchema,
        backends: Backends,
        auth: Authenticator,
        live: LiveEvents | None = None,
    ) -> None:
        super().__init__(
            schema,
            graphql_ide="graphiql",  # rendered by render_graphql_ide below, from our own files
            keep_alive=True,
            keep_alive_interval=KEEP_ALIVE_INTERVAL,
            subscription_protocols=(GRAPHQL_TRANSPORT_WS_PROTOCOL, GRAPHQL_WS_PROTOCOL),
            connection_init_wait_timeout=CONNECTION_INIT_TIMEOUT,
            # Counted by the handlers (websockets.py), which answer with an error code.
            max_subscriptions_per_connection=None,
        )
        self.backends = backends
        self.auth = auth
        self.live = live
        # Open websockets and their requests (whose transport a stuck one is cut by).
        self.websockets: weakref.WeakKeyDictionary[web.WebSocketResponse, web.Request] = (
            weakref.WeakKeyDictionary()
        )

    async def get_context(
        self, request: web.Request, response: web.Response | web.WebSocketResponse
    ) -> Context:
        return Context(
            request=request,
            response=response,
            backends=self.backends,
            auth=self.auth,
            live=self.live,
        )

    async def render_graphql_ide(self, request: web.Request) -> web.Response:
        return graphiql.page()

    async def create_websocket_response(
        self, request: web.Request, subprotocol: str | None
    ) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(
            protocols=[subprotocol] if subprotocol else [], heartbeat=HEARTBEAT
        )
        await ws.prepare(request)
        self.websockets[ws] = request
        return ws

    async def on_ws_connect(self, context: Context) -> Any:
        """Refuse a connection_init whose token is not valid (none is fine: `health`). An
        `Authorization` that is not `Bearer <token>`, in the payload or (without one there) in
        the handshake's header, is refused the same way: reading the token raises
        UNAUTHENTICATED, which must not escape as a crash of the socket. One connection_init
        per connection, on graphql-ws too (as graphql-transport-ws has it): the legacy handler
        took more, each with a keep-alive task of its own, and an invalid token in the second
        was acknowledged (the first one's identity stood)."""
        if context.connection_acknowledged:
            raise ConnectionRejectionError({"message": "one connection_init per connection"})
        context.forget_identity()
        try:
            if context.token:
                await context.identity()
        except GatewayError as exc:
            if exc.code == UNAUTHENTICATED:
                raise ConnectionRejectionError({"message": str(exc)}) from None
        except Exception as exc:  # the wallet unreachable: each operation will say so
            log.info("token not checked at connection_init", extra={"error": repr(exc)})
        context.connection_acknowledged = True
        return await super().on_ws_connect(context)

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        if not self.is_websocket_request(request):
            try:
                return await self.run(request=request)
            except HTTPException as exc:  # no GraphQL request at all: still a GraphQL error
                error = {"message": exc.reason, "extensions": {"code": BAD_REQUEST}}
                return web.json_response({"errors": [error]}, status=exc.status_code)
            except web.HTTPRequestEntityTooLarge as exc:  # aiohttp's client_max_size
                error = {
                    "message": f"the request body is larger than {MAX_BODY_BYTES} bytes",
                    "extensions": {"code": "REQUEST_TOO_LARGE"},
                }
                return web.json_response({"errors": [error]}, status=exc.status)
        gauge = WEBSOCKETS.labels(await self.pick_websocket_subprotocol(request) or "none")
        gauge.inc()
        try:
            return await super().__call__(request)
        finally:
            gauge.dec()

    async def close_websockets(self) -> None:
        """Close every open websocket with 1001 (going away), all at once: the gateway is
        shutting down. One whose client does not read is cut after CLOSE_TIMEOUT."""

        async def close(ws: web.WebSocketResponse, request: web.Request) -> None:
            try:
                await asyncio.wait_for(
                    ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down"),
                    CLOSE_TIMEOUT,
                )
            except (TimeoutError, ConnectionError):
                if request.transport is not None:
                    request.transport.abort()

        with contextlib.suppress(Exception):
            await asyncio.gather(*(close(ws, r) for ws, r in list(self.websockets.items())))
