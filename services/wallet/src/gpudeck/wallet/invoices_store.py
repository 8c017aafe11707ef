"""All SQL of invoices: made from the daily_spend rollup, one per organization and period.

UNIQUE (organization_id, period) makes generating idempotent: a second run (or a concurrent
one) inserts nothing and returns the invoices already issued, unchanged.
"""

from __future__ import annotations

import json
import uuid
from collections import defaultdict
from dataclasses import replace
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection

from gpudeck.kit.errors import InvalidArgument, NotFound
from gpudeck.kit.events import Outbox
from gpudeck.wallet import plan_events
from gpudeck.wallet.ids import uuid7
from gpudeck.wallet.invoices import (
    OPEN,
    PAID,
    Invoice,
    Period,
    check_payable,
    new_invoice,
    parse_period,
)
from gpudeck.wallet.ledger_store import db_now

Conn = AsyncConnection[Any]
COLUMNS = (
    "i.id, i.organization_id, coalesce(i.organization_name, o.name), i.period, i.currency, i.lines, i.status,"
    " i.issued_at, i.paid_at"
)
SELECT = f"SELECT {COLUMNS} FROM invoices i JOIN organizations o ON o.id = i.organization_id"
SPEND = """
SELECT organization_id, resource_type, sum(amount)::bigint FROM daily_spend
WHERE day >= %s AND day < %s AND (%s::uuid IS NULL OR organization_id = %s)
GROUP BY organization_id, resource_type
"""
INSERT = """
INSERT INTO invoices (id, organization_id, organization_name, period, currency, total, lines,
                      issued_at)
SELECT * FROM unnest(%s::uuid[], %s::uuid[], %s::text[], %s::text[], %s::text[], %s::bigint[],
                     %s::jsonb[], %s::timestamptz[])
ON CONFLICT (organization_id, period) DO NOTHING
RETURNING id
"""


def _invoice(row: Any) -> Invoice:
    (invoice_id, org, name, period, currency, lines, status, issued_at, paid_at) = row
    return Invoice(
        id=invoice_id,
        organization_id=org,
        organization_name=name,
        period=parse_period(period),
        currency=currency,
        lines=Invoice.lines_from_json(lines),
        status=status,
        issued_at=issued_at,
        paid_at=paid_at,
    )


