"""Strawberry's websocket handlers, made to keep the gateway's rules on both subprotocols:

- a connection that sends no connection_init within CONNECTION_INIT_TIMEOUT is closed with 4408
  (Strawberry does so for graphql-transport-ws only: a legacy graphql-ws socket without a token
  stayed open for as long as its client answered pings);
- an operation past MAX_OPERATIONS on one connection is an error with extensions.code
  RATE_LIMITED (Strawberry's own had no code).
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from typing import Any

from graphql import GraphQLError, GraphQLFormattedError
from strawberry.subscriptions.protocols.graphql_transport_ws import types as transport_ws
from strawberry.subscriptions.protocols.graphql_transport_ws.handlers import (
    BaseGraphQLTransportWSHandler,
)
from strawberry.subscriptions.protocols.graphql_ws import types as graphql_ws
from strawberry.subscriptions.protocols.graphql_ws.handlers import BaseGraphQLWSHandler

from gpudeck.gateway.errors import RATE_LIMITED

CONNECTION_INIT_TIMEOUT = timedelta(seconds=10)
MAX_OPERATIONS = 50  # operations (subscriptions, and queries sent over the socket) at once


def too_many() -> GraphQLFormattedError:
    return GraphQLError(
        f"at most {MAX_OPERATIONS} operations at once on one connection",
        extensions={"code": RATE_LIMITED},
    ).formatted


class TransportWSHandler(BaseGraphQLTransportWSHandler[Any, None]):
    """graphql-transport-ws."""

    async def handle_subscribe(self, message: transport_ws.SubscribeMessage) -> None:
        if (
            self.connection_acknowledged
            and message["id"] not in self.operations
            and len(self.operations) >= MAX_OPERATIONS
        ):
            await self.send_message(
                transport_ws.ErrorMessage(id=message["id"], type="error", payload=[too_many()])
            )
            return
        await super().handle_subscribe(message)


class LegacyWSHandler(BaseGraphQLWSHandler[Any, None]):
    """graphql-ws (the legacy subprotocol of subscriptions-transport-ws)."""

    async def handle(self) -> None:
        timeout = asyncio.create_task(self._close_unless_initialised())
        try:
            await super().handle()
        finally:
            timeout.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await timeout

    async def _close_unless_initialised(self) -> None:
        await asyncio.sleep(CONNECTION_INIT_TIMEOUT.total_seconds())
        if not self.connection_acknowledged:
            await self.websocket.close(code=4408, reason="Connection initialisation timeout")

    async def handle_start(self, message: graphql_ws.StartMessage) -> None:
        if (
            self.connection_acknowledged
            and message["id"] not in self.tasks
            and len(self.tasks) >= MAX_OPERATIONS
        ):
            await self.send_message(
                graphql_ws.ErrorMessage(type="error", id=message["id"], payload=too_many())
            )
            return
        await super().handle_start(message)
