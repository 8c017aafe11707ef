"""The gateway's side of the gRPC services: one long-lived channel per service, and health.

Channels are opened once at start (`await open()`) and closed at shutdown (`await close()`);
resolvers borrow them through the request context and never open their own. They receive
answers up to MAX_ANSWER_BYTES (gRPC's default, 4 MiB, is less than the wallet sends for a
page of 500 usage records); a larger one fails as RESPONSE_TOO_LARGE (gpudeck.gateway.errors).

`health()` is the services' health shared by every caller: `health` needs no token, so it is
checked once for all callers at the same moment and kept HEALTH_TTL seconds.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Mapping

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gpudeck.kit.grpcclient import DEFAULT_TIMEOUT, channel

log = logging.getLogger(__name__)

_UNREACHABLE_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# The largest answer a channel takes: the services send without a limit, and a page of 500
# usage records with long dimensions is about 10 MB.
MAX_ANSWER_BYTES = 64 * 1024 * 1024
HEALTH_TTL = 1.0  # seconds one round of health checks answers every caller


class ServingStatus(enum.Enum):
    """What a service's gRPC health check says, or UNREACHABLE when it could not be asked."""

    SERVING = "SERVING"
    NOT_SERVING = "NOT_SERVING"
    UNKNOWN = "UNKNOWN"
    UNREACHABLE = "UNREACHABLE"


_FROM_PROTO = {
    health_pb2.HealthCheckResponse.SERVING: ServingStatus.SERVING,
    health_pb2.HealthCheckResponse.NOT_SERVING: ServingStatus.NOT_SERVING,
}


class Backends:
    """Channels to the services named in `addresses`, each sending the internal `token`.

    No work in the constructor: `await open()` creates the channels (they connect lazily, so a
    service that is down does not stop the gateway from starting), `await close()` closes them.
    """

    def __init__(
        self,
        addresses: Mapping[str, str],
        *,
        token: str,
        timeout: float = DEFAULT_TIMEOUT,
        health_timeout: float = 1.0,
        health_ttl: float = HEALTH_TTL,
        max_receive_bytes: int = MAX_ANSWER_BYTES,
    ) -> None:
        self.addresses = dict(addresses)
        self._token = token
        self._timeout = timeout
        self.health_timeout = health_timeout
        self.health_ttl = health_ttl
        self.max_receive_bytes = max_receive_bytes
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._health: dict[str, ServingStatus] | None = None
        self._health_at = 0.0  # time.monotonic() when _health was checked
        self._health_check: asyncio.Task[dict[str, ServingStatus]] | None = None

    @property
    def services(self) -> list[str]:
        return list(self.addresses)

    async def open(self) -> None:
        options = [("grpc.max_receive_message_length", self.max_receive_bytes)]
        for service, addr in self.addresses.items():
            self._channels[service] = channel(
                addr, self._token, timeout=self._timeout, options=options
            )

    async def close(self, grace: float | None = None) -> None:
        if self._health_check is not None:
            self._health_check.cancel()
        channels, self._channels = self._channels, {}
        await asyncio.gather(*(ch.close(grace) for ch in channels.values()))

    def channel(self, service: str) -> grpc.aio.Channel:
        """The open channel to `service`; KeyError for a service the gateway does not know."""
        try:
            return self._channels[service]
        except KeyError:
            if service in self.addresses:
                raise RuntimeError("Backends used before open() or after close()") from None
            raise

    async def check(self, service: str) -> ServingStatus:
        """grpc.health.v1 Check of the whole server (service "") with a short deadline."""
        stub = health_pb2_grpc.HealthStub(self.channel(service))
        try:
            response = await stub.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=self.health_timeout
            )
        except grpc.aio.AioRpcError as exc:
            unreachable = exc.code() in _UNREACHABLE_CODES
            log.debug(
                "health check failed",
                extra={"target": service, "code": exc.code().name, "details": exc.details()},
            )
            return ServingStatus.UNREACHABLE if unreachable else ServingStatus.UNKNOWN
        return _FROM_PROTO.get(response.status, ServingStatus.UNKNOWN)

    async def check_all(self) -> dict[str, ServingStatus]:
        """Every service's health, checked concurrently, in the order of `addresses`."""
        statuses = await asyncio.gather(*(self.check(s) for s in self.addresses))
        return dict(zip(self.addresses, statuses, strict=True))

    async def health(self) -> dict[str, ServingStatus]:
        """`check_all`, shared: callers at the same moment wait for one round of checks, and its
        answer serves everyone for `health_ttl` seconds after. Without this, `health` (no token
        needed) in 30 aliases, or in many subscriptions of one socket, costs a check of every
        service each time. A caller that gives up does not cancel the others' round."""
        if self._health is not None and time.monotonic() - self._health_at < self.health_ttl:
            return self._health
        if self._health_check is None:
            self._health_check = asyncio.create_task(self._check_and_keep())
        return await asyncio.shield(self._health_check)

    async def _check_and_keep(self) -> dict[str, ServingStatus]:
        try:
            statuses = await self.check_all()
            self._health, self._health_at = statuses, time.monotonic()
            return statuses
        finally:
            self._health_check = None
