"""Invariants after a randomized concurrent workload, and after kill -9 in the middle of one."""

from __future__ import annotations

import asyncio
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from psycopg_pool import AsyncConnectionPool

from gpudeck.kit.config import EventsConfig
from gpudeck.kit.grpcclient import channel
from gpudeck.proto.wallet.v1.wallet_pb2_grpc import WalletServiceStub
from gpudeck.wallet import audit

sys.path.insert(0, str(Path(__file__).parent))
import workload
from processes import TOKEN, start_wallet, wait_serving, wallet_env

NewOrg = Callable[..., Awaitable[uuid.UUID]]


async def assert_books_sound(pool: AsyncConnectionPool, orgs: list[uuid.UUID]) -> None:
    async with pool.connection() as conn:
        assert await audit.check(conn) == []
        cur = await conn.execute(
            "SELECT organization_id FROM wallets WHERE organization_id = ANY(%s)"
            " AND balance - held_balance < 0",
            (orgs,),
        )
        assert await cur.fetchall() == [], "holds and charges made spendable negative"


async def assert_acknowledged_are_recorded(
    pool: AsyncConnectionPool, record: workload.Record
) -> None:
    ids = [uuid.UUID(t) for t in record.transactions.values()]
    hold_ids = [uuid.UUID(h) for h in record.holds]
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM transactions WHERE id = ANY(%s)", (ids,))
        assert (await cur.fetchone()) == (len(set(ids)),)
        cur = await conn.execute("SELECT count(*) FROM holds WHERE id = ANY(%s)", (hold_ids,))
        assert (await cur.fetchone()) == (len(hold_ids),)


async def test_invariants_hold_after_a_concurrent_workload(
    wallet_stub: WalletServiceStub, wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    orgs = [await new_org() for _ in range(4)]
    record = await workload.run(wallet_stub, orgs, clients=24, ops=40)
    assert record.calls == 24 * 40
    assert len(record.transactions) > 100
    assert "INTERNAL" not in record.errors and "UNKNOWN" not in record.errors
    await asyncio.sleep(1.5)  # let one-second holds expire through the housekeeping loop
    await assert_books_sound(wallet_pool, orgs)
    await assert_acknowledged_are_recorded(wallet_pool, record)


@pytest.mark.slow
async def test_kill_9_mid_workload_loses_no_acknowledged_call(
    database_url: str,
    events_config: EventsConfig,
    wallet_pool: AsyncConnectionPool,
    new_org: NewOrg,
) -> None:
    env = wallet_env(database_url, events_config)
    address = env["GPUDECK_WALLET_LISTEN"]
    orgs = [await new_org() for _ in range(4)]
    proc = start_wallet(env)
    try:
        await wait_serving(address)
        async with channel(address, TOKEN) as ch:
            stub = WalletServiceStub(ch)
            load = asyncio.ensure_future(workload.run(stub, orgs, clients=20, ops=60))
            await asyncio.sleep(1.0)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            await asyncio.sleep(0.5)
            proc = start_wallet(env)
            await wait_serving(address)
            record = await load
            assert record.errors.get("UNAVAILABLE", 0) > 0, "the kill happened after the load"
            await asyncio.sleep(1.5)
            await assert_books_sound(wallet_pool, orgs)
            await assert_acknowledged_are_recorded(wallet_pool, record)
    finally:
        proc.terminate()
        proc.wait(10)
