"""Readiness probes: a service is ready when its gRPC health says SERVING, the gateway when its
/healthz answers 200.

grpc is imported only when probing starts, after every child has been started: the launcher
never forks with a live gRPC runtime.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable

from gpudeck.cli.stack import GATEWAY, Part

POLL_INTERVAL = 0.1
PROBE_TIMEOUT = 1.0
# A channel backs off for up to minutes after failed connects; a probe must retry promptly.
RETRY_FAST = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 250),
]


async def http_status(address: str, path: str) -> int | None:
    """The status code of `GET path` on `address` (host:port), or None if it did not answer."""
    host, _, port = address.rpartition(":")
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            reader, writer = await asyncio.open_connection(host.strip("[]"), int(port))
            try:
                writer.write(
                    f"GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n".encode()
                )
                await writer.drain()
                status_line = await reader.readline()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, TimeoutError):
        return None
    parts = status_line.split()
    return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None


async def _gateway_ready(part: Part) -> None:
    while True:
        if await http_status(part.listen.local, "/healthz") == 200:
            return
        await asyncio.sleep(POLL_INTERVAL)


async def _service_ready(part: Part) -> None:
    import grpc  # type: ignore[import-untyped,unused-ignore]
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    serving = health_pb2.HealthCheckResponse.SERVING
    async with grpc.aio.insecure_channel(part.listen.local, options=RETRY_FAST) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=PROBE_TIMEOUT)
                if reply.status == serving:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(POLL_INTERVAL)


async def wait_ready(parts: Iterable[Part], ready: set[str]) -> None:
    """Return when every part is ready; `ready` collects the names of those that already are."""

    async def one(part: Part) -> None:
        await (_gateway_ready(part) if part.name == GATEWAY else _service_ready(part))
        ready.add(part.name)

    async with asyncio.TaskGroup() as group:
        for part in parts:
            group.create_task(one(part))


async def token_works(address: str, token: str) -> bool | None:
    """Whether `token` authenticates at the gateway on `address` (`{ viewer { id } }`); None
    when the gateway gave no answer to go by."""
    import aiohttp

    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5 * PROBE_TIMEOUT)) as http,
            http.post(
                f"http://{address}/graphql",
                json={"query": "{ viewer { id } }"},
                headers={"Authorization": f"Bearer {token}"},
            ) as response,
        ):
            body = await response.json()
    except (OSError, TimeoutError, aiohttp.ClientError, ValueError):
        return None
    errors = body.get("errors") if isinstance(body, dict) else None
    if not errors:
        return True
    codes = {(e.get("extensions") or {}).get("code") for e in errors if isinstance(e, dict)}
    return False if "UNAUTHENTICATED" in codes else None
