"""The billing loop of real wallet processes: killed with SIGKILL mid-billing, and two replicas
on one database.

Each test gets a database of its own, so the only billers are the processes it starts (the
session's in-process wallet bills the shared database every 0.2 s and would hide what a killed
process did or did not do). Tick rows are the ledger's `usage` transactions keyed `usage:<now>:`;
each is created at the tick's `now` and charges its meters up to that instant.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import psycopg
import pytest
from databases import wallet_database
from processes import TOKEN, start_wallet, wait_serving, wallet_env
from psycopg_pool import AsyncConnectionPool

from gpudeck.kit.config import EventsConfig
from gpudeck.kit.grpcclient import channel
from gpudeck.proto.common.v1.money_pb2 import Money
from gpudeck.proto.wallet.v1 import wallet_pb2 as pb
from gpudeck.proto.wallet.v1.wallet_pb2_grpc import WalletServiceStub
from gpudeck.wallet import audit
from gpudeck.wallet.ledger_store import open_wallet
from gpudeck.wallet.metering_store import BILLING_LOCK

pytestmark = pytest.mark.slow
TOPUP = 1_000_000_000
INTERVAL = "0.2"  # seconds between billing ticks of the processes started here


@pytest.fixture
async def own_db(pg_server_url: str, run_id: str) -> AsyncIterator[tuple[str, AsyncConnectionPool]]:
    """A fresh, migrated wallet database for one test: its URL and a pool on it."""
    name = f"gpudeck_test_{run_id}_{uuid.uuid4().hex[:8]}"
    async with wallet_database(pg_server_url, name, max_size=4) as (url, pool):
        yield url, pool


async def make_org(pool: AsyncConnectionPool) -> uuid.UUID:
    org, user = uuid.uuid4(), uuid.uuid4()
    async with pool.connection() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO users (id, email) VALUES (%s, %s)", (user, f"{user}@example.com")
        )
        await conn.execute(
            "INSERT INTO organizations (id, name, owner_user_id, currency, kyc_status)"
            " VALUES (%s, 'Acme', %s, 'USD', 'verified')",
            (org, user),
        )
        await conn.execute(
            "INSERT INTO memberships (organization_id, user_id, role) VALUES (%s, %s, 'owner')",
            (org, user),
        )
        await open_wallet(conn, org, "USD")
    return org


def owed(rate: int, start: datetime, end: datetime) -> int:
    """The documented rounding rule (metering.py), computed here on its own:
    floor(hourly_rate × µs(end − start) / 3,600,000,000)."""
    micros = (end - start) // timedelta(microseconds=1)
    return rate * micros // 3_600_000_000


async def open_meter(address: str, org: uuid.UUID, meter_id: str, rate: int) -> None:
    async with channel(address, TOKEN) as ch:
        stub = WalletServiceStub(ch)
        await stub.Transfer(
            pb.TransferRequest(
                idempotency_key=uuid.uuid4().hex, organization_id=str(org), kind=pb.TOPUP,
                amount=Money(amount=TOPUP),
            )
        )  # fmt: skip
        await stub.OpenMeter(
            pb.OpenMeterRequest(
                meter_id=meter_id, organization_id=str(org), resource_id=meter_id,
                resource_type="pod", hourly_rate=rate,
            )
        )  # fmt: skip


async def close_meter(address: str, meter_id: str) -> pb.Meter:
    async with channel(address, TOKEN) as ch:
        return await WalletServiceStub(ch).CloseMeter(pb.CloseMeterRequest(meter_id=meter_id))


Row = tuple[str, str, int, datetime]  # idempotency key, kind, amount, created_at


async def usage_rows(pool: AsyncConnectionPool, org: uuid.UUID) -> list[Row]:
    """The organization's metered charges and corrections, in the order they were made."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT idempotency_key, kind, amount, created_at FROM transactions"
            " WHERE organization_id = %s AND kind IN ('usage', 'refund') ORDER BY created_at, id",
            (org,),
        )
        return await cur.fetchall()


def ticks(rows: list[Row]) -> list[Row]:
    return [r for r in rows if r[0].startswith("usage:")]


async def wait_ticks(pool: AsyncConnectionPool, org: uuid.UUID, more_than: int) -> list[Row]:
    """Wait (up to 10 s) until the organization has more than `more_than` tick rows."""
    for _ in range(100):
        rows = ticks(await usage_rows(pool, org))
        if len(rows) > more_than:
            return rows
        await asyncio.sleep(0.1)
    raise AssertionError(f"no more than {more_than} billing ticks in 10 s")


