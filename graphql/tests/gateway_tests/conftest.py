"""Fixtures of the gateway's tests: five real gRPC servers and the gateway in front of them.

`fleet` starts a KitServer per service on 127.0.0.1:0 (health, reflection, the kit's
interceptor: the real thing, with no domain servicers); `gateway` serves the aiohttp app on
127.0.0.1 with channels to them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp.test_utils import TestClient, TestServer
from grpc_health.v1 import health_pb2

from gpudeck.gateway import Settings, make_app
from gpudeck.kit.config import SERVICES
from gpudeck.kit.grpcserver import KitServer

TOKEN = "test-service-token"


@dataclass
class Fleet:
    """The five services' servers; `addresses` is what the gateway is configured with."""

    servers: dict[str, KitServer] = field(default_factory=dict)
    addresses: dict[str, str] = field(default_factory=dict)

    async def set_status(self, service: str, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.servers[service].health.set("", status)

    async def stop(self, service: str) -> None:
        await self.servers[service].stop(0)


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    fleet = Fleet()
    for service in SERVICES:
        server = KitServer(service, "127.0.0.1:0", token=TOKEN)
        port = await server.start()
        fleet.servers[service] = server
        fleet.addresses[service] = f"127.0.0.1:{port}"
    yield fleet
    await asyncio.gather(*(s.stop(0) for s in fleet.servers.values()))


def settings_for(addresses: dict[str, str], *, health_timeout: float = 1.0) -> Settings:
    return Settings(
        service_token=TOKEN,
        listen="127.0.0.1:0",
        service_addresses=addresses,
        health_timeout=health_timeout,
    )


@pytest.fixture
async def start_gateway() -> AsyncIterator[Callable[..., Awaitable[TestClient]]]:
    """Start a gateway for `addresses` on 127.0.0.1; each is closed at the end of the test."""
    clients: list[TestClient] = []

    async def start(addresses: dict[str, str], *, health_timeout: float = 1.0) -> TestClient:
        app = make_app(settings_for(addresses, health_timeout=health_timeout))
        client = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        clients.append(client)
        return client

    yield start
    for client in clients:
        await client.close()


@pytest.fixture
async def gateway(fleet: Fleet, start_gateway: Callable[..., Awaitable[TestClient]]) -> TestClient:
    """A gateway in front of `fleet`, with its test client (`make_url`, `ws_connect`, ...)."""
    return await start_gateway(fleet.addresses)
