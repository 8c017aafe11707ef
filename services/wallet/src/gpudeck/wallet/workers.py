"""The wallet's background loops: billing ticks, hold and credit expiry, balance announcements."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from gpudeck.kit.workers import Periodic
from gpudeck.wallet import events
from gpudeck.wallet.deps import Wallet
from gpudeck.wallet.invoices import billable_period
from gpudeck.wallet.invoices_store import InvoiceStore
from gpudeck.wallet.ledger import Kind, TransferRequest
from gpudeck.wallet.ledger_store import db_now, lock_wallets
from gpudeck.wallet.metering_store import bill_open_meters

log = logging.getLogger(__name__)


async def expire_holds(wallet: Wallet) -> int:
    async with wallet.pool.connection() as conn, conn.transaction():
        return await wallet.holds.expire_due(conn)


async def expire_credits(wallet: Wallet, *, limit: int = 1000) -> int:
    """Move what is left on expired credit grants to the platform's expired-credits account."""
    async with wallet.pool.connection() as conn, conn.transaction():
        cur = await conn.execute(
            "SELECT id, organization_id, balance FROM ledger_accounts"
            " WHERE kind = 'credit' AND balance > 0 AND expires_at <= now() LIMIT %s",
            (limit,),
        )
        due = await cur.fetchall()
        if not due:
            return 0
        now = await db_now(conn)
        # Expired credits are no longer loaded as spendable: lock and recompute from the rows.
        await lock_wallets(conn, [org for _, org, _ in due], now)
        requests = [
            TransferRequest(
                key=f"credit-expiry:{acct_id}",
                organization_id=org,
                kind=Kind.CREDIT_EXPIRY,
                amount=balance,
                description="Credits expired",
                reference=str(acct_id),
                actor="system",
            )
            for acct_id, org, balance in due
        ]
        outcomes = await wallet.ledger.post_transfers(conn, requests, now=now)
        return sum(1 for o in outcomes if o.error is None)


async def announce_balances(wallet: Wallet, *, limit: int = 500) -> int:
    """Emit wallet.balance.changed for wallets that changed, at most once a second each."""
    async with wallet.pool.connection() as conn, conn.transaction():
        cur = await conn.execute(
            "UPDATE wallets w SET announced_at = now()"
            " FROM (SELECT organization_id FROM wallets"
            "       WHERE changed_at > announced_at AND announced_at <= now() - interval '1 second'"
            "       LIMIT %s FOR UPDATE SKIP LOCKED) due"
            " WHERE w.organization_id = due.organization_id"
            " RETURNING w.organization_id, w.currency, w.balance, w.held_balance, w.run_rate, w.level",
            (limit,),
        )
        rows = await cur.fetchall()
        await wallet.ledger.outbox.add_many(
            conn,
            [
                events.balance_event(
                    "wallet.balance.changed",
                    org,
                    currency=currency,
                    balance=balance,
                    held_balance=held,
                    run_rate=rate,
                    level=level,
                )
                for org, currency, balance, held, rate, level in rows
            ],
        )
        return len(rows)


async def issue_last_month_invoices(wallet: Wallet) -> int:
    """Issue last month's invoices for every organization that spent in it (idempotent, so every
    replica may run it every hour; on the 1st it issues them)."""
    async with wallet.pool.connection() as conn, conn.transaction():
        now = await db_now(conn)
        return len(
            await InvoiceStore(wallet.ledger.outbox).generate(conn, billable_period("", now))
        )


def loops(wallet: Wallet) -> Sequence[Periodic]:
    async def housekeeping() -> None:
        await expire_holds(wallet)
        await expire_credits(wallet)

    async def bill() -> None:
        await bill_open_meters(wallet.pool, wallet.meters)

    async def announce() -> None:
        await announce_balances(wallet)

    async def invoice() -> None:
        await issue_last_month_invoices(wallet)

    return [
        Periodic("wallet-billing", wallet.settings.billing_interval, bill),
        Periodic("wallet-invoicing", 3600.0, invoice),
        Periodic("wallet-housekeeping", 1.0, housekeeping),
        Periodic("wallet-announcer", wallet.settings.announce_interval, announce),
    ]