class InvoiceStore:
    """Issues, lists and settles invoices."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox

    async def generate(
        self, conn: Conn, period: Period, organization_id: uuid.UUID | None = None
    ) -> list[Invoice]:
        """Issue the invoices of `period`: for `organization_id` (even with nothing spent), or
        for every organization that spent in it. Returns them all, new and earlier ones."""
        created = deleted = None
        if organization_id is not None:
            created, deleted = await _organization_lifetime(conn, organization_id)
        now = await db_now(conn)
        cur = await conn.execute(
            SPEND, (period.start, period.end, organization_id, organization_id)
        )
        spend: dict[uuid.UUID, dict[str, int]] = defaultdict(dict)
        for org, resource_type, amount in await cur.fetchall():
            spend[org][resource_type] = amount
        if created is not None and Period.of(created) > period and not spend:
            raise InvalidArgument(  # nothing to bill: not even a zero invoice
                f"period {period} ended before organization {organization_id} was created"
                f" ({created.date().isoformat()})",
                field="period",
            )
        if deleted is not None and period > Period.of(deleted) and not spend:
            raise InvalidArgument(
                f"period {period} began after organization {organization_id} was deleted"
                f" ({deleted.date().isoformat()})",
                field="period",
            )
        orgs = sorted({organization_id} if organization_id else set(spend))
        if not orgs:
            return []
        # A deleted organization has no wallet row left, but its last month is still billed:
        # its currency is its cash account's.
        cur = await conn.execute(
            "SELECT o.id, o.name, coalesce(w.currency, (SELECT a.currency FROM ledger_accounts a"
            "  WHERE a.organization_id = o.id AND a.kind = 'cash' LIMIT 1))"
            " FROM organizations o LEFT JOIN wallets w ON w.organization_id = o.id"
            " WHERE o.id = ANY(%s)",
            (orgs,),
        )
        drafts = [
            new_invoice(uuid7(), org, name, period, currency, spend.get(org, {}), now)
            for org, name, currency in await cur.fetchall()
        ]
        cur = await conn.execute(
            INSERT,
            (
                [d.id for d in drafts],
                [d.organization_id for d in drafts],
                [d.organization_name for d in drafts],
                [str(period)] * len(drafts),
                [d.currency for d in drafts],
                [d.total for d in drafts],
                [json.dumps(d.lines_json()) for d in drafts],
                [now] * len(drafts),
            ),
        )
        issued = {row[0] for row in await cur.fetchall()}
        await self.outbox.add_many(
            conn,
            [
                plan_events.invoice_changed(plan_events.INVOICE_ISSUED, d)
                for d in drafts
                if d.id in issued
            ],
        )
        cur = await conn.execute(
            f"{SELECT} WHERE i.period = %s AND i.organization_id = ANY(%s)"
            " ORDER BY i.organization_id",
            (str(period), orgs),
        )
        return [_invoice(row) for row in await cur.fetchall()]

    async def list_invoices(
        self, conn: Conn, organization_id: uuid.UUID, *, limit: int
    ) -> list[Invoice]:
        """The organization's invoices, the newest period first."""
        await _organization_lifetime(conn, organization_id)  # NotFound for an unknown one
        cur = await conn.execute(
            f"{SELECT} WHERE i.organization_id = %s ORDER BY i.period DESC LIMIT %s",
            (organization_id, limit),
        )
        return [_invoice(row) for row in await cur.fetchall()]

    async def get(
        self,
        conn: Conn,
        invoice_id: uuid.UUID,
        organization_id: uuid.UUID | None = None,
        *,
        lock: bool = False,
    ) -> Invoice:
        """The invoice; NotFound if it does not exist or belongs to another organization."""
        cur = await conn.execute(
            f"{SELECT} WHERE i.id = %s{' FOR UPDATE OF i' if lock else ''}", (invoice_id,)
        )
        row = await cur.fetchone()
        if row is None or (organization_id is not None and row[1] != organization_id):
            raise NotFound(f"invoice {invoice_id} not found", field="invoice_id")
        return _invoice(row)

    async def settle(
        self,
        conn: Conn,
        organization_ids: list[uuid.UUID] | None = None,
        *,
        limit: int = 1000,
        moved_since_issue: bool = False,
    ) -> list[Invoice]:
        """Mark paid the open invoices the prepaid balance has covered: the wallet paid each
        charge as it accrued, so an invoice is settled unless the wallet's cash is overdrawn
        (metered usage may take it below zero, and credits granted later never pay that back);
        then it stays open until a top-up brings the cash back to zero.
        `moved_since_issue`: only those whose wallet moved after the invoice was issued (what
        a top-up does; the balance announcer settles these within a second of it)."""
        cur = await conn.execute(
            "UPDATE invoices SET status = %s, paid_at = now() WHERE id IN ("
            " SELECT i.id FROM invoices i LEFT JOIN wallets w"
            "  ON w.organization_id = i.organization_id"
            # no wallet: the organization was deleted, which it could be only with its cash at 0
            " WHERE i.status = %s AND (w.organization_id IS NULL OR w.balance - w.credits >= 0)"
            " AND (%s::uuid[] IS NULL OR i.organization_id = ANY(%s))"
            " AND (NOT %s OR w.organization_id IS NULL OR w.changed_at > i.issued_at)"
            " ORDER BY i.id LIMIT %s FOR UPDATE OF i SKIP LOCKED) RETURNING id",
            (PAID, OPEN, organization_ids, organization_ids, moved_since_issue, limit),
        )
        ids = [row[0] for row in await cur.fetchall()]
        if not ids:
            return []
        cur = await conn.execute(f"{SELECT} WHERE i.id = ANY(%s) ORDER BY i.id", (ids,))
        paid = [_invoice(row) for row in await cur.fetchall()]
        await self.outbox.add_many(
            conn, [plan_events.invoice_changed(plan_events.INVOICE_PAID, i) for i in paid]
        )
        return paid

    async def mark_paid(
        self, conn: Conn, invoice_id: uuid.UUID, organization_id: uuid.UUID | None = None
    ) -> Invoice:
        """open → paid, once; FailedPrecondition for an invoice already paid."""
        invoice = await self.get(conn, invoice_id, organization_id, lock=True)
        check_payable(invoice)
        cur = await conn.execute(
            "UPDATE invoices SET status = %s, paid_at = now() WHERE id = %s RETURNING paid_at",
            (PAID, invoice_id),
        )
        row = await cur.fetchone()
        assert row is not None
        paid = replace(invoice, status=PAID, paid_at=row[0])
        await self.outbox.add(conn, plan_events.invoice_changed(plan_events.INVOICE_PAID, paid))
        return paid


async def _organization_lifetime(
    conn: Conn, organization_id: uuid.UUID
) -> tuple[datetime, datetime | None]:
    """When the organization was created, and deleted (None while it lives)."""
    cur = await conn.execute(
        "SELECT created_at, deleted_at FROM organizations WHERE id = %s", (organization_id,)
    )
    row = await cur.fetchone()
    if row is None:
        raise NotFound(f"organization {organization_id} not found", field="organization_id")
    return row[0], row[1]
