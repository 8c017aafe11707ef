"""The wallet's background loops: billing ticks, hold and credit expiry, balance announcements,
plan renewals and invoices."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from gpudeck.kit.workers import Periodic
from gpudeck.wallet import events
from gpudeck.wallet.deps import Wallet
from gpudeck.wallet.invoices import billable_period
from gpudeck.wallet.invoices_store import InvoiceStore
from gpudeck.wallet.ledger import Kind, TransferRequest
from gpudeck.wallet.ledger_store import db_now, lock_wallets
from gpudeck.wallet.metering_store import bill_open_meters
from gpudeck.wallet.plans_store import PlanStore
from gpudeck.wallet.rates import RateProvider
from gpudeck.wallet.rates_file import FileRateProvider, RatesFileError
from gpudeck.wallet.readmodels_store import HELD_NOW, import_rates
from gpudeck.wallet.thresholds_store import ThresholdStore

log = logging.getLogger(__name__)
RENEWAL_PAGE = 500  # organizations read at a time by renew_plans


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
                # A grant can expire more than once: a refund may give an expired one money back.
                key=f"credit-expiry:{acct_id}:{now.isoformat()}",
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


# The wallets due for a wallet.balance.changed: moved since their last one (migration 014's
# change counter), which was a second ago or more. The clock, not now(): an announcing
# transaction may have spent a while on the sweep's level check since it began.
DUE = "w.change_seq > a.announced_seq AND a.announced_at <= clock_timestamp() - interval '1 second'"
# Stamps and returns them. It locks only the announcement rows (another announcer skips those),
# never the wallet rows writers hold: what is announced is what is committed. (The sweep's level
# check locks the wallets no writer holds, skipping the others.) Held as the card reads it: holds
# past their time, which the sweep is yet to expire, hold nothing.
ANNOUNCE = (
    "WITH due AS ("
    f" SELECT w.organization_id, w.currency, w.balance, {HELD_NOW} AS held_balance, w.run_rate,"
    "  w.level, w.change_seq"
    " FROM wallets w JOIN wallet_announcements a USING (organization_id) WHERE {where}"
    " ORDER BY w.organization_id LIMIT %s FOR UPDATE OF a SKIP LOCKED),"
    " stamped AS (UPDATE wallet_announcements a"
    "  SET announced_at = clock_timestamp(), announced_seq = due.change_seq FROM due"
    "  WHERE a.organization_id = due.organization_id RETURNING a.organization_id)"
    " SELECT organization_id, currency, balance, held_balance, run_rate, level"
    " FROM due JOIN stamped USING (organization_id)"
)
# The due wallets no writer holds, locked for the sweep's level check (busy ones are skipped:
# their writer checks their level).
UNHELD = (
    "SELECT w.organization_id FROM wallets w JOIN wallet_announcements a USING (organization_id)"
    " WHERE {where} ORDER BY w.organization_id LIMIT %s FOR UPDATE OF w SKIP LOCKED"
)
SWEEP_INTERVAL = 30.0  # seconds between scans of every wallet
ANNOUNCE_BATCH = 500  # wallets per announcing transaction


async def announce_balances(
    wallet: Wallet, *, limit: int = ANNOUNCE_BATCH, sweep: bool = False
) -> int:
    """Emit wallet.balance.changed for wallets that changed, at most once a second each, and
    settle the open invoices of those a move (a top-up) brought back from an overdraft.

    Which wallets: those this process changed (the ledger notes them in memory), looked up by
    key, so the cost follows the changes, not the number of wallets. A `sweep` scans them all
    instead: it finds what another replica's notes or a crashed process's lost (the loop
    sweeps at start and every SWEEP_INTERVAL seconds). Wallets changed again within the second,
    or held by a writer just now, are noted again for the next round, and so is each one
    announced (a writer that noted it may commit after the announcement)."""
    changed = [] if sweep else wallet.ledger.take_changed()
    if not sweep and not changed:
        return 0
    try:
        async with wallet.pool.connection() as conn, conn.transaction():
            if sweep:
                # A change whose level check was lost (a crash right after a fast-path commit)
                # has its edge found here, before it is announced.
                cur = await conn.execute(UNHELD.format(where=DUE), (limit,))
                unheld = [row[0] for row in await cur.fetchall()]
                if unheld:
                    await wallet.ledger.refresh_levels(conn, unheld)
                cur = await conn.execute(ANNOUNCE.format(where=DUE), (limit,))
            else:
                cur = await conn.execute(
                    ANNOUNCE.format(where=f"w.organization_id = ANY(%s) AND {DUE}"),
                    (changed, limit),
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
            covered = [row[0] for row in rows if row[2] >= 0]
            if covered:  # a top-up that ends an overdraft pays the open invoices at once
                await InvoiceStore(wallet.ledger.outbox).settle(
                    conn, covered, moved_since_issue=True
                )
            announced = {row[0] for row in rows}
            # The general path, holds and meters note a wallet before their commit: one may
            # still be writing what this round could not see. Each announced wallet is looked
            # at once more next round (as `rest` is), so that change is not left to the sweep.
            wallet.ledger.mark_changed(o for o in changed if o in announced)
            rest = [o for o in changed if o not in announced]
            if rest:  # not due yet, or a writer holds them (its change may not be committed)
                cur = await conn.execute(
                    "SELECT organization_id, w.change_seq > a.announced_seq"
                    " FROM wallets w JOIN wallet_announcements a USING (organization_id)"
                    " WHERE organization_id = ANY(%s)",
                    (rest,),
                )
                pending: dict[uuid.UUID, bool] = dict(await cur.fetchall())
                cur = await conn.execute(
                    "SELECT organization_id FROM wallets"
                    " WHERE organization_id = ANY(%s) FOR SHARE SKIP LOCKED",
                    (list(pending),),
                )
                free = {row[0] for row in await cur.fetchall()}
                wallet.ledger.mark_changed(o for o, due in pending.items() if due or o not in free)
    except BaseException:
        wallet.ledger.mark_changed(changed)  # not announced: keep them for the next round
        raise
    return len(rows)


async def issue_last_month_invoices(wallet: Wallet) -> int:
    """Issue last month's invoices for every organization that spent in it (idempotent, so every
    replica may run it every hour; on the 1st it issues them)."""
    async with wallet.pool.connection() as conn, conn.transaction():
        now = await db_now(conn)
        return len(
            await InvoiceStore(wallet.ledger.outbox).generate(conn, billable_period("", now))
        )


async def settle_invoices(wallet: Wallet) -> int:
    """Mark paid every open invoice its wallet's balance covers (see InvoiceStore.settle)."""
    settled = 0
    store = InvoiceStore(wallet.ledger.outbox)
    while True:
        async with wallet.pool.connection() as conn, conn.transaction():
            paid = await store.settle(conn)
        settled += len(paid)
        if not paid:
            return settled


