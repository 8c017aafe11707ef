"""The gateway's side of the gRPC services: one long-lived channel per service, and health.

Channels are opened once at start (`await open()`) and closed at shutdown (`await close()`);
resolvers borrow them through the request context and never open their own.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Mapping

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gpudeck.kit.grpcclient import DEFAULT_TIMEOUT, channel

log = logging.getLogger(__name__)

_UNREACHABLE_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


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
    ) -> None:
        self.addresses = dict(addresses)
        self._token = token
        self._timeout = timeout
        self.health_timeout = health_timeout
        self._channels: dict[str, grpc.aio.Channel] = {}

    @property
    def services(self) -> list[str]:
        return list(self.addresses)

    async def open(self) -> None:
        for service, addr in self.addresses.items():
            self._channels[service] = channel(addr, self._token, timeout=self._timeout)

    async def close(self, grace: float | None = None) -> None:
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
