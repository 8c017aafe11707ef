"""The events of plans and invoices: wallet.plan.changed and .renewed, wallet.invoice.issued
and .paid.

Published through the outbox in the transaction of the change, like the rest of the wallet's
(gpudeck.wallet.events); the ledger transfers a plan change posts announce themselves there.
"""

from __future__ import annotations

from gpudeck.kit.events import new_event
from gpudeck.kit.logs import actor as current_actor
from gpudeck.proto.common.v1.money_pb2 import Money
from gpudeck.proto.events.v1.envelope_pb2 import Event
from gpudeck.proto.wallet.v1 import events_pb2 as pb
from gpudeck.wallet.events import SOURCE
from gpudeck.wallet.invoices import Invoice
from gpudeck.wallet.plans import PlanChange

PLAN_CHANGED = "wallet.plan.changed"
PLAN_RENEWED = "wallet.plan.renewed"
INVOICE_ISSUED = "wallet.invoice.issued"
INVOICE_PAID = "wallet.invoice.paid"


def plan_changed(change: PlanChange, *, actor: str = "", event_type: str = PLAN_CHANGED) -> Event:
    """A plan change (or, as `PLAN_RENEWED`, a renewal: the same plan before and after)."""
    currency = change.plan.currency
    payload = pb.PlanChanged(
        plan_code=change.plan.code,
        previous_plan_code=change.previous.code,
        charged=Money(amount=change.charged, currency=currency),
        credits_granted=Money(amount=change.credits_granted, currency=currency),
        period=change.month,
    )
    return new_event(
        event_type,
        payload,
        source=SOURCE,
        organization_id=str(change.organization_id),
        actor=actor or current_actor.get() or "system",
    )


def invoice_changed(event_type: str, invoice: Invoice, *, actor: str = "") -> Event:
    payload = pb.InvoiceChanged(
        invoice_id=str(invoice.id),
        period=str(invoice.period),
        total=Money(amount=invoice.total, currency=invoice.currency),
        status=invoice.status,
    )
    return new_event(
        event_type,
        payload,
        source=SOURCE,
        organization_id=str(invoice.organization_id),
        actor=actor or current_actor.get() or "system",
    )
