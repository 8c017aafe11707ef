"""Holds at the store, in a database of their own: no wallet service's sweep comes by here, so
what a hold past its time does before the sweep is what is tested."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import pytest
from psycopg_pool import AsyncConnectionPool

from gpudeck.wallet import audit
from gpudeck.wallet.holds import HoldRequest
from gpudeck.wallet.holds_store import HoldStore
from gpudeck.wallet.ledger import Kind, TransferRequest
from gpudeck.wallet.ledger_store import LedgerStore

USD = 1_000_000
NewOrg = Callable[..., Awaitable[uuid.UUID]]


@pytest.fixture(scope="module")
def wallet_pool(own_wallet_pool: AsyncConnectionPool) -> AsyncConnectionPool:
    return own_wallet_pool  # so `new_org` makes its organizations here


async def test_a_hold_past_its_time_holds_nothing_before_the_sweep(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    """It still counted as held until the sweep expired it: a new hold (or a charge) of the
    money it had reserved was refused, though it could no longer be captured."""
    ledger = LedgerStore()
    holds = HoldStore(ledger)
    org = await new_org()
    async with wallet_pool.connection() as conn, conn.transaction():
        await ledger.post_transfers(conn, [TransferRequest("cash", org, Kind.TOPUP, 10 * USD)])
        first = await holds.create(conn, HoldRequest("h1", org, 10 * USD, timeout_seconds=1))
    await asyncio.sleep(1.2)
    async with wallet_pool.connection() as conn, conn.transaction():
        second = await holds.create(conn, HoldRequest("h2", org, 10 * USD, timeout_seconds=60))
    async with wallet_pool.connection() as conn:
        assert (await holds.get(conn, first.id)).status == "expired"
        cur = await conn.execute(
            "SELECT held_balance FROM wallets WHERE organization_id = %s", (org,)
        )
        assert await cur.fetchone() == (10 * USD,)  # the second one only
    assert second.status == "open"


async def test_a_hold_past_its_time_holds_nothing_for_charges_or_the_card_either(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    """Until the sweep expired it, a charge of the money it had reserved was refused on every
    path (and the card showed it held), though it could no longer be captured."""
    from gpudeck.wallet import readmodels_store

    ledger = LedgerStore()
    holds = HoldStore(ledger)
    org = await new_org()
    async with wallet_pool.connection() as conn, conn.transaction():
        await ledger.post_transfers(conn, [TransferRequest("cash", org, Kind.TOPUP, 10 * USD)])
        await holds.create(conn, HoldRequest("h", org, 10 * USD, timeout_seconds=1))
    await asyncio.sleep(1.2)
    async with wallet_pool.connection() as conn:
        state, _, _ = await readmodels_store.wallet(conn, org, 10)
        assert (state.balance, state.held_balance) == (10 * USD, 0)
        assert type(state.held_balance) is int
        posted = []
        for path, fast in (("batch", True), ("general", False)):
            async with conn.transaction():
                [outcome] = await ledger.post_transfers(
                    conn, [TransferRequest(path, org, Kind.CHARGE, 2 * USD)], fast_path=fast
                )
            assert outcome.error is None, (path, outcome.error)
            posted.append(path)
        single = await ledger.post_one(conn, TransferRequest("single", org, Kind.CHARGE, 2 * USD))
        assert single.balance_after == 4 * USD
        cur = await conn.execute("SELECT status FROM holds WHERE organization_id = %s", (org,))
        assert await cur.fetchall() == [("expired",)]  # by the first charge: no sweep came by
        assert await audit.check(conn) == []


async def test_a_capture_waiting_with_an_older_clock_finds_the_hold_expired_not_spent(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    """A capture whose transaction began before the hold's time waits for the wallet while a
    charge spends the money the hold no longer holds. Left open (only left out of the held
    balance), the hold was then captured as well, and spendable went below zero."""
    from gpudeck.kit.errors import FailedPrecondition
    from gpudeck.wallet.ledger_store import db_now

    ledger = LedgerStore()
    holds = HoldStore(ledger)
    org = await new_org()
    async with wallet_pool.connection() as conn, conn.transaction():
        await ledger.post_transfers(conn, [TransferRequest("cash", org, Kind.TOPUP, 10 * USD)])
        hold = await holds.create(conn, HoldRequest("h", org, 10 * USD, timeout_seconds=1))
    async with wallet_pool.connection() as capturing, capturing.transaction():
        await db_now(capturing)  # its clock: before the hold's time
        await asyncio.sleep(1.2)
        async with wallet_pool.connection() as charging:
            async with charging.transaction():
                [charged] = await ledger.post_transfers(
                    charging, [TransferRequest("spend", org, Kind.CHARGE, 10 * USD)],
                    fast_path=False,
                )  # fmt: skip
                assert charged.error is None
                capture = asyncio.ensure_future(holds.capture(capturing, hold.id, None, "cap"))
                await asyncio.sleep(0.3)
                assert not capture.done()  # waiting for the wallet
        with pytest.raises(FailedPrecondition):
            await capture
    async with wallet_pool.connection() as conn:
        cur = await conn.execute(
            "SELECT balance, held_balance FROM wallets WHERE organization_id = %s", (org,)
        )
        assert await cur.fetchone() == (0, 0)
        assert await audit.check(conn) == []


async def test_only_credits_that_outlive_a_hold_back_it(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    """A hold backed by credits that expire before it does: the sweep took them away while it
    was open, leaving spendable below zero and its capture overdrawing cash."""
    from datetime import UTC, datetime, timedelta

    from gpudeck.wallet.ledger import InsufficientFunds

    ledger = LedgerStore()
    holds = HoldStore(ledger)
    org = await new_org()
    soon, later = datetime.now(UTC) + timedelta(minutes=5), datetime.now(UTC) + timedelta(days=1)
    async with wallet_pool.connection() as conn, conn.transaction():
        await ledger.post_transfers(
            conn,
            [
                TransferRequest("soon", org, Kind.CREDIT_GRANT, 4 * USD, credit_expires_at=soon),
                TransferRequest("later", org, Kind.CREDIT_GRANT, 3 * USD, credit_expires_at=later),
                TransferRequest("cash", org, Kind.TOPUP, 2 * USD),
            ],
        )
    async with wallet_pool.connection() as conn, conn.transaction():
        with pytest.raises(InsufficientFunds, match="credits expiring before"):
            await holds.create(conn, HoldRequest("long", org, 6 * USD, timeout_seconds=3600))
        # Within the short credits' lifetime every credit counts.
        short = await holds.create(conn, HoldRequest("short", org, 9 * USD, timeout_seconds=60))
    assert short.status == "open"
    async with wallet_pool.connection() as conn, conn.transaction():
        await holds.void(conn, short.id, "void-short")
        held = await holds.create(conn, HoldRequest("long-2", org, 5 * USD, timeout_seconds=3600))
    assert held.amount == 5 * USD  # cash 2 + the credits that last the day 3


async def test_holds_fit_whichever_is_taken_first(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    """Cash 100 and credits 100 expiring in 30 min back a 10-minute hold of 100 (the credits)
    and an hour's hold of 100 (the cash), in either order. Short first, the long one was
    refused: every open hold and the credits expiring before it were both taken off."""
    from datetime import UTC, datetime, timedelta

    from gpudeck.wallet.ledger import InsufficientFunds

    ledger = LedgerStore()
    holds = HoldStore(ledger)
    expires = datetime.now(UTC) + timedelta(minutes=30)
    for order in (("long", "short"), ("short", "long")):
        org = await new_org()
        async with wallet_pool.connection() as conn, conn.transaction():
            await ledger.post_transfers(
                conn,
                [
                    TransferRequest("cash", org, Kind.TOPUP, 100 * USD),
                    TransferRequest(
                        "promo", org, Kind.CREDIT_GRANT, 100 * USD, credit_expires_at=expires
                    ),
                ],
            )
        seconds = {"short": 600, "long": 3600}
        async with wallet_pool.connection() as conn, conn.transaction():
            for name in order:
                hold = await holds.create(
                    conn, HoldRequest(name, org, 100 * USD, timeout_seconds=seconds[name])
                )
                assert hold.status == "open", order
        # Nothing more fits: not even 1 µ for 10 minutes (all 200 are held).
        async with wallet_pool.connection() as conn, conn.transaction():
            with pytest.raises(InsufficientFunds):
                await holds.create(conn, HoldRequest("more", org, 1, timeout_seconds=600))


async def test_the_audit_finds_a_hold_resolved_twice(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    """Its check that a hold is captured at most once could never fire (the capture's key is
    unique): it now finds a hold captured and then voided or expired."""
    from gpudeck.wallet import audit

    ledger = LedgerStore()
    holds = HoldStore(ledger)
    org = await new_org()
    async with wallet_pool.connection() as conn, conn.transaction():
        await ledger.post_transfers(conn, [TransferRequest("cash", org, Kind.TOPUP, 10 * USD)])
        hold = await holds.create(conn, HoldRequest("twice", org, 4 * USD))
        await holds.capture(conn, hold.id, 3 * USD, "capture-it")
    async with wallet_pool.connection() as conn:
        assert await audit.check(conn) == []
        async with conn.transaction(force_rollback=True):
            await conn.execute("UPDATE holds SET status = 'voided' WHERE id = %s", (hold.id,))
            problems = await audit.check(conn)
    assert any(p.startswith("a hold resolves once") and str(hold.id) in p for p in problems)


async def test_a_hold_met_past_its_time_expires_as_the_wallets_act_and_frees_a_deletion(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    """Expired by whoever's transfer met it, its event carried that caller as its actor (an
    expiry at its time is the wallet's own); and a deletion was refused over it, told to
    capture or void a hold neither could touch any more."""
    from gpudeck.kit.events import Outbox, parse_event
    from gpudeck.kit.logs import actor
    from gpudeck.wallet.accounts_store import AccountStore
    from gpudeck.wallet.organization_deletion import delete_organization

    ledger = LedgerStore()
    holds = HoldStore(ledger)
    org, other = await new_org(name="Gone"), await new_org()
    async with wallet_pool.connection() as conn, conn.transaction():
        await ledger.post_transfers(  # credits only: its cash stays 0, as a deletion needs
            conn, [TransferRequest("promo", org, Kind.CREDIT_GRANT, USD, credit_source="promotion")]
        )
        await ledger.post_transfers(conn, [TransferRequest("cash", other, Kind.TOPUP, USD)])
        for o in (org, other):
            await holds.create(conn, HoldRequest("h", o, USD, timeout_seconds=1))
    await asyncio.sleep(1.2)
    token = actor.set("user:alice")
    try:
        async with wallet_pool.connection() as conn, conn.transaction():
            [done] = await ledger.post_transfers(
                conn, [TransferRequest("spend", other, Kind.CHARGE, USD)], fast_path=False
            )
            assert done.error is None
    finally:
        actor.reset(token)
    async with wallet_pool.connection() as conn:
        cur = await conn.execute("SELECT data FROM outbox ORDER BY id")
        expired = [
            e for e in (parse_event(bytes(row[0])) for row in await cur.fetchall())
            if e.type == "wallet.hold.expired" and e.organization_id == str(other)
        ]  # fmt: skip
        assert [e.actor for e in expired] == ["system"]
    async with wallet_pool.connection() as conn, conn.transaction():
        gone = await delete_organization(
            AccountStore(Outbox("wallet")), ledger, conn, org, confirm_name="Gone"
        )
    assert gone.id == org
