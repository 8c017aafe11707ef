"""Shared set-up for the wallet benchmarks: a scratch database, organizations, a wallet process."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg_pool import AsyncConnectionPool

import gpudeck.wallet
from gpudeck.cli.embedded import free_port
from gpudeck.kit.db import migrate, open_pool
from gpudeck.kit.runtime import KIT_MIGRATIONS
from gpudeck.wallet.ledger_store import open_wallet

SERVER_URL = os.environ.get(
    "GPUDECK_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
NATS_URL = os.environ.get("GPUDECK_BENCH_NATS_URL", "nats://127.0.0.1:4222")
TOKEN = "bench-token"
MIGRATIONS = Path(gpudeck.wallet.__file__).parent / "migrations"


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


@asynccontextmanager
async def scratch_database(prefix: str) -> AsyncIterator[str]:
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(SERVER_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_database(SERVER_URL, name)
    finally:
        with psycopg.connect(SERVER_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def wallet_pool(url: str) -> AsyncConnectionPool:
    pool = await open_pool(url, min_size=1, max_size=8, schema="wallet")  # as the service
    await migrate(pool, "wallet", KIT_MIGRATIONS, table="kit_migrations")
    await migrate(pool, "wallet", MIGRATIONS)
    return pool


async def make_orgs(
    pool: AsyncConnectionPool, count: int, *, currency: str = "USD"
) -> list[uuid.UUID]:
    """`count` organizations with empty wallets, made with plain SQL."""
    orgs = [uuid.uuid4() for _ in range(count)]
    async with pool.connection() as conn, conn.transaction():
        user = uuid.uuid4()
        await conn.execute("INSERT INTO users (id, email) VALUES (%s, %s)", (user, f"{user}@bench"))
        await conn.execute(
            "INSERT INTO organizations (id, name, owner_user_id, currency, kyc_status)"
            " SELECT o, 'bench', %s, %s, 'verified' FROM unnest(%s::uuid[]) AS o",
            (user, currency, orgs),
        )
        for org in orgs:
            await open_wallet(conn, org, currency)
    return orgs


@asynccontextmanager
async def wallet_process(database_url: str, **extra: str) -> AsyncIterator[str]:
    """`python -m gpudeck.wallet` on a free port; yields its address."""
    address = f"127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "GPUDECK_DATABASE_URL": database_url,
        "GPUDECK_NATS_URL": NATS_URL,
        "GPUDECK_EVENTS_STREAM": f"BENCH_{uuid.uuid4().hex[:8]}",
        "GPUDECK_EVENTS_PREFIX": f"bench{uuid.uuid4().hex[:8]}",
        "GPUDECK_SERVICE_TOKEN": TOKEN,
        "GPUDECK_WALLET_LISTEN": address,
        "GPUDECK_WALLET_METRICS_LISTEN": f"127.0.0.1:{free_port()}",
        "GPUDECK_LOG_LEVEL": "WARNING",
        **extra,
    }
    proc = subprocess.Popen([sys.executable, "-m", "gpudeck.wallet"], env=env)
    try:
        await wait_serving(address)
        yield address
    finally:
        proc.terminate()
        proc.wait(20)
        await delete_stream(env["GPUDECK_EVENTS_STREAM"])


async def wait_serving(address: str, timeout: float = 60) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with grpc.aio.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while loop.time() < deadline:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(f"wallet at {address} did not start")


async def delete_stream(stream: str) -> None:
    import nats

    try:
        nc = await nats.connect(NATS_URL, connect_timeout=2, max_reconnect_attempts=0)
    except Exception:
        return
    try:
        await nc.jetstream().delete_stream(stream)
    except Exception:
        pass
    await nc.close()