async def meter_row(pool: AsyncConnectionPool, meter_id: str) -> tuple[datetime, ...]:
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT opened_at, closed_at, billed_until, total_charged, segment_charged"
            " FROM meters WHERE id = %s",
            (meter_id,),
        )
        row = await cur.fetchone()
        assert row is not None
        return tuple(row)


def signed(rows: list[Row]) -> int:
    return sum(-amount if kind == "refund" else amount for _, kind, amount, _ in rows)


def assert_each_charge_follows_the_rule(
    rows: list[Row], rate: int, opened: datetime, closed: datetime | None = None
) -> None:
    """After every tick, what the meter paid is the rule's amount up to that tick's instant: a
    tick that charged a span twice, or skipped one, breaks the sum at that row (and every later
    one). Once `closed`, the close's own row settles it to the rule's amount up to the close: a
    charge, or a refund only if a tick that began after the close started had billed past it."""
    total = 0
    previous = None
    settles = [r for r in rows if r[0].startswith("meter:")]
    assert len(ticks(rows)) + len(settles) == len(rows), f"unexpected rows: {rows}"
    for key, kind, amount, at in ticks(rows):
        assert kind == "usage" and amount > 0, f"tick {key}: {kind} {amount}"
        assert previous is None or at > previous, f"two ticks at one instant {at}"
        total += amount
        assert total == owed(rate, opened, at), (
            f"after tick {key} the meter paid {total}, the rule says {owed(rate, opened, at)}"
        )
        previous = at
    if closed is None:
        assert settles == []
        return
    assert len(settles) <= 1, f"closed more than once: {settles}"
    for key, kind, _, at in settles:
        assert at == closed, f"{key} at {at}, the meter closed at {closed}"
        billed_past = previous is not None and previous > closed
        assert kind == ("refund" if billed_past else "usage"), f"{kind} {key}, last tick {previous}"
    assert total + signed(settles) == owed(rate, opened, closed)


async def assert_books(
    pool: AsyncConnectionPool, org: uuid.UUID, meter_id: str, expected: int
) -> None:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT balance FROM wallets WHERE organization_id = %s", (org,))
        assert (await cur.fetchone()) == (TOPUP - expected,)
        cur = await conn.execute(
            "SELECT total FROM resource_costs WHERE organization_id = %s AND resource_id = %s",
            (org, meter_id),
        )
        assert (await cur.fetchone()) == (expected,)
        assert await audit.check(conn) == []


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("rate", [36_000_000, 1_000_003])
async def test_a_meter_billed_across_a_sigkill_is_charged_rate_times_n(
    own_db: tuple[str, AsyncConnectionPool], events_config: EventsConfig, rate: int
) -> None:
    url, pool = own_db
    env = wallet_env(url, events_config, GPUDECK_BILLING_INTERVAL=INTERVAL)
    address = env["GPUDECK_WALLET_LISTEN"]
    org = await make_org(pool)
    meter_id = f"pod:{uuid.uuid4()}"
    proc = start_wallet(env)
    try:
        await wait_serving(address)
        await open_meter(address, org, meter_id, rate)
        await wait_ticks(pool, org, more_than=2)  # the billing loop is charging the meter
        proc.send_signal(signal.SIGKILL)
        proc.wait()

        # What the killed process committed: its ticks, and a meter that agrees with them.
        before = ticks(await usage_rows(pool, org))
        opened, _, billed_until, total, _ = await meter_row(pool, meter_id)
        assert len(before) >= 3, "the billing loop charged nothing before the kill"
        assert total == sum(r[2] for r in before) > 0
        assert billed_until == before[-1][3]
        assert_each_charge_follows_the_rule(before, rate, opened)

        await asyncio.sleep(0.5)  # seconds no process bills; the next one must charge them
        proc = start_wallet(env)
        await wait_serving(address)
        after = await wait_ticks(pool, org, more_than=len(before) + 1)
        assert after[: len(before)] == before
        gap = after[len(before)][3] - before[-1][3]
        assert gap > timedelta(seconds=0.5), f"the restarted process's first tick came {gap} after"
        closed = await close_meter(address, meter_id)
    finally:
        stop(proc)

    opened, closed_at, billed_until, total, _ = await meter_row(pool, meter_id)
    assert closed_at is not None and billed_until == closed_at
    n = closed_at - opened  # the open → close interval the wallet recorded
    expected = owed(rate, opened, closed_at)
    assert expected > 0
    assert closed.total_charged == total == expected, f"{n} at {rate}/h"
    rows = await usage_rows(pool, org)
    assert signed(rows) == expected
    assert_each_charge_follows_the_rule(rows, rate, opened, closed_at)
    await assert_books(pool, org, meter_id, expected)


