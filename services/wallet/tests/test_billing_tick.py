"""The billing tick: one replica at a time, and a tick that dies mid-way loses and repeats nothing."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import pytest
from psycopg_pool import AsyncConnectionPool

from gpudeck.wallet import audit
from gpudeck.wallet.deps import Wallet
from gpudeck.wallet.metering import MeterRequest
from gpudeck.wallet.metering_store import BILLING_LOCK, MeterStore, bill_open_meters

NewOrg = Callable[..., Awaitable[uuid.UUID]]
RATE = 36_000_000  # 10,000 micro-units a second


async def open_meter(wallet: Wallet, org: uuid.UUID, seconds_ago: float) -> str:
    meter_id = f"pod:{uuid.uuid4()}"
    async with wallet.pool.connection() as conn, conn.transaction():
        await wallet.meters.open(
            conn,
            MeterRequest(
                meter_id, org, "pod-x", "pod", RATE,
                at=datetime.now(UTC) - timedelta(seconds=seconds_ago),
            ),
        )  # fmt: skip
    return meter_id


async def charged(pool: AsyncConnectionPool, meter_id: str) -> tuple[int, datetime]:
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT total_charged, billed_until - opened_at FROM meters WHERE id = %s", (meter_id,)
        )
        row = await cur.fetchone()
        assert row is not None
        return row[0], row[1]


async def test_concurrent_ticks_charge_each_second_once(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    wallet = Wallet(wallet_pool)
    org = await new_org()
    meter_id = await open_meter(wallet, org, seconds_ago=60)
    await asyncio.gather(*(bill_open_meters(wallet_pool, wallet.meters) for _ in range(4)))
    total, elapsed = await charged(wallet_pool, meter_id)
    assert total == RATE * (elapsed // timedelta(microseconds=1)) // 3_600_000_000
    async with wallet_pool.connection() as conn:
        assert await audit.check(conn) == []


class Crash(Exception):
    pass


async def test_a_tick_that_dies_mid_way_is_made_good_by_the_next(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg, monkeypatch: pytest.MonkeyPatch
) -> None:
    wallet = Wallet(wallet_pool)
    org = await new_org()
    real_post = wallet.ledger.post_transfers

    async def crash_after_meters_moved(*args: object, **kwargs: object) -> object:
        raise Crash  # the meters were updated in this transaction; the ledger never sees it

    # Ticks as the billing replica: holding the lock keeps this run's wallet service (which
    # bills every open meter of the database) from billing the meter meanwhile.
    async with wallet_pool.connection() as conn:
        await conn.execute("SELECT pg_advisory_lock(%s)", (BILLING_LOCK,))
        try:
            meter_id = await open_meter(wallet, org, seconds_ago=30)
            monkeypatch.setattr(wallet.ledger, "post_transfers", crash_after_meters_moved)
            with pytest.raises(Crash):
                async with conn.transaction():
                    await wallet.meters.bill(conn, [org])
            assert (await charged(wallet_pool, meter_id))[0] == 0  # rolled back with it
            monkeypatch.setattr(wallet.ledger, "post_transfers", real_post)
            async with conn.transaction():
                await MeterStore(wallet.ledger).bill(conn, [org])
            total, elapsed = await charged(wallet_pool, meter_id)
            cur = await conn.execute(
                "SELECT coalesce(sum(amount), 0) FROM transactions WHERE organization_id = %s",
                (org,),
            )
            assert (await cur.fetchone()) == (total,)
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (BILLING_LOCK,))
    assert total == RATE * (elapsed // timedelta(microseconds=1)) // 3_600_000_000
    assert total >= 30 * 10_000
