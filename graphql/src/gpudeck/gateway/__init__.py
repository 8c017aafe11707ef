"""The GraphQL gateway: one Strawberry schema over the gRPC services, served with aiohttp.

`make_app(Settings.from_env())` builds the aiohttp application; `python -m gpudeck.gateway`
runs it until SIGTERM or SIGINT. The names below load on first use, so reading the settings
(`gpudeck.gateway.config`, as `gpudeck up` does before it starts anything) costs no schema.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gpudeck.gateway.app import make_app
    from gpudeck.gateway.backends import Backends, ServingStatus
    from gpudeck.gateway.config import Settings

__all__ = ["Backends", "ServingStatus", "Settings", "make_app"]


def __getattr__(name: str) -> Any:
    if name == "make_app":
        from gpudeck.gateway.app import make_app

        return make_app
    if name in ("Backends", "ServingStatus"):
        from gpudeck.gateway import backends

        return getattr(backends, name)
    if name == "Settings":
        from gpudeck.gateway.config import Settings

        return Settings
    raise AttributeError(f"module 'gpudeck.gateway' has no attribute {name!r}")
