"""The wallet as a real child process, for tests that kill or restart it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gpudeck.cli.embedded import free_port
from gpudeck.kit.config import EventsConfig

TOKEN = "wallet-process-token"


def wallet_env(database_url: str, events: EventsConfig, **extra: str) -> dict[str, str]:
    """Environment for `python -m gpudeck.wallet` on free ports; GPUDECK_WALLET_LISTEN says where."""
    return {
        **os.environ,
        "GPUDECK_DATABASE_URL": database_url,
        "GPUDECK_NATS_URL": events.nats_url,
        "GPUDECK_EVENTS_STREAM": events.stream,
        "GPUDECK_EVENTS_PREFIX": events.subject_prefix,
        "GPUDECK_SERVICE_TOKEN": TOKEN,
        "GPUDECK_WALLET_LISTEN": f"127.0.0.1:{free_port()}",
        "GPUDECK_WALLET_METRICS_LISTEN": f"127.0.0.1:{free_port()}",
        **extra,
    }


def start_wallet(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "gpudeck.wallet"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def wait_serving(address: str, timeout: float = 30) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with grpc.aio.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if loop.time() > deadline:
                raise TimeoutError(f"wallet at {address} did not become SERVING")
            await asyncio.sleep(0.1)
