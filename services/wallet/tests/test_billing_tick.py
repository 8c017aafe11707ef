"""The billing tick: one replica at a time, and a tick that dies mid-way loses and repeats nothing."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool
from test_group_commit import balance

from gpudeck.kit.logs import actor
from gpudeck.wallet import audit
from gpudeck.wallet.deps import Wallet
from gpudeck.wallet.metering import MeterRequest, owed
from gpudeck.wallet.metering_store import (
    BILLING_LOCK,
    TICK,
    BillingRefused,
    MeterStore,
    bill_chunk,
    bill_open_meters,
)
from gpudeck.wallet.money import MAX_AMOUNT

NewOrg = Callable[..., Awaitable[uuid.UUID]]
RATE = 36_000_000  # 10,000 micro-units a second


async def open_meter(wallet: Wallet, org: uuid.UUID, seconds_ago: float, rate: int = RATE) -> str:
    meter_id = f"pod:{uuid.uuid4()}"
    async with wallet.pool.connection() as conn, conn.transaction():
        await wallet.meters.open(
            conn,
            MeterRequest(
                meter_id, org, "pod-x", "pod", rate,
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


async def test_a_meter_owing_more_than_one_transfer_moves_is_charged_in_parts(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    """The highest rate OpenMeter takes, opened 3 h ago, owes 3 × MAX_AMOUNT at the first tick:
    it is charged in parts (it was refused as "too large", and stopped every tick)."""
    wallet = Wallet(wallet_pool)
    big_org, small_org = await new_org(), await new_org()
    async with billing_replica(wallet_pool) as conn:
        small = await open_meter(wallet, small_org, 60)
        big = await open_meter(wallet, big_org, 3 * 3600, rate=MAX_AMOUNT)
        assert await bill_chunk(conn, wallet.meters, [big_org, small_org]) > 3 * MAX_AMOUNT
    big_total, _ = await charged(wallet_pool, big)
    assert big_total >= 3 * MAX_AMOUNT
    assert await balance(wallet_pool, big_org) == -big_total
    small_total, _ = await charged(wallet_pool, small)
    assert small_total >= 60 * 10_000
    assert await balance(wallet_pool, small_org) == -small_total
    # Closing it settles in parts too, and ends its billing.
    async with wallet_pool.connection() as conn, conn.transaction():
        closed = await wallet.meters.close(conn, big)
    assert closed.total_charged == owed(MAX_AMOUNT, closed.opened_at, closed.closed_at)
    assert await balance(wallet_pool, big_org) == -closed.total_charged
    async with wallet_pool.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*), max(amount) FROM transactions WHERE organization_id = %s",
            (big_org,),
        )
        parts, largest = await cur.fetchone() or (0, 0)
    assert parts >= 4 and largest <= MAX_AMOUNT


class RefusingStore(MeterStore):
    """The real store, except that the ledger "refuses" one organization's charge."""

    refused: uuid.UUID

    async def bill(self, conn, organization_ids):  # type: ignore[no-untyped-def]
        if self.refused in organization_ids:
            raise BillingRefused(self.refused, RuntimeError("refused"))
        return await super().bill(conn, organization_ids)


async def test_an_organization_the_ledger_refuses_does_not_stop_the_others(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    wallet = Wallet(wallet_pool)
    orgs = sorted([await new_org() for _ in range(3)])
    store = RefusingStore(wallet.ledger)
    store.refused = orgs[1]
    async with billing_replica(wallet_pool) as conn:
        meters = [await open_meter(wallet, org, 30) for org in orgs]
        assert await bill_chunk(conn, store, orgs) > 0
        totals = [(await charged(wallet_pool, m))[0] for m in meters]
        assert totals[0] >= 300_000 and totals[2] >= 300_000, totals  # the others billed
        assert totals[1] == 0  # left for the next tick, its seconds not lost:
        assert await bill_chunk(conn, wallet.meters, orgs) > 0
        assert (await charged(wallet_pool, meters[1]))[0] >= 300_000


@contextlib.asynccontextmanager
async def billing_replica(pool: AsyncConnectionPool) -> AsyncIterator[AsyncConnection[Any]]:
    """A connection holding the billing lock: this run's wallet service (which bills every open
    meter of the database) leaves the test's meters alone meanwhile."""
    async with pool.connection() as conn:
        await conn.execute("SELECT pg_advisory_lock(%s)", (BILLING_LOCK,))
        try:
            yield conn
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (BILLING_LOCK,))


