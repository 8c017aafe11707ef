"""/graphql: Strawberry's aiohttp view with our context (the caller is authenticated lazily, by
the fields that need it: only `health` needs no token), our GraphiQL page and
websocket bookkeeping (so shutdown can close them all).

Websockets speak graphql-transport-ws and the legacy graphql-ws; pages on other origins may not
open one (Strawberry's default).
"""

from __future__ import annotations

import weakref
from datetime import timedelta

from aiohttp import WSCloseCode, web
from strawberry.aiohttp.views import GraphQLView
from strawberry.schema import BaseSchema
from strawberry.subscriptions import GRAPHQL_TRANSPORT_WS_PROTOCOL, GRAPHQL_WS_PROTOCOL

from gpudeck.gateway import graphiql
from gpudeck.gateway.auth import Authenticator
from gpudeck.gateway.backends import Backends
from gpudeck.gateway.context import Context
from gpudeck.gateway.live import LiveEvents
from gpudeck.gateway.metrics import WEBSOCKETS

KEEP_ALIVE_INTERVAL = 10.0
CONNECTION_INIT_TIMEOUT = timedelta(seconds=10)
MAX_SUBSCRIPTIONS_PER_CONNECTION = 50


class GatewayView(GraphQLView[Context, None]):
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
            max_subscriptions_per_connection=MAX_SUBSCRIPTIONS_PER_CONNECTION,
        )
        self.backends = backends
        self.auth = auth
        self.live = live
        self.websockets: weakref.WeakSet[web.WebSocketResponse] = weakref.WeakSet()

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
        ws = await super().create_websocket_response(request, subprotocol)
        self.websockets.add(ws)
        return ws

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        if not self.is_websocket_request(request):
            return await super().__call__(request)
        gauge = WEBSOCKETS.labels(await self.pick_websocket_subprotocol(request) or "none")
        gauge.inc()
        try:
            return await super().__call__(request)
        finally:
            gauge.dec()

    async def close_websockets(self) -> None:
        """Close every open websocket with 1001 (going away): the gateway is shutting down."""
        for ws in list(self.websockets):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")
