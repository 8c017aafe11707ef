"""Monthly plan renewals against the real database: a paid plan is charged and granted its
credits once per billing month; a wallet that cannot pay moves to the default plan."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool

from gpudeck.kit.events import parse_event
from gpudeck.wallet import workers
from gpudeck.wallet.deps import Wallet
from gpudeck.wallet.ledger import Kind, TransferRequest
from gpudeck.wallet.ledger_store import LedgerStore, db_now
from gpudeck.wallet.plans import ChangePlanRequest, billing_month, credits_key, fee_key, month_end
from gpudeck.wallet.plans_store import PlanStore
from gpudeck.wallet.workers import renew_plans

NewOrg = Callable[..., Awaitable[uuid.UUID]]
USD = 1_000_000
STORE = PlanStore(LedgerStore())


async def on_premium(pool: AsyncConnectionPool, new_org: NewOrg, cash: int) -> uuid.UUID:
    """An organization that topped up `cash` and upgraded to Premium this month."""
    org = await new_org()
    async with pool.connection() as conn, conn.transaction():
        [topup] = await STORE.ledger.post_transfers(
            conn, [TransferRequest("cash", org, Kind.TOPUP, cash)]
        )
        assert topup.error is None
        await STORE.change(conn, ChangePlanRequest("up", org, "premium"))
    return org


async def next_month(pool: AsyncConnectionPool) -> datetime:
    async with pool.connection() as conn:
        return month_end(await db_now(conn)) + timedelta(hours=1)


async def plan_of(pool: AsyncConnectionPool, org: uuid.UUID) -> str:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT plan_code FROM organizations WHERE id = %s", (org,))
        row = await cur.fetchone()
    assert row is not None
    return str(row[0])


async def test_a_paid_plan_is_renewed_once_a_month(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    org = await on_premium(wallet_pool, new_org, 200 * USD)
    later = await next_month(wallet_pool)
    month = billing_month(later)
    async with wallet_pool.connection() as conn:
        assert org not in await STORE.due_renewals(conn, await db_now(conn))  # paid this month
        assert org in await STORE.due_renewals(conn, later)
    async with wallet_pool.connection() as conn, conn.transaction():
        assert await STORE.renew(conn, org, later) == "renewed"
        cur = await conn.execute("SELECT data FROM outbox WHERE type = 'wallet.plan.renewed'")
        renewed = [parse_event(bytes(row[0])) for row in await cur.fetchall()]
        # read in the same transaction: the relay cannot have taken it yet
        assert [e.actor for e in renewed if e.organization_id == str(org)] == ["system"]
    async with wallet_pool.connection() as conn, conn.transaction():
        assert await STORE.renew(conn, org, later) == ""  # a second run: nothing due
        cur = await conn.execute(
            "SELECT idempotency_key, kind, amount FROM transactions"
            " WHERE organization_id = %s AND idempotency_key LIKE %s ORDER BY 1",
            (org, f"plan:premium:{month}:%"),
        )
        rows = await cur.fetchall()
        cur = await conn.execute(
            "SELECT balance, expires_at FROM ledger_accounts"
            " WHERE organization_id = %s AND kind = 'credit' ORDER BY expires_at DESC LIMIT 1",
            (org,),
        )
        newest = await cur.fetchone()
    assert rows == [
        (credits_key("premium", month), "credit_grant", 60 * USD),
        (fee_key("premium", month), "charge", 49 * USD),
    ]
    assert newest is not None and newest[1] == month_end(later)
    assert await plan_of(wallet_pool, org) == "premium"


async def test_a_wallet_that_cannot_pay_moves_to_the_default_plan(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    # 49 paid the upgrade's fee; its 60 of credits expire with the month: nothing to pay with.
    org = await on_premium(wallet_pool, new_org, 49 * USD)
    later = await next_month(wallet_pool)
    async with wallet_pool.connection() as conn, conn.transaction():
        assert await STORE.renew(conn, org, later) == "downgraded"
        cur = await conn.execute(
            "SELECT count(*) FROM transactions WHERE organization_id = %s"
            " AND idempotency_key LIKE %s",
            (org, f"plan:premium:{billing_month(later)}:%"),
        )
        assert await cur.fetchone() == (0,)
    assert await plan_of(wallet_pool, org) == "standard"
    async with wallet_pool.connection() as conn:
        assert org not in await STORE.due_renewals(conn, later)


async def test_the_monthly_loop_renews_every_organization_due(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    rich = await on_premium(wallet_pool, new_org, 500 * USD)
    poor = await on_premium(wallet_pool, new_org, 49 * USD)
    later = await next_month(wallet_pool)
    done = await renew_plans(Wallet(wallet_pool), now=later)
    assert done["renewed"] >= 1 and done["downgraded"] >= 1
    assert (await plan_of(wallet_pool, rich), await plan_of(wallet_pool, poor)) == (
        "premium",
        "standard",
    )
    again = await renew_plans(Wallet(wallet_pool), now=later)
    assert again == {"renewed": 0, "downgraded": 0, "failed": 0}


async def test_the_monthly_loop_goes_past_a_page_and_past_a_failure(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It renewed the first 500 due and stopped until the next hour; and one renewal that
    failed stopped the rest (and that hour's invoices)."""
    orgs = sorted([await on_premium(wallet_pool, new_org, 500 * USD) for _ in range(3)])
    later = await next_month(wallet_pool)
    monkeypatch.setattr(workers, "RENEWAL_PAGE", 1)
    renew = PlanStore.renew

    async def failing_for_the_first(self: PlanStore, conn: Any, org: uuid.UUID, now: Any) -> str:
        if org == orgs[0]:
            raise RuntimeError("a renewal that fails")
        return await renew(self, conn, org, now)

    monkeypatch.setattr(PlanStore, "renew", failing_for_the_first)
    done = await renew_plans(Wallet(wallet_pool), now=later)
    assert done["failed"] == 1 and done["renewed"] >= 2
    async with wallet_pool.connection() as conn:
        due = await STORE.due_renewals(conn, later, limit=10_000)
    assert orgs[0] in due and orgs[1] not in due and orgs[2] not in due