async def renew_plans(wallet: Wallet, *, now: datetime | None = None) -> dict[str, int]:
    """Renew every paid plan not yet paid for this month, one organization per transaction (so
    every replica may run it every hour: the ledger keys make a second run a no-op). One that
    fails is logged and left for the next run; the others are renewed."""
    store = PlanStore(wallet.ledger)
    async with wallet.pool.connection() as conn:
        now = now or await db_now(conn)
    done: dict[str, int] = {"renewed": 0, "downgraded": 0, "failed": 0}
    after = None
    while True:
        async with wallet.pool.connection() as conn:
            due = await store.due_renewals(conn, now, after=after, limit=RENEWAL_PAGE)
        if not due:
            return done
        for org in due:
            try:
                async with wallet.pool.connection() as conn, conn.transaction():
                    result = await store.renew(conn, org, now)
            except Exception:
                log.exception("plan not renewed", extra={"organization_id": str(org)})
                done["failed"] += 1
                continue
            if result:
                done[result] += 1
        after = due[-1]


async def import_provider_rates(wallet: Wallet, provider: RateProvider) -> int:
    """Store what `provider` quotes now; a provider that fails is logged (the rates stored
    before stay in use). How many were stored."""
    try:
        async with wallet.pool.connection() as conn, conn.transaction():
            stored = await import_rates(conn, provider, [])
        provider.stored()
        return len(stored)
    except RatesFileError as exc:
        log.warning(
            "exchange rates not imported", extra={"source": provider.name, "error": str(exc)}
        )
        return 0


def loops(wallet: Wallet) -> Sequence[Periodic]:
    async def housekeeping() -> None:
        await expire_holds(wallet)
        await expire_credits(wallet)
        async with wallet.pool.connection() as conn, conn.transaction():
            await ThresholdStore(wallet.ledger).fail_stale_topups(
                conn, wallet.settings.auto_topup_timeout
            )

    async def bill() -> None:
        await bill_open_meters(wallet.pool, wallet.meters)

    swept_at = -SWEEP_INTERVAL

    async def announce() -> None:
        nonlocal swept_at
        now = time.monotonic()
        if now - swept_at >= SWEEP_INTERVAL:
            swept_at = now
            while await announce_balances(wallet, sweep=True) == ANNOUNCE_BATCH:
                pass
        await announce_balances(wallet)

    async def monthly() -> None:  # hourly: plan renewals, invoices, settling them
        await renew_plans(wallet)
        await issue_last_month_invoices(wallet)
        await settle_invoices(wallet)

    rate_loops = []
    if wallet.settings.rates_file:
        provider = FileRateProvider(Path(wallet.settings.rates_file))

        async def import_file_rates() -> None:
            await import_provider_rates(wallet, provider)

        rate_loops.append(
            Periodic("wallet-rates", wallet.settings.rates_interval, import_file_rates)
        )
    return [
        *rate_loops,
        Periodic("wallet-billing", wallet.settings.billing_interval, bill),
        Periodic("wallet-monthly", 3600.0, monthly),  # plan renewals, then invoices
        Periodic("wallet-housekeeping", 1.0, housekeeping),
        Periodic("wallet-announcer", wallet.settings.announce_interval, announce),
    ]
