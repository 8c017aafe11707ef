"""Fixtures of the gateway's tests: five real gRPC servers and the gateway in front of them;
the real wallet service and a gateway in front of it.

`fleet` starts a KitServer per service on 127.0.0.1:0 (health, reflection, the kit's
interceptor: the real thing, with no domain servicers); `gateway` serves the aiohttp app on
127.0.0.1 with channels to them. `wallet_service` runs the wallet (this run's database and NATS
stream), `wallet_gateway` a gateway in front of it with live events, `new_org` makes an
organization and its owner token.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from grpc_health.v1 import health_pb2

from gpudeck.gateway import Settings, make_app
from gpudeck.gateway.app import LIVE
from gpudeck.kit.config import SERVICES, EventsConfig
from gpudeck.kit.grpcserver import KitServer

TOKEN = "test-service-token"


@dataclass(frozen=True)
class Org:
    """An organization made for a test: its id, its owner's token, email and user id."""

    id: str
    token: str
    email: str
    user_id: str


@dataclass(frozen=True)
class Stubs:
    accounts: Any
    wallet: Any


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


# ---------------------------------------------------------------------------------- the wallet
#
# The real wallet service in this process (this run's database, NATS stream and subject
# prefix), and a gateway in front of it with live events on.

WALLET_TOKEN = "gateway-wallet-test-token"
ADMIN_TOKEN = "gateway-platform-admin-test-token"  # the wallet gateway's GPUDECK_ADMIN_TOKEN


@pytest.fixture(scope="session")
async def wallet_service(database_url: str, events_config: EventsConfig) -> AsyncIterator[Any]:
    from gpudeck.kit.config import ServiceConfig
    from gpudeck.kit.runtime import RunningService
    from gpudeck.wallet.service import SPEC

    config = ServiceConfig(
        service="wallet",
        database_url=database_url,
        events=events_config,
        grpc_listen="127.0.0.1:0",
        metrics_listen="127.0.0.1:0",
        service_token=WALLET_TOKEN,
        shutdown_grace=2,
        db_pool_size=6,
    )
    running = RunningService(SPEC, config, {"GPUDECK_BILLING_INTERVAL": "1"})
    await running.start()
    yield running
    await running.stop()


@pytest.fixture(scope="session")
async def wallet_address(wallet_service: Any) -> str:
    return f"127.0.0.1:{wallet_service.port}"


@pytest.fixture(scope="session")
async def wallet_stubs(wallet_address: str) -> AsyncIterator[Stubs]:
    """The wallet's gRPC services, called directly (setting up what the gateway may not)."""
    from gpudeck.kit.grpcclient import channel
    from gpudeck.proto.wallet.v1 import account_pb2_grpc, wallet_pb2_grpc

    async with channel(wallet_address, WALLET_TOKEN) as ch:
        yield Stubs(
            accounts=account_pb2_grpc.AccountServiceStub(ch),
            wallet=wallet_pb2_grpc.WalletServiceStub(ch),
        )


@pytest.fixture(scope="session")
async def wallet_gateway(
    wallet_address: str, events_config: EventsConfig
) -> AsyncIterator[TestClient]:
    """A gateway in front of the real wallet, listening for live events on this run's NATS."""
    settings = Settings(
        service_token=WALLET_TOKEN,
        listen="127.0.0.1:0",
        service_addresses={"wallet": wallet_address},
        events=events_config,
        admin_token=ADMIN_TOKEN,
    )
    app = make_app(settings)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    live = app[LIVE]
    assert await live.wait_connected(10), "the gateway did not reach NATS"
    yield client
    await client.close()


@pytest.fixture
def new_org(wallet_stubs: Stubs) -> Callable[..., Awaitable[Org]]:
    """Make an organization (KYC-verified) through the wallet; returns its id and owner token."""
    from gpudeck.proto.wallet.v1 import account_pb2

    async def make(currency: str = "USD", name: str = "Acme", *, verified: bool = True) -> Org:
        email = f"owner-{uuid.uuid4().hex[:10]}@example.com"
        created = await wallet_stubs.accounts.CreateOrganization(
            account_pb2.CreateOrganizationRequest(
                name=name, currency=currency, owner_email=email, owner_name="Olive Owner"
            )
        )
        org = created.organization.id
        if verified:
            await wallet_stubs.accounts.SetKycStatus(
                account_pb2.SetKycStatusRequest(organization_id=org, kyc_status="verified")
            )
        return Org(
            id=org, token=created.owner_token, email=email, user_id=created.organization.owner.id
        )

    return make


class Gql:
    """GraphQL over real HTTP to a gateway, as a client with a bearer token sends it."""

    def __init__(self, client: TestClient) -> None:
        self.client = client

    async def __call__(
        self,
        query: str,
        variables: dict[str, Any] | None = None,
        *,
        token: str | None = None,
        headers: dict[str, str] | None = None,
        operation_name: str | None = None,
    ) -> dict[str, Any]:
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        payload = {"query": query, "variables": variables or {}, "operationName": operation_name}
        resp = await self.client.post("/graphql", json=payload, headers=sent)
        assert resp.status == 200, await resp.text()
        body: dict[str, Any] = await resp.json()
        return body

    async def data(
        self, query: str, variables: dict[str, Any] | None = None, *, token: str
    ) -> dict[str, Any]:
        """The data of a query that must succeed."""
        body = await self(query, variables, token=token)
        assert "errors" not in body, body["errors"]
        data: dict[str, Any] = body["data"]
        return data

    async def error(
        self,
        query: str,
        variables: dict[str, Any] | None = None,
        *,
        token: str | None,
        headers: dict[str, str] | None = None,
        operation_name: str | None = None,
    ) -> dict[str, Any]:
        """The one error of a query that must fail."""
        body = await self(
            query, variables, token=token, headers=headers, operation_name=operation_name
        )
        assert body.get("errors"), body
        assert len(body["errors"]) == 1, body["errors"]
        error: dict[str, Any] = body["errors"][0]
        return error


@pytest.fixture
def gql(wallet_gateway: TestClient) -> Gql:
    return Gql(wallet_gateway)


@pytest.fixture
def no_rate_in_effect(database_url: str) -> Callable[[], contextlib.AbstractContextManager[None]]:
    """A block in which no exchange rate is in effect (all dated a century ahead, then back)."""

    @contextlib.contextmanager
    def block() -> Iterator[None]:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("UPDATE wallet.exchange_rates SET as_of = as_of + interval '100 years'")
        try:
            yield
        finally:
            with psycopg.connect(database_url, autocommit=True) as conn:
                conn.execute(
                    "UPDATE wallet.exchange_rates SET as_of = as_of - interval '100 years'"
                )

    return block
