"""Settling what the prepaid wallet already paid, and what never came back: invoices are marked
paid while the wallet's cash is not overdrawn (credits do not count; at once when a top-up ends an overdraft); automatic
top-ups pending too long fail (and fire again if the wallet is still below the rule's line).
Real PostgreSQL, the stores the workers call, and the running wallet for the top-up."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

from psycopg_pool import AsyncConnectionPool

from gpudeck.proto.common.v1.money_pb2 import Money
from gpudeck.proto.wallet.v1 import wallet_pb2 as pb
from gpudeck.proto.wallet.v1.wallet_pb2_grpc import WalletServiceStub
from gpudeck.wallet.invoices import OPEN, PAID, parse_period
from gpudeck.wallet.invoices_store import InvoiceStore
from gpudeck.wallet.ledger import Kind, TransferRequest
from gpudeck.wallet.ledger_store import LedgerStore
from gpudeck.wallet.thresholds_store import ThresholdStore

NewOrg = Callable[..., Awaitable[uuid.UUID]]
USD = 1_000_000


async def post(
    pool: AsyncConnectionPool, ledger: LedgerStore, org: uuid.UUID, kind: Kind, amount: int
) -> None:
    request = TransferRequest(
        uuid.uuid4().hex, org, kind, amount, resource_type="pod", allow_overdraft=True
    )
    async with pool.connection() as conn, conn.transaction():
        [outcome] = await ledger.post_transfers(conn, [request])
    assert outcome.error is None, outcome.error


async def spend_in(pool: AsyncConnectionPool, org: uuid.UUID, period: str, amount: int) -> None:
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO daily_spend (organization_id, day, resource_type, amount)"
            " VALUES (%s, %s, 'pod', %s)",
            (org, parse_period(period).start, amount),
        )


async def statuses(pool: AsyncConnectionPool, orgs: list[uuid.UUID]) -> dict[uuid.UUID, str]:
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT organization_id, status FROM invoices WHERE organization_id = ANY(%s)",
            (orgs,),
        )
        return dict(await cur.fetchall())


async def test_invoices_are_paid_unless_the_wallet_is_overdrawn(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    ledger, invoices = LedgerStore(), InvoiceStore(LedgerStore().outbox)
    funded, overdrawn = await new_org(), await new_org()
    await post(wallet_pool, ledger, funded, Kind.TOPUP, 10 * USD)
    await post(wallet_pool, ledger, overdrawn, Kind.USAGE, 3 * USD)  # metered: below zero
    for org in (funded, overdrawn):
        await spend_in(wallet_pool, org, "2025-02", 3 * USD)
        async with wallet_pool.connection() as conn, conn.transaction():
            await invoices.generate(conn, parse_period("2025-02"), org)
    assert await statuses(wallet_pool, [funded, overdrawn]) == {funded: OPEN, overdrawn: OPEN}

    async with wallet_pool.connection() as conn, conn.transaction():
        paid = await invoices.settle(conn, [funded, overdrawn])
    assert [i.organization_id for i in paid] == [funded]
    assert paid[0].status == PAID and paid[0].paid_at is not None
    assert await statuses(wallet_pool, [funded, overdrawn]) == {funded: PAID, overdrawn: OPEN}

    await post(wallet_pool, ledger, overdrawn, Kind.CREDIT_GRANT, 20 * USD)  # a promotion
    async with wallet_pool.connection() as conn, conn.transaction():
        assert await invoices.settle(conn, [overdrawn]) == [], "credits never pay back cash"

    await post(wallet_pool, ledger, overdrawn, Kind.TOPUP, 3 * USD)  # cash back to exactly zero
    async with wallet_pool.connection() as conn, conn.transaction():
        paid = await invoices.settle(conn, [funded, overdrawn])
    assert [i.organization_id for i in paid] == [overdrawn]
    async with wallet_pool.connection() as conn, conn.transaction():
        assert await invoices.settle(conn, [funded, overdrawn]) == []  # each once


async def pending(pool: AsyncConnectionPool, org: uuid.UUID) -> list[str]:
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT status FROM pending_topups WHERE organization_id = %s ORDER BY created_at, id",
            (org,),
        )
        return [row[0] for row in await cur.fetchall()]


async def test_a_top_up_pending_too_long_expires_the_rule_fires_again_and_a_late_payment_counts(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    ledger = LedgerStore()
    thresholds = ThresholdStore(ledger)
    stale, fresh = await new_org(), await new_org()
    for org in (stale, fresh):
        async with wallet_pool.connection() as conn, conn.transaction():
            await thresholds.set_auto_topup(conn, org, enabled=True, below=5 * USD, amount=USD)
        assert await pending(wallet_pool, org) == ["pending"]  # empty wallet: fires at once
    async with wallet_pool.connection() as conn:
        await conn.execute(
            "UPDATE pending_topups SET created_at = now() - interval '2 hours'"
            " WHERE organization_id = %s",
            (stale,),
        )

    async with wallet_pool.connection() as conn, conn.transaction():
        expired = await thresholds.fail_stale_topups(conn, 3600)
    assert expired >= 1
    assert await pending(wallet_pool, stale) == ["expired", "pending"]  # still below: asks again
    assert await pending(wallet_pool, fresh) == ["pending"]  # within the hour: left alone

    # The payment of the expired one succeeds after all: it is credited, not refused (the
    # customer paid), once; a late failure of it changes nothing.
    async with wallet_pool.connection() as conn:
        cur = await conn.execute(
            "SELECT id FROM pending_topups WHERE organization_id = %s AND status = 'expired'",
            (stale,),
        )
        [(late,)] = await cur.fetchall()
    for _ in range(2):  # the webhook retried
        async with wallet_pool.connection() as conn, conn.transaction():
            done = await thresholds.complete_topup(
                conn, late, succeeded=True, reference="pay-1", actor="payments"
            )
        assert done.status == "completed" and done.transaction_id is not None
    async with wallet_pool.connection() as conn:
        cur = await conn.execute("SELECT balance FROM wallets WHERE organization_id = %s", (stale,))
        assert await cur.fetchone() == (USD,)
    # The request made in its place is called off: one crossing adds its amount once.
    assert await pending(wallet_pool, stale) == ["completed", "cancelled"]
    async with wallet_pool.connection() as conn, conn.transaction():
        await conn.execute(
            "UPDATE pending_topups SET status = 'expired' WHERE organization_id = %s"
            " AND status = 'cancelled'",
            (stale,),
        )
        cur = await conn.execute(
            "SELECT id FROM pending_topups WHERE organization_id = %s AND status = 'expired'",
            (stale,),
        )
        [(other,)] = await cur.fetchall()
    async with wallet_pool.connection() as conn, conn.transaction():
        gone = await thresholds.complete_topup(
            conn, other, succeeded=False, reference="", actor="payments"
        )
    assert gone.status == "expired" and gone.transaction_id is None


async def test_a_top_up_that_ends_an_overdraft_pays_the_open_invoice_at_once(
    wallet_pool: AsyncConnectionPool, wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    org = await new_org()
    used = pb.TransferRequest(
        idempotency_key=uuid.uuid4().hex, organization_id=str(org), kind=pb.USAGE,
        amount=Money(amount=3 * USD), resource_type="pod",
    )  # fmt: skip
    await wallet_stub.Transfer(used, timeout=10)  # metered usage: the wallet is overdrawn
    await spend_in(wallet_pool, org, "2025-03", 3 * USD)
    generated = await wallet_stub.GenerateInvoices(
        pb.GenerateInvoicesRequest(period="2025-03", organization_id=str(org)), timeout=10
    )
    [invoice] = generated.invoices
    assert invoice.status == OPEN

    await asyncio.sleep(1.5)  # the announcer has seen the overdrawn wallet: still open
    assert await statuses(wallet_pool, [org]) == {org: OPEN}

    top_up = pb.TransferRequest(
        idempotency_key=uuid.uuid4().hex, organization_id=str(org), kind=pb.TOPUP,
        amount=Money(amount=2 * USD),
    )  # fmt: skip
    await wallet_stub.Transfer(top_up, timeout=10)  # -1 USD: still overdrawn
    await asyncio.sleep(1.5)
    assert await statuses(wallet_pool, [org]) == {org: OPEN}

    top_up.idempotency_key = uuid.uuid4().hex
    await wallet_stub.Transfer(top_up, timeout=10)  # +1 USD: covered
    deadline = time.monotonic() + 5
    while await statuses(wallet_pool, [org]) != {org: PAID}:
        assert time.monotonic() < deadline, "the invoice was not paid after the top-up"
        await asyncio.sleep(0.1)
    got = await wallet_stub.GetInvoice(pb.GetInvoiceRequest(invoice_id=invoice.id), timeout=10)
    assert got.status == PAID and got.HasField("paid_at")