@pytest.mark.parametrize(
    ("rate", "micros"),
    [(2_500_000_003, 366_666_661), (MAX_AMOUNT, 86_399_999_999), (1_000_003, 1), (7, 999_999)],
)
async def test_the_tick_rounds_as_the_documented_rule(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg, rate: int, micros: int
) -> None:
    """The tick's SQL charges exactly `metering.owed` (it rounded a quotient first, one
    micro-unit over, for large amounts)."""
    wallet = Wallet(wallet_pool)
    org = await new_org()
    async with billing_replica(wallet_pool) as conn, conn.transaction(force_rollback=True):
        meter = await open_meter(wallet, org, 0, rate=rate)
        cur = await conn.execute("SELECT segment_started_at FROM meters WHERE id = %s", (meter,))
        [start] = await cur.fetchone() or (None,)
        now = start + timedelta(microseconds=micros)
        cur = await conn.execute(TICK, {"now": now, "orgs": [org]})
        rows = await cur.fetchall()
    assert [r[-1] for r in rows] == [owed(rate, start, now)]


async def test_a_ticks_charge_names_the_project_and_a_close_its_caller(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    """One charge per organization and project, so its event names the project (the audit
    log's); a close settles as its caller, the tick as the system."""
    wallet = Wallet(wallet_pool)
    org = await new_org()
    async with wallet_pool.connection() as conn:
        cur = await conn.execute("SELECT id FROM projects WHERE organization_id = %s", (org,))
        row = await cur.fetchone()
    project = row[0] if row else None
    if project is None:
        project = uuid.uuid4()
        async with wallet_pool.connection() as conn:
            await conn.execute(
                "INSERT INTO projects (id, organization_id, name) VALUES (%s, %s, 'ml')",
                (project, org),
            )
    async with billing_replica(wallet_pool) as conn:
        async with wallet_pool.connection() as c, c.transaction():
            opened = await wallet.meters.open(
                c,
                MeterRequest(
                    f"pod:{uuid.uuid4()}", org, "pod-x", "pod", RATE, project_id=project,
                    at=datetime.now(UTC) - timedelta(seconds=30),
                ),
            )  # fmt: skip
            await wallet.meters.open(
                c,
                MeterRequest(
                    f"vol:{uuid.uuid4()}", org, "vol-x", "nfs_volume", RATE,
                    at=datetime.now(UTC) - timedelta(seconds=30),
                ),
            )  # fmt: skip
        assert await bill_chunk(conn, wallet.meters, [org]) > 0
        token = actor.set("user:closer")
        try:
            async with wallet_pool.connection() as c, c.transaction():
                await wallet.meters.close(c, opened.id, datetime.now(UTC) - timedelta(seconds=10))
        finally:
            actor.reset(token)
    async with wallet_pool.connection() as conn:
        cur = await conn.execute(
            "SELECT kind, project_id, actor FROM transactions WHERE organization_id = %s"
            " ORDER BY created_at, kind",
            (org,),
        )
        rows = await cur.fetchall()
    ticked = {(p, a) for k, p, a in rows if k == "usage"}
    assert ticked == {(project, "system"), (None, "system")}  # one charge per project
    assert ("refund", project, "user:closer") in rows  # the close gave back 10 s


async def test_a_tick_posts_alike_by_the_set_based_path_and_the_general_one(
    own_wallet_pool: AsyncConnectionPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tick's charges of one resource (organizations without credits) go through the
    set-based fast path; those of several resources, or of organizations with credits, through
    the general one. Both must leave the same ledger: the same transactions (kind, amount,
    resource), postings, balances and rollups, and credits spent before cash."""
    from gpudeck.wallet import fast_batch
    from gpudeck.wallet.ledger import Kind, TransferRequest

    pool = own_wallet_pool
    set_based: list[int] = []  # how many of the tick's charges the fast path posted
    post_fast = fast_batch.post_fast

    ours: list[Any] = []  # this test's ledgers (the session's wallet posts meanwhile)
    our_orgs: set[uuid.UUID] = set()

    async def counted(
        store: Any, conn: Any, requests: Any, valid: Any, outcomes: Any, *rest: Any, **kw: Any
    ) -> Any:
        left = await post_fast(store, conn, requests, valid, outcomes, *rest, **kw)
        if store in ours:
            usage = [
                i for i in valid
                if i not in left and requests[i].kind is Kind.USAGE
                and requests[i].organization_id in our_orgs
            ]  # fmt: skip
            set_based.append(len(usage))
        return left

    monkeypatch.setattr(fast_batch, "post_fast", counted)

    async def books(fast: bool) -> list[Any]:
        wallet = Wallet(pool)
        ours.append(wallet.ledger)
        if not fast:  # the same tick, every charge through the general path
            post = wallet.ledger.post_transfers

            async def general(*args: Any, **kwargs: Any) -> Any:
                return await post(*args, **{**kwargs, "fast_path": False})

            wallet.ledger.post_transfers = general  # type: ignore[method-assign]
        orgs = await plain_orgs(pool, 3)  # one meter; two meters; one meter and credits
        our_orgs.update(orgs)
        async with pool.connection() as conn, conn.transaction():
            await wallet.ledger.post_transfers(
                conn,
                [
                    TransferRequest("cash", orgs[0], Kind.TOPUP, 50_000_000),
                    TransferRequest("credits", orgs[2], Kind.CREDIT_GRANT, 1_000_000),
                ],
            )
        at = datetime.now(UTC) - timedelta(seconds=30)
        async with pool.connection() as conn, conn.transaction():
            for n, (org, resource) in enumerate(
                [(orgs[0], "a"), (orgs[1], "b"), (orgs[1], "c"), (orgs[2], "d")]
            ):
                request = MeterRequest(f"tick:{org}:{n}", org, resource, "pod", RATE, at=at)
                await wallet.meters.open(conn, request)
        await bill_open_meters(pool, wallet.meters)
        async with pool.connection() as conn:
            cur = await conn.execute(
                "SELECT o.n, t.kind, t.resource_type, t.resource_id, t.amount = ("
                "   SELECT sum(m.total_charged) FROM meters m WHERE m.organization_id = t.organization_id),"
                "  (SELECT array_agg(a.kind || ':' || p.amount ORDER BY p.amount) FROM postings p"
                "   JOIN ledger_accounts a ON a.id = p.account_id WHERE p.transaction_id = t.id"
                "   AND a.organization_id IS NOT NULL),"
                "  (SELECT array_agg(d.resource_type || ':' || d.amount ORDER BY d.resource_type)"
                "   FROM daily_spend d WHERE d.organization_id = t.organization_id),"
                "  (SELECT array_agg(c.resource_id || ':' || c.total ORDER BY c.resource_id)"
                "   FROM resource_costs c WHERE c.organization_id = t.organization_id),"
                "  w.credits, w.balance + (SELECT sum(m.total_charged) FROM meters m"
                "   WHERE m.organization_id = t.organization_id)"
                " FROM transactions t JOIN wallets w USING (organization_id)"
                " JOIN unnest(%s::uuid[]) WITH ORDINALITY AS o (id, n) ON o.id = t.organization_id"
                " WHERE t.kind = 'usage' ORDER BY o.n",
                (orgs,),
            )
            found = await cur.fetchall()
            assert await audit.check(conn) == []
        return found

    fast = await books(fast=True)
    assert sum(set_based) == 1  # the one-resource charge of the organization without credits
    async with pool.connection() as conn:  # its event is dated as its row (no relay here)
        cur = await conn.execute(
            "SELECT o.data, t.created_at FROM outbox o JOIN transactions t"
            " ON o.type = 'wallet.charge.posted' AND t.kind = 'usage' AND t.resource_id = 'a'"
        )
        rows = await cur.fetchall()
    from gpudeck.kit.events import parse_event

    dated = {parse_event(bytes(data)).time.ToDatetime(UTC): created for data, created in rows}
    assert any(when == created for when, created in dated.items()), dated
    general = await books(fast=False)
    assert [row[:4] for row in fast] == [
        (1, "usage", "pod", "a"), (2, "usage", "", ""), (3, "usage", "pod", "d")
    ]  # fmt: skip

    # The amounts differ with the seconds each ran; what they are made of may not.
    def shape(rows: list[Any]) -> list[Any]:
        return [
            (n, kind, rtype, rid, whole, [p.split(":")[0] for p in postings],
             [d.split(":")[0] for d in spend], [c.split(":")[0] for c in costs], before)
            for n, kind, rtype, rid, whole, postings, spend, costs, _credits, before in rows
        ]  # fmt: skip

    assert shape(fast) == shape(general)
    assert all(row[4] for row in fast)  # each charge is what its meters were charged
    assert shape(fast)[2][5] == ["credit"] and 0 < fast[2][8] < 1_000_000  # credits, not cash
    assert fast[0][9] == 50_000_000 and fast[2][9] == 1_000_000  # balance + charged = funded


async def test_a_tick_of_many_chunks_bills_them_two_at_a_time_and_all_of_them(
    own_wallet_pool: AsyncConnectionPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks hold disjoint organizations and are billed two at a time on connections of their
    own: every meter is charged its seconds once, and the books balance."""
    from gpudeck.wallet import metering_store

    pool = own_wallet_pool
    assert pool.max_size >= metering_store.MIN_POOL_FOR_WRITERS
    wallet = Wallet(pool)
    meters = [await open_meter(wallet, org, seconds_ago=20) for org in await plain_orgs(pool, 7)]
    at_once, most = 0, 0
    bill_chunk = metering_store.bill_chunk

    async def counted(conn: Any, store: Any, part: Any) -> int:
        nonlocal at_once, most
        if store is not wallet.meters:  # the session's own wallet bills meanwhile
            return await bill_chunk(conn, store, part)
        at_once += 1
        most = max(most, at_once)
        try:
            await asyncio.sleep(0.05)  # long enough for a second chunk to start meanwhile
            return await bill_chunk(conn, store, part)
        finally:
            at_once -= 1

    monkeypatch.setattr(metering_store, "bill_chunk", counted)
    await bill_open_meters(pool, wallet.meters, chunk=2)  # four chunks
    assert most == metering_store.TICK_WRITERS
    for meter_id in meters:
        total, elapsed = await charged(pool, meter_id)
        assert total == RATE * (elapsed // timedelta(microseconds=1)) // 3_600_000_000 > 0
    async with pool.connection() as conn:
        assert await audit.check(conn) == []


async def test_a_chunk_that_fails_ends_the_tick_only_once_every_chunk_has_ended(
    own_wallet_pool: AsyncConnectionPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failing chunk ended the tick (and let the billing lock go) while the others still
    billed, unlocked: another replica could take the lock and bill beside them."""
    from gpudeck.wallet import metering_store

    pool = own_wallet_pool
    wallet = Wallet(pool)
    for org in await plain_orgs(pool, 6):
        await open_meter(wallet, org, seconds_ago=5)
    running: set[int] = set()
    started = 0
    bill_chunk = metering_store.bill_chunk

    async def chunk(conn: Any, store: Any, part: Any) -> int:
        nonlocal started
        if store is not wallet.meters:  # the session's own wallet bills meanwhile
            return await bill_chunk(conn, store, part)
        n, started = started, started + 1
        running.add(n)
        try:
            if n == 0:
                raise ConnectionError("the chunk's connection was lost")
            await asyncio.sleep(0.3)
            return await bill_chunk(conn, store, part)
        finally:
            running.discard(n)

    monkeypatch.setattr(metering_store, "bill_chunk", chunk)
    with pytest.raises(ConnectionError):
        await bill_open_meters(pool, wallet.meters, chunk=2)  # three chunks or more
    assert started >= 3 and running == set()  # none still billing once the lock is let go


async def plain_orgs(pool: AsyncConnectionPool, count: int) -> list[uuid.UUID]:
    """`count` organizations with empty wallets, made with plain SQL."""
    from gpudeck.wallet.ledger_store import open_wallet

    orgs = [uuid.uuid4() for _ in range(count)]
    async with pool.connection() as conn, conn.transaction():
        user = uuid.uuid4()
        await conn.execute("INSERT INTO users (id, email) VALUES (%s, %s)", (user, f"{user}@t"))
        for org in orgs:
            await conn.execute(
                "INSERT INTO organizations (id, name, owner_user_id, currency, kyc_status)"
                " VALUES (%s, 'tick', %s, 'USD', 'verified')",
                (org, user),
            )
            await open_wallet(conn, org, "USD")
    return orgs
