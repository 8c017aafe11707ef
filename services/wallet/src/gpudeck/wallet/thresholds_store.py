"""All SQL of alert settings: low-balance thresholds, the auto top-up rule and the completion of
the top-ups it requests. Changing a setting re-settles the wallet's level at once, so a crossing
the new setting causes emits its one edge event (and a rule already due fires) in the same
transaction. Lock order, as everywhere: the wallet row first.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection

from gpudeck.kit.errors import FailedPrecondition, NotFound
from gpudeck.wallet import events
from gpudeck.wallet.alert_settings import (
    MAX_AUTO_TOPUP_FAILURES,
    AutoTopUp,
    PendingTopUp,
    ThresholdSettings,
    check_auto_topup,
    give_up_reason,
    gives_up,
    merge_thresholds,
)
from gpudeck.wallet.alerts import Thresholds
from gpudeck.wallet.ledger import Kind, TransferRequest, no_kyc_room
from gpudeck.wallet.ledger_store import LedgerStore, db_now, lock_wallets

Conn = AsyncConnection[Any]
PENDING_COLUMNS = "id, organization_id, amount, currency, status, created_at, transaction_id"


class ThresholdStore:
    def __init__(self, ledger: LedgerStore) -> None:
        self.ledger = ledger

    async def _lock(self, conn: Conn, organization_id: uuid.UUID) -> datetime:
        now = await db_now(conn)
        if organization_id not in await lock_wallets(conn, [organization_id], now):
            raise NotFound(f"organization {organization_id} not found", field="organization_id")
        return now

    async def get_thresholds(self, conn: Conn, organization_id: uuid.UUID) -> ThresholdSettings:
        cur = await conn.execute(
            "SELECT coalesce(t.warning_amount, 0), coalesce(t.critical_amount, 0),"
            " coalesce(t.warning_hours, 0), coalesce(t.critical_hours, 0), w.level"
            " FROM wallets w LEFT JOIN thresholds t USING (organization_id)"
            " WHERE w.organization_id = %s",
            (organization_id,),
        )
        row = await cur.fetchone()
        if row is None:
            raise NotFound(f"organization {organization_id} not found", field="organization_id")
        wa, ca, wh, ch, level = row
        return ThresholdSettings(organization_id, Thresholds(wa, ca, wh, ch), level)

    async def set_thresholds(
        self, conn: Conn, organization_id: uuid.UUID, thresholds: Thresholds,
        fields: list[str] | None = None,
    ) -> ThresholdSettings:  # fmt: skip
        """Save the `fields` of `thresholds` (all when none), then settle the level: a crossing
        they cause emits its event."""
        now = await self._lock(conn, organization_id)
        current = await self.get_thresholds(conn, organization_id)
        t = merge_thresholds(current.thresholds, thresholds, fields or [])
        await conn.execute(
            "INSERT INTO thresholds (organization_id, warning_amount, critical_amount,"
            " warning_hours, critical_hours) VALUES (%s, %s, %s, %s, %s)"
            " ON CONFLICT (organization_id) DO UPDATE SET warning_amount = excluded.warning_amount,"
            " critical_amount = excluded.critical_amount, warning_hours = excluded.warning_hours,"
            " critical_hours = excluded.critical_hours",
            (
                organization_id,
                t.warning_amount,
                t.critical_amount,
                t.warning_hours,
                t.critical_hours,
            ),
        )
        await self.ledger.refresh_levels(conn, [organization_id], now)
        return await self.get_thresholds(conn, organization_id)

    async def get_auto_topup(self, conn: Conn, organization_id: uuid.UUID) -> AutoTopUp:
        cur = await conn.execute(
            "SELECT coalesce(u.enabled, false), coalesce(u.below, 0), coalesce(u.amount, 0),"
            " w.currency, coalesce(u.disabled_reason, '')"
            " FROM wallets w LEFT JOIN auto_topups u USING (organization_id)"
            " WHERE w.organization_id = %s",
            (organization_id,),
        )
        row = await cur.fetchone()
        if row is None:
            raise NotFound(f"organization {organization_id} not found", field="organization_id")
        enabled, below, amount, currency, disabled_reason = row
        cur = await conn.execute(
            f"SELECT {PENDING_COLUMNS} FROM pending_topups"
            " WHERE organization_id = %s AND status = 'pending'",
            (organization_id,),
        )
        pending = await cur.fetchone()
        return AutoTopUp(
            organization_id,
            enabled,
            below,
            amount,
            currency,
            PendingTopUp(*pending) if pending else None,
            disabled_reason,
        )

    async def set_auto_topup(
        self, conn: Conn, organization_id: uuid.UUID, *, enabled: bool, below: int, amount: int
    ) -> AutoTopUp:
        """Save the rule "below `below`, add `amount`"; fires at once if the balance is below.
        Saving clears why the rule had turned itself off, if it had."""
        check_auto_topup(enabled=enabled, below=below, amount=amount)
        now = await self._lock(conn, organization_id)
        limits = self.ledger.policy.kyc_limits
        if enabled and limits.any():  # a rule with no room left under the KYC limit never fires
            cur = await conn.execute(
                "SELECT o.kyc_status = 'verified', w.currency, money_added(o.id)"
                " FROM organizations o JOIN wallets w ON w.organization_id = o.id WHERE o.id = %s",
                (organization_id,),
            )
            verified, currency, added = await cur.fetchone() or (True, "", 0)
            limit = limits.of(currency)
            if limit and not verified and added + amount > limit:
                raise no_kyc_room(limit, added, currency)
        await conn.execute(
            "INSERT INTO auto_topups (organization_id, enabled, below, amount)"
            " VALUES (%s, %s, %s, %s) ON CONFLICT (organization_id) DO UPDATE"
            " SET enabled = excluded.enabled, below = excluded.below, amount = excluded.amount,"
            " failures = 0, disabled_reason = ''",
            (organization_id, enabled, below, amount),
        )
        await self.ledger.refresh_levels(conn, [organization_id], now)
        return await self.get_auto_topup(conn, organization_id)

    async def complete_topup(
        self, conn: Conn, pending_id: uuid.UUID, *, succeeded: bool, reference: str, actor: str
    ) -> PendingTopUp:
        """Resolve a requested top-up once: on success the money is posted (a TOPUP keyed
        "auto-topup:<id>"). The same resolution again (a payment webhook retried) returns it
        as it is; the other one is FailedPrecondition (ALREADY_RESOLVED). A success reported
        after the request expired (`fail_stale_topups`) is still credited: the payment went
        through. A failure that makes MAX_AUTO_TOPUP_FAILURES in a row turns the rule off."""
        cur = await conn.execute(
            "SELECT organization_id FROM pending_topups WHERE id = %s", (pending_id,)
        )
        row = await cur.fetchone()
        if row is None:
            raise NotFound(f"pending top-up {pending_id} not found", field="pending_top_up_id")
        organization_id = row[0]
        try:
            now = await self._lock(conn, organization_id)
        except NotFound:
            return await self._after_deletion(conn, pending_id, succeeded)
        cur = await conn.execute(
            f"SELECT {PENDING_COLUMNS} FROM pending_topups WHERE id = %s FOR UPDATE", (pending_id,)
        )
        found = await cur.fetchone()
        assert found is not None
        pending = PendingTopUp(*found)
        late = pending.status in ("expired", "cancelled")  # a success is credited all the same
        if late and not succeeded:
            return pending  # it failed already, by timing out (or was called off): nothing to add
        if pending.status not in ("pending", "expired", "cancelled"):
            if pending.status == ("completed" if succeeded else "failed"):
                return pending
            raise FailedPrecondition(
                f"top-up {pending_id} is already {pending.status}",
                field="pending_top_up_id",
                reason="ALREADY_RESOLVED",
            )
        tx_id = None
        if succeeded:
            [outcome] = await self.ledger.post_transfers(
                conn,
                [
                    TransferRequest(
                        key=f"auto-topup:{pending_id}",
                        organization_id=organization_id,
                        kind=Kind.TOPUP,
                        amount=pending.amount,
                        currency=pending.currency,
                        description="Automatic top-up",
                        reference=reference,
                        actor=actor or "system",
                        kyc_checked=True,
                    )
                ],
                now=now,
            )
            if outcome.error is not None:
                raise outcome.error
            assert outcome.transaction is not None
            tx_id = outcome.transaction.id
        cur = await conn.execute(
            "UPDATE pending_topups SET status = %s, transaction_id = %s, resolved_at = %s"
            f" WHERE id = %s RETURNING {PENDING_COLUMNS}",
            ("completed" if succeeded else "failed", tx_id, now, pending_id),
        )
        done = await cur.fetchone()
        assert done is not None
        if succeeded:
            await self._count_success(conn, pending)
            if pending.status == "expired":
                await self._cancel_requested_since(conn, organization_id, now)
        elif pending.status == "pending":
            await self._count_failures(conn, [organization_id])
        return PendingTopUp(*done)

    async def _after_deletion(
        self, conn: Conn, pending_id: uuid.UUID, succeeded: bool
    ) -> PendingTopUp:
        """The organization is gone (deleted once no top-up was pending: this one had expired or
        been called off). A failure changes nothing; a payment taken after all cannot be
        credited, and the payment side is told to give it back (it was NOT_FOUND, as if the
        top-up had never been asked for, and the customer's money went nowhere)."""
        cur = await conn.execute(
            f"SELECT {PENDING_COLUMNS} FROM pending_topups WHERE id = %s", (pending_id,)
        )
        found = await cur.fetchone()
        assert found is not None
        pending = PendingTopUp(*found)
        if not succeeded or pending.status in ("completed", "failed"):
            return pending
        raise FailedPrecondition(
            f"organization {pending.organization_id} was deleted after top-up {pending_id}"
            " timed out: its payment cannot be credited; refund it",
            field="pending_top_up_id",
            reason="ORGANIZATION_DELETED",
        )

    async def _count_success(self, conn: Conn, pending: PendingTopUp) -> None:
        """A top-up paid: the failures in a row are those requested after it (none, unless it
        is paid late: its expiry counted as one). A rule that its expiry turned off, and that
        no longer has MAX_AUTO_TOPUP_FAILURES in a row without it, is on again (it stayed off,
        saying three had failed, with two)."""
        await conn.execute(
            """
            WITH later AS (
                SELECT count(*) AS n FROM pending_topups
                WHERE organization_id = %(org)s AND created_at > %(at)s
                  AND status IN ('failed', 'expired')
            ), counted AS (
                SELECT a.organization_id, least(a.failures, later.n) AS failures,
                       NOT a.enabled AND a.disabled_reason = %(reason)s
                           AND least(a.failures, later.n) < %(max)s AS back_on
                FROM auto_topups a, later WHERE a.organization_id = %(org)s
            )
            UPDATE auto_topups a SET failures = c.failures,
                enabled = a.enabled OR c.back_on,
                disabled_reason = CASE WHEN c.back_on THEN '' ELSE a.disabled_reason END
            FROM counted c WHERE a.organization_id = c.organization_id
            """,
            {
                "org": pending.organization_id,
                "at": pending.created_at,
                "reason": give_up_reason(),
                "max": MAX_AUTO_TOPUP_FAILURES,
            },
        )

    async def _cancel_requested_since(
        self, conn: Conn, organization_id: uuid.UUID, now: datetime
    ) -> None:
        """An expired top-up succeeded after all: the request made in its place (the rule fired
        again) is cancelled, and the payment side told, so one crossing adds its amount once."""
        cur = await conn.execute(
            "UPDATE pending_topups SET status = 'cancelled', resolved_at = %s"
            " WHERE organization_id = %s AND status = 'pending' RETURNING id, amount, currency",
            (now, organization_id),
        )
        await self.ledger.outbox.add_many(
            conn,
            [
                events.auto_topup(
                    "wallet.autotopup.cancelled", organization_id, pending_id, amount, currency
                )
                for pending_id, amount, currency in await cur.fetchall()
            ],
        )

    async def fail_stale_topups(self, conn: Conn, older_than_seconds: float) -> int:
        """Expire the automatic top-ups still pending after `older_than_seconds` (the payment
        did not come back in time; counted as a failure), so the rule is free to fire again: at
        once if the wallet is still below its line (a new request), unless that made
        MAX_AUTO_TOPUP_FAILURES in a row and turned the rule off. A payment that succeeds after
        all is still credited (`complete_topup`). How many expired."""
        stale = "status = 'pending' AND created_at < now() - make_interval(secs => %s)"
        cur = await conn.execute(
            f"SELECT DISTINCT organization_id FROM pending_topups WHERE {stale}",
            (older_than_seconds,),
        )
        orgs = [row[0] for row in await cur.fetchall()]
        if not orgs:
            return 0
        now = await db_now(conn)
        await lock_wallets(conn, orgs, now)  # the wallet first, as everywhere
        cur = await conn.execute(
            "UPDATE pending_topups SET status = 'expired', resolved_at = %s"
            f" WHERE organization_id = ANY(%s) AND {stale} RETURNING organization_id",
            (now, orgs, older_than_seconds),
        )
        failed = [row[0] for row in await cur.fetchall()]
        await self._count_failures(conn, failed)
        await self.ledger.refresh_levels(conn, orgs, now)
        return len(failed)

    async def _count_failures(self, conn: Conn, organization_ids: list[uuid.UUID]) -> None:
        """One more failed top-up in a row for each of these organizations (one each); the
        rules that reach MAX_AUTO_TOPUP_FAILURES turn off, each with its
        wallet.autotopup.disabled. The caller holds the wallets."""
        cur = await conn.execute(
            "UPDATE auto_topups SET failures = failures + 1 WHERE organization_id = ANY(%s)"
            " RETURNING organization_id, failures, enabled",
            (organization_ids,),
        )
        failing = [
            org for org, failures, enabled in await cur.fetchall() if enabled and gives_up(failures)
        ]
        if not failing:
            return
        reason = give_up_reason()
        await conn.execute(
            "UPDATE auto_topups SET enabled = false, disabled_reason = %s"
            " WHERE organization_id = ANY(%s)",
            (reason, failing),
        )
        await self.ledger.outbox.add_many(
            conn,
            [events.auto_topup_disabled(org, reason, MAX_AUTO_TOPUP_FAILURES) for org in failing],
        )
