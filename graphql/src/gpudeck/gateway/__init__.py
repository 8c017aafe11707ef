"""The GraphQL gateway: one Strawberry schema over the gRPC services, served with aiohttp.

`make_app(Settings.from_env())` builds the aiohttp application; `python -m gpudeck.gateway`
runs it until SIGTERM or SIGINT.
"""

from gpudeck.gateway.app import make_app
from gpudeck.gateway.backends import Backends, ServingStatus
from gpudeck.gateway.config import Settings

__all__ = ["Backends", "ServingStatus", "Settings", "make_app"]
