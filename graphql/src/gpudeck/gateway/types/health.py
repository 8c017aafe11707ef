"""Health of the gRPC services behind the gateway: `health` as a query and as a subscription.

Both read `Backends.health()`: one round of checks shared by every caller and kept about a
second, as `health` needs no token. A subscription asks at most once a second (MIN_INTERVAL).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Mapping

import strawberry

from gpudeck.gateway.backends import ServingStatus
from gpudeck.gateway.context import Info
from gpudeck.gateway.errors import BAD_USER_INPUT, GatewayError

MIN_INTERVAL = 1.0  # the health cache's lifetime: asking more often shows nothing new
MAX_INTERVAL = 300.0

strawberry.enum(
    ServingStatus,
    description="A service's gRPC health, or UNREACHABLE when it did not answer in time.",
)


@strawberry.type(description="The health of one service, as its gRPC health check reports it.")
class ServiceHealth:
    service: str
    status: ServingStatus


def _as_list(statuses: Mapping[str, ServingStatus]) -> list[ServiceHealth]:
    return [ServiceHealth(service=s, status=status) for s, status in statuses.items()]


async def resolve_health(info: Info) -> list[ServiceHealth]:
    return _as_list(await info.context.backends.health())


async def watch_health(
    info: Info, interval_seconds: float = 5.0
) -> AsyncGenerator[list[ServiceHealth], None]:
    if not MIN_INTERVAL <= interval_seconds <= MAX_INTERVAL:
        raise GatewayError(
            f"intervalSeconds must be between {MIN_INTERVAL:g} and {MAX_INTERVAL:g},"
            f" got {interval_seconds:g}",
            code=BAD_USER_INPUT,
            field="intervalSeconds",
        )
    backends = info.context.backends
    last: dict[str, ServingStatus] | None = None
    while True:
        current = await backends.health()
        if current != last:
            last = current
            yield _as_list(current)
        await asyncio.sleep(interval_seconds)


@strawberry.type
class Query:
    health = strawberry.field(
        resolver=resolve_health, description="Each service's health, all checked at once."
    )


@strawberry.type
class Subscription:
    health = strawberry.subscription(
        resolver=watch_health,
        description=(
            "Each service's health now, then again every time it changes; "
            "checked every intervalSeconds (1 to 300)."
        ),
    )