# The billing lock as pg_locks shows a bigint advisory lock: high and low 32 bits, objsubid 1.
LOCK_KEY = BILLING_LOCK & 0xFFFF_FFFF_FFFF_FFFF
WAITING = """
SELECT a.pid, a.application_name, left(a.query, 80),
       EXISTS (SELECT 1 FROM pg_locks l
               WHERE l.pid = a.pid AND l.locktype = 'advisory' AND l.granted
                 AND l.classid::bigint = %s AND l.objid::bigint = %s AND l.objsubid = 1)
FROM pg_stat_activity a
WHERE a.datname = current_database() AND a.wait_event_type = 'Lock'
"""


async def test_two_replicas_bill_one_at_a_time_and_each_second_once(
    own_db: tuple[str, AsyncConnectionPool], events_config: EventsConfig
) -> None:
    """Two replicas on one database tick every 0.2 s. While the test holds the wallet's row lock
    for 1.5 s, a tick that started waits for it: with the billing lock only the replica holding
    it waits (the other skips its ticks), without it both would be stuck waiting. Then the
    replica that held it is killed and the other bills on; the meter is charged exactly."""
    url, pool = own_db
    rate = 1_000_003
    org = await make_org(pool)
    meter_id = f"pod:{uuid.uuid4()}"
    envs = {
        name: wallet_env(url, events_config, GPUDECK_BILLING_INTERVAL=INTERVAL, PGAPPNAME=name)
        for name in ("replica-a", "replica-b")
    }
    procs = {name: start_wallet(env) for name, env in envs.items()}
    try:
        await asyncio.gather(*(wait_serving(env["GPUDECK_WALLET_LISTEN"]) for env in envs.values()))
        await open_meter(envs["replica-a"]["GPUDECK_WALLET_LISTEN"], org, meter_id, rate)
        await wait_ticks(pool, org, more_than=3)

        samples: list[list[tuple[int, str, str, bool]]] = []
        async with await psycopg.AsyncConnection.connect(url) as blocker:
            async with blocker.transaction():
                await blocker.execute(
                    "SELECT 1 FROM wallet.wallets WHERE organization_id = %s FOR UPDATE", (org,)
                )
                async with pool.connection() as conn:
                    for _ in range(30):  # 1.5 s: several ticks of each replica fall in it
                        await asyncio.sleep(0.05)
                        cur = await conn.execute(WAITING, (LOCK_KEY >> 32, LOCK_KEY & 0xFFFF_FFFF))
                        samples.append(await cur.fetchall())
        procs_alive = {name: p.poll() is None for name, p in procs.items()}
        assert procs_alive == {"replica-a": True, "replica-b": True}
        most = max(samples, key=len)
        assert len(most) <= 1, f"two ticks at once: {most}"
        waiting = [s[0] for s in samples if s]
        assert len(waiting) >= 20, f"a tick waited in only {len(waiting)} of 30 samples"
        holders = {(app, holds) for _, app, _, holds in waiting}
        assert len(holders) == 1, f"the waiting tick changed hands: {holders}"
        [(holder, holds_lock)] = holders
        assert holds_lock, f"the waiting tick ({holder}) does not hold the billing lock"
        assert holder in procs, f"the waiting backend is {holder}"

        # The replica that held the lock dies; the other one bills from where it stopped.
        await wait_ticks(pool, org, more_than=len(ticks(await usage_rows(pool, org))))
        procs[holder].send_signal(signal.SIGKILL)
        procs[holder].wait()
        [other] = [name for name in procs if name != holder]
        before = ticks(await usage_rows(pool, org))
        after = await wait_ticks(pool, org, more_than=len(before) + 1)
        assert after[: len(before)] == before
        closed = await close_meter(envs[other]["GPUDECK_WALLET_LISTEN"], meter_id)
    finally:
        for proc in procs.values():
            stop(proc)

    opened, closed_at, _, total, _ = await meter_row(pool, meter_id)
    assert closed_at is not None
    expected = owed(rate, opened, closed_at)
    assert closed.total_charged == total == expected
    rows = await usage_rows(pool, org)
    assert signed(rows) == expected
    assert_each_charge_follows_the_rule(rows, rate, opened, closed_at)
    await assert_books(pool, org, meter_id, expected)
