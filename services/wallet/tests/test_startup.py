"""The wallet and its database: starting on one it cannot use is a configuration error (one
line naming the setting, exit code 2; it was a bare traceback and exit code 1), and its gRPC
health follows the database."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import grpc
import psycopg
import pytest
from databases import fresh_database
from grpc_health.v1 import health_pb2, health_pb2_grpc
from processes import TOKEN, start_wallet, wait_serving, wallet_env

from gpudeck.kit.config import EventsConfig
from gpudeck.kit.grpcclient import channel
from gpudeck.proto.wallet.v1 import wallet_pb2 as pb
from gpudeck.proto.wallet.v1.wallet_pb2_grpc import WalletServiceStub


def test_a_read_only_database_is_a_one_line_config_error(
    pg_server_url: str, events_config: EventsConfig
) -> None:
    name = f"gpudeck_readonly_{uuid.uuid4().hex[:8]}"
    with fresh_database(pg_server_url, name) as url:
        with psycopg.connect(pg_server_url, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
        result = subprocess.run(
            [sys.executable, "-m", "gpudeck.wallet"],
            env=wallet_env(url, events_config),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2, result.stderr
    # One plain line (the service's JSON log lines aside, e.g. its "stopped").
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("{")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "GPUDECK_DATABASE_URL" in lines[0] and "read-only" in lines[0], lines[0]


@pytest.mark.parametrize("wrong", ["database", "role"])
def test_a_database_or_role_that_does_not_exist_is_one_line_at_once(
    pg_server_url: str, events_config: EventsConfig, wrong: str
) -> None:
    """The pool retried what no retry mends for its whole timeout: 10 s and ten lines of
    warnings before the one that said why."""
    url = urlsplit(pg_server_url)
    if wrong == "database":
        url = url._replace(path=f"/gpudeck_missing_{uuid.uuid4().hex[:8]}")
    else:
        url = url._replace(netloc=f"nobody_{uuid.uuid4().hex[:8]}@{url.hostname}:{url.port}")
    result = subprocess.run(
        [sys.executable, "-m", "gpudeck.wallet"],
        env=wallet_env(urlunsplit(url), events_config),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    plain = [line for line in lines if not line.startswith("{")]
    assert len(plain) == 1 and "does not exist" in plain[0], result.stderr
    assert not [line for line in lines if "psycopg.pool" in line], result.stderr


async def test_health_follows_the_database(pg_server_url: str, events_config: EventsConfig) -> None:
    """Health stayed SERVING with the database gone, so probes kept sending calls to a wallet
    that could serve none. It turns NOT_SERVING within seconds, and SERVING again after."""
    name = f"gpudeck_health_{uuid.uuid4().hex[:8]}"

    def database(allow: bool) -> None:
        with psycopg.connect(pg_server_url, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(allow).lower()}')
            if not allow:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                    (name,),
                )

    async def becomes(address: str, status: int) -> None:
        async with grpc.aio.insecure_channel(address) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            deadline = time.monotonic() + 15
            while (await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)).status != status:
                assert time.monotonic() < deadline, f"health never became {status}"
                await asyncio.sleep(0.2)

    with fresh_database(pg_server_url, name) as url:
        env = wallet_env(url, events_config)
        address = env["GPUDECK_WALLET_LISTEN"]
        process = start_wallet(env)
        try:
            await wait_serving(address)
            database(allow=False)
            await becomes(address, health_pb2.HealthCheckResponse.NOT_SERVING)
            database(allow=True)
            await becomes(address, health_pb2.HealthCheckResponse.SERVING)
        finally:
            process.terminate()
            process.wait(20)


async def test_health_stays_serving_while_slow_calls_hold_every_pooled_connection(
    pg_server_url: str, events_config: EventsConfig
) -> None:
    """The health check borrowed a pooled connection: with every one held by calls waiting on a
    lock, it got none, and a replica whose database was fine went NOT_SERVING (out of the load
    balancer, every replica alike under the same load). It has a connection of its own."""
    name = f"gpudeck_busy_{uuid.uuid4().hex[:8]}"
    with fresh_database(pg_server_url, name) as url:
        env = wallet_env(url, events_config, GPUDECK_DB_POOL_SIZE="2")
        address = env["GPUDECK_WALLET_LISTEN"]
        process = start_wallet(env)
        try:
            await wait_serving(address)
            async with await psycopg.AsyncConnection.connect(url) as locker:
                await locker.execute("LOCK TABLE wallet.wallets IN ACCESS EXCLUSIVE MODE")
                async with channel(address, TOKEN) as ch:
                    wallet = WalletServiceStub(ch)
                    waiting = [
                        asyncio.ensure_future(
                            wallet.GetWalletSummary(
                                pb.GetWalletSummaryRequest(organization_id=str(uuid.uuid4())),
                                timeout=12,
                            )
                        )
                        for _ in range(6)
                    ]
                    health = health_pb2_grpc.HealthStub(ch)
                    seen = set()
                    deadline = time.monotonic() + 6  # 3 health checks
                    while time.monotonic() < deadline:
                        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                        seen.add(reply.status)
                        await asyncio.sleep(0.25)
                    assert not any(w.done() for w in waiting)  # they held the pool throughout
                    await locker.rollback()
                    await asyncio.gather(*waiting, return_exceptions=True)
            assert seen == {health_pb2.HealthCheckResponse.SERVING}
        finally:
            process.terminate()
            process.wait(20)


async def test_a_database_that_stops_answering_is_met_within_bounds(
    pg_server_url: str, events_config: EventsConfig, freezing_proxy: Any
) -> None:
    """Connected but silent (a frozen node, a half-open path): health stayed SERVING 12 s while
    the probe's cancellation waited on it, and a stop took 35 s with a 10 s grace, so the
    launcher or Kubernetes killed the wallet mid-shutdown."""
    name = f"gpudeck_frozen_{uuid.uuid4().hex[:8]}"
    with fresh_database(pg_server_url, name) as url:
        target = urlsplit(url)
        proxy = freezing_proxy(target.hostname or "127.0.0.1", target.port or 5432)
        port = await proxy.start()
        through = urlunsplit(target._replace(netloc=f"{target.username}@127.0.0.1:{port}"))
        env = wallet_env(through, events_config, GPUDECK_SHUTDOWN_GRACE="2")
        address = env["GPUDECK_WALLET_LISTEN"]
        process = start_wallet(env)
        try:
            await wait_serving(address)
            proxy.frozen.set()
            frozen = time.monotonic()
            async with grpc.aio.insecure_channel(address) as ch:
                stub = health_pb2_grpc.HealthStub(ch)
                serving = health_pb2.HealthCheckResponse.SERVING
                while (
                    await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                ).status == serving:
                    assert time.monotonic() - frozen < 8, "still SERVING"  # it took 12 s
                    await asyncio.sleep(0.2)
            process.terminate()
            stopping = time.monotonic()
            code = await asyncio.to_thread(process.wait, 30)
            # Its grace (calls, then workers) and bounded waits for what the database holds.
            assert time.monotonic() - stopping < 15 and code == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)
            await proxy.stop()


async def test_a_stop_while_starting_is_heeded_at_once(
    pg_server_url: str, events_config: EventsConfig
) -> None:
    """Waiting on another process's migrations (their lock held), a SIGTERM was ignored until
    the start ended, here never, and nothing said why it waited: it was killed."""
    from gpudeck.kit.db import _lock_key

    name = f"gpudeck_waits_{uuid.uuid4().hex[:8]}"
    with fresh_database(pg_server_url, name) as url:
        async with await psycopg.AsyncConnection.connect(url) as holder:
            await holder.execute("SELECT pg_advisory_lock(%s)", (_lock_key("wallet"),))
            process = subprocess.Popen(
                [sys.executable, "-m", "gpudeck.wallet"],
                env=wallet_env(url, events_config),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                assert process.stderr is not None
                line = await asyncio.to_thread(process.stderr.readline)
                while "waiting for another process's migrations" not in line:
                    assert line, "it never said why it waited"
                    line = await asyncio.to_thread(process.stderr.readline)
                process.terminate()
                code = await asyncio.to_thread(process.wait, 20)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait(10)
    assert code == 0
