"""Monthly invoices: billing periods, an invoice's lines and total, and its status.

An invoice states what an organization's wallet was charged in one UTC calendar month (a period,
written YYYY-MM), one line per resource type, summed from the daily_spend rollup; its total is
the sum of its lines. The wallet is prepaid, so issuing an invoice moves no money: it is open
when issued and marked paid once settled (open → paid, exactly once): by the wallet-monthly loop
as soon as the wallet's balance is not negative (the charges were paid from it as they accrued;
an overdrawn wallet owes part of them until a top-up), or by MarkInvoicePaid. The next invoice is made
on the first day of the next month, for the month that just ended, once it has settled (an hour
after midnight UTC: see SETTLING).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from gpudeck.kit.errors import FailedPrecondition, InvalidArgument, echo

PERIOD = re.compile(r"^(\d{4})-(\d{2})$")
OPEN, PAID = "open", "paid"

# Resource types in the order lines are shown, with how people call them.
DESCRIPTIONS = {
    "plan": "Plan fees",
    "pod": "GPU pods",
    "vm": "Virtual machines",
    "nfs_volume": "NFS volumes",
    "object_storage": "Object storage",
    "inference": "Inference",
    "api": "API calls",
    "other": "Other charges",
}


@dataclass(frozen=True, order=True)
class Period:
    """A billing period: one UTC calendar month."""

    year: int
    month: int

    def __str__(self) -> str:
        return f"{self.year:04d}-{self.month:02d}"

    @property
    def start(self) -> date:
        return date(self.year, self.month, 1)

    @property
    def end(self) -> date:
        """The first day after the period (exclusive)."""
        return self.next().start

    @property
    def last_day(self) -> date:
        return self.end - timedelta(days=1)

    def next(self) -> Period:
        return Period(self.year + 1, 1) if self.month == 12 else Period(self.year, self.month + 1)

    def previous(self) -> Period:
        return Period(self.year - 1, 12) if self.month == 1 else Period(self.year, self.month - 1)

    @classmethod
    def of(cls, at: datetime | date) -> Period:
        """The period containing `at` (a datetime is taken in UTC)."""
        if isinstance(at, datetime):
            at = at.astimezone(UTC).date()
        return cls(at.year, at.month)


def parse_period(text: str, *, field: str = "period") -> Period:
    """ "2025-06" → Period(2025, 6); InvalidArgument naming the field otherwise."""
    match = PERIOD.match(text.strip())
    if match is None:
        raise InvalidArgument(f"{field} must be YYYY-MM, got {echo(text)}", field=field)
    year, month = int(match[1]), int(match[2])
    if not 1 <= month <= 12:
        raise InvalidArgument(f"{field} is not a month: {echo(text)}", field=field)
    if year < 2000:
        raise InvalidArgument(f"{field} must be 2000-01 or later, got {echo(text)}", field=field)
    return Period(year, month)


# How long after a month ends its spending is taken as final. A transfer dates its spend when
# its transaction starts and may commit a moment later (after a wait for a wallet's lock): an
# invoice issued at the stroke of midnight could miss spend dated a second before it, and an
# issued invoice never changes.
SETTLING = timedelta(hours=1)


def billable_period(text: str, now: datetime, *, field: str = "period") -> Period:
    """The period to invoice: `text`, or the last settled month when empty; never one that has
    not ended and settled (SETTLING) yet: its spending is not final."""
    latest = Period.of(now - SETTLING).previous()
    if not text.strip():
        return latest
    period = parse_period(text, field=field)
    if period > latest:
        settles = datetime.combine(period.end, datetime.min.time(), UTC) + SETTLING
        raise InvalidArgument(
            f"{field} {period} has not ended and settled yet (it may be invoiced from"
            f" {settles:%Y-%m-%d %H:%M} UTC): the latest period to invoice is {latest}",
            field=field,
        )
    return period


def next_invoice_date(now: datetime) -> date:
    """When the next invoice is made: the first day (UTC) of the month after the one not yet
    invoiced. From midnight on the 1st until the month has settled (SETTLING), that is today:
    the month just ended is still to be invoiced."""
    return Period.of(now - SETTLING).end


def describe(resource_type: str) -> str:
    """A line's description: "GPU pods" for pod; other types in words: "gpu_hours" → "Gpu hours"."""
    known = DESCRIPTIONS.get(resource_type)
    if known is not None:
        return known
    words = resource_type.replace("_", " ").replace("-", " ").strip()
    return words[:1].upper() + words[1:] if words else DESCRIPTIONS["other"]


@dataclass(frozen=True)
class InvoiceLine:
    resource_type: str
    description: str
    amount: int  # micro-units; negative when refunds exceeded charges


def build_lines(spend: Mapping[str, int]) -> tuple[InvoiceLine, ...]:
    """One line per resource type with a non-zero amount, in the order of DESCRIPTIONS."""
    order = {name: i for i, name in enumerate(DESCRIPTIONS)}
    kinds = sorted(
        (t for t, amount in spend.items() if amount != 0),
        key=lambda t: (order.get(t, len(order)), t),
    )
    return tuple(InvoiceLine(t or "other", describe(t or "other"), spend[t]) for t in kinds)


@dataclass(frozen=True)
class Invoice:
    id: uuid.UUID
    organization_id: uuid.UUID
    organization_name: str
    period: Period
    currency: str
    lines: tuple[InvoiceLine, ...]
    status: str
    issued_at: datetime
    paid_at: datetime | None = None

    @property
    def total(self) -> int:
        return sum(line.amount for line in self.lines)

    def lines_json(self) -> list[dict[str, Any]]:
        return [
            {"resource_type": x.resource_type, "description": x.description, "amount": x.amount}
            for x in self.lines
        ]

    @staticmethod
    def lines_from_json(data: list[dict[str, Any]]) -> tuple[InvoiceLine, ...]:
        return tuple(
            InvoiceLine(x["resource_type"], x["description"], int(x["amount"])) for x in data
        )


def new_invoice(
    invoice_id: uuid.UUID,
    organization_id: uuid.UUID,
    organization_name: str,
    period: Period,
    currency: str,
    spend: Mapping[str, int],
    now: datetime,
) -> Invoice:
    """An open invoice for `period` from the spending by resource type in it."""
    return Invoice(
        id=invoice_id,
        organization_id=organization_id,
        organization_name=organization_name,
        period=period,
        currency=currency,
        lines=build_lines(spend),
        status=OPEN,
        issued_at=now,
    )


def check_payable(invoice: Invoice) -> None:
    """An invoice is paid once: a second MarkInvoicePaid fails."""
    if invoice.status != OPEN:
        raise FailedPrecondition(
            f"invoice {invoice.id} is already {invoice.status}",
            field="invoice_id",
            reason="INVOICE_ALREADY_PAID",
        )