async def test_a_downgrade_pays_the_lower_plan_from_the_next_month_not_this_one(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    """Enterprise, then down to Premium in one month: Enterprise was paid for this month, so
    no renewal charges Premium until the next (it did, within the hour)."""
    org = await new_org()
    async with wallet_pool.connection() as conn, conn.transaction():
        [topup] = await STORE.ledger.post_transfers(
            conn, [TransferRequest("cash", org, Kind.TOPUP, 2_000 * USD)]
        )
        assert topup.error is None
        await STORE.change(conn, ChangePlanRequest("up", org, "enterprise"))
        await STORE.change(conn, ChangePlanRequest("down", org, "premium"))
        cur = await conn.execute("SELECT balance FROM wallets WHERE organization_id = %s", (org,))
        [before] = await cur.fetchone() or (None,)
    async with wallet_pool.connection() as conn, conn.transaction():
        now = await db_now(conn)
        assert org not in await STORE.due_renewals(conn, now)
        assert await STORE.renew(conn, org, now) == ""
        cur = await conn.execute("SELECT balance FROM wallets WHERE organization_id = %s", (org,))
        assert await cur.fetchone() == (before,)
    assert await plan_of(wallet_pool, org) == "premium"
    later = await next_month(wallet_pool)
    async with wallet_pool.connection() as conn, conn.transaction():
        assert org in await STORE.due_renewals(conn, later)
        assert await STORE.renew(conn, org, later) == "renewed"
        cur = await conn.execute(
            "SELECT count(*) FROM transactions WHERE organization_id = %s AND idempotency_key = %s",
            (org, fee_key("premium", billing_month(later))),
        )
        assert await cur.fetchone() == (1,)
