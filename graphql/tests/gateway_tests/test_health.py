"""The `health` query over HTTP, against real gRPC servers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from gpudeck.gateway.app import BACKENDS
from gpudeck.gateway.backends import Backends, ServingStatus
from gpudeck.gateway.schema import MAX_ALIASES

HEALTH = "{ health { service status } }"


async def post(client: TestClient, query: str, **variables: Any) -> dict[str, Any]:
    resp = await client.post("/graphql", json={"query": query, "variables": variables})
    assert resp.status == 200, await resp.text()
    assert resp.content_type == "application/json"
    body: dict[str, Any] = await resp.json()
    return body


def statuses(body: dict[str, Any]) -> dict[str, str]:
    return {h["service"]: h["status"] for h in body["data"]["health"]}


async def test_health_reports_each_service_in_order(fleet, gateway) -> None:
    await fleet.set_status("storage", serving=False)
    await fleet.stop("node-agent")
    body = await post(gateway, HEALTH)
    assert "errors" not in body
    assert [h["service"] for h in body["data"]["health"]] == [
        "wallet",
        "compute",
        "storage",
        "activity",
        "node-agent",
    ]
    assert statuses(body) == {
        "wallet": "SERVING",
        "compute": "SERVING",
        "storage": "NOT_SERVING",
        "activity": "SERVING",
        "node-agent": "UNREACHABLE",
    }


async def test_health_follows_a_service_that_changes(fleet, gateway) -> None:
    gateway.app[BACKENDS].health_ttl = 0.2  # the cache's lifetime, shortened for the test
    assert statuses(await post(gateway, HEALTH))["wallet"] == "SERVING"
    await fleet.set_status("wallet", serving=False)
    assert statuses(await post(gateway, HEALTH))["wallet"] == "SERVING"  # still the cached one
    await asyncio.sleep(0.25)
    assert statuses(await post(gateway, HEALTH))["wallet"] == "NOT_SERVING"
    await fleet.set_status("wallet", serving=True)
    await asyncio.sleep(0.25)
    assert statuses(await post(gateway, HEALTH))["wallet"] == "SERVING"


def count_checks(backends: Backends) -> list[str]:
    """The services `backends` checks from now on, one entry per gRPC health check."""
    checked: list[str] = []
    check = backends.check

    async def counted(service: str) -> ServingStatus:
        checked.append(service)
        return await check(service)

    backends.check = counted  # type: ignore[method-assign]
    return checked


async def test_callers_at_once_and_within_a_second_share_one_round_of_checks(gateway) -> None:
    """`health` needs no token: 30 aliases, or many requests at once, cost one check of each
    service, not one each."""
    backends = gateway.app[BACKENDS]
    checked = count_checks(backends)
    aliases = " ".join(f"h{n}: health {{ service status }}" for n in range(MAX_ALIASES))
    bodies = await asyncio.gather(*(post(gateway, "{ " + aliases + " }") for _ in range(5)))
    assert all(len(body["data"]) == MAX_ALIASES for body in bodies)
    assert sorted(checked) == sorted(backends.services)
    await post(gateway, HEALTH)  # within the second: the same answer
    assert len(checked) == len(backends.services)


async def test_health_over_get(gateway) -> None:
    resp = await gateway.get("/graphql", params={"query": HEALTH})
    assert resp.status == 200
    assert set(statuses(await resp.json()).values()) == {"SERVING"}


@pytest.fixture
async def black_holes() -> AsyncIterator[Callable[[], Awaitable[str]]]:
    """TCP listeners that accept connections and never answer: a hung service."""
    servers: list[asyncio.Server] = []
    writers: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)

    async def open_one() -> str:
        server = await asyncio.start_server(hold, "127.0.0.1", 0)
        servers.append(server)
        return f"127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield open_one
    for writer in writers:
        writer.close()
    for server in servers:
        server.close()
        await server.wait_closed()


async def test_hung_services_are_unreachable_after_the_deadline_checked_concurrently(
    fleet, start_gateway, black_holes
) -> None:
    addresses = dict(fleet.addresses)
    for service in ("compute", "storage", "activity"):
        addresses[service] = await black_holes()
    client = await start_gateway(addresses, health_timeout=0.5)
    started = time.monotonic()
    body = await post(client, HEALTH)
    elapsed = time.monotonic() - started
    assert statuses(body) == {
        "wallet": "SERVING",
        "compute": "UNREACHABLE",
        "storage": "UNREACHABLE",
        "activity": "UNREACHABLE",
        "node-agent": "SERVING",
    }
    assert 0.5 <= elapsed < 1.4  # three 0.5 s deadlines at once: one after the other is 1.5 s


async def test_one_channel_per_service_kept_across_requests(gateway) -> None:
    backends = gateway.app[BACKENDS]
    before = {s: backends.channel(s) for s in backends.services}
    await post(gateway, HEALTH)
    await post(gateway, HEALTH)
    assert all(backends.channel(s) is ch for s, ch in before.items())


async def test_channels_close_when_the_gateway_stops(fleet, start_gateway) -> None:
    client = await start_gateway(fleet.addresses)
    backends = client.app[BACKENDS]
    await post(client, HEALTH)
    await client.close()
    with pytest.raises(RuntimeError, match="after close"):
        backends.channel("wallet")
