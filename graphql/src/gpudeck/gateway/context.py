"""What every resolver gets as `info.context`, built once per HTTP request or websocket.

Later: the caller's identity (auth) and per-request DataLoaders go here, built in
`GatewayView.get_context`; subscriptions make fresh DataLoaders per event.
"""

from __future__ import annotations

from dataclasses import dataclass

import strawberry
from aiohttp import web

from gpudeck.gateway.backends import Backends


@dataclass
class Context:
    """The request (for a websocket: the handshake), its response, and the service channels."""

    request: web.Request
    response: web.StreamResponse
    backends: Backends


Info = strawberry.Info[Context, None]
