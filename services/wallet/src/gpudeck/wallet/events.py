"""The wallet's events: their types and how a domain value becomes an envelope.

Published through the outbox (gpudeck.kit.events.Outbox) in the transaction of the change.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

from gpudeck.kit.events import new_event
from gpudeck.kit.logs import actor as current_actor
from gpudeck.proto.common.v1.money_pb2 import Money
from gpudeck.proto.events.v1.envelope_pb2 import Event
from gpudeck.proto.wallet.v1 import events_pb2 as pb
from gpudeck.wallet.alerts import hours_remaining
from gpudeck.wallet.ledger import Kind, PlannedTransaction, TransferRequest

SOURCE = "wallet"
TRANSACTION_EVENT = {
    Kind.TOPUP: "wallet.topup.completed",
    Kind.CHARGE: "wallet.charge.posted",
    Kind.USAGE: "wallet.charge.posted",
    Kind.REFUND: "wallet.refund.posted",
    Kind.ADJUSTMENT: "wallet.adjustment.posted",
    Kind.CREDIT_GRANT: "wallet.credits.granted",
    Kind.CREDIT_EXPIRY: "wallet.credits.expired",
}


def _event(
    event_type: str,
    payload: object,
    organization_id: uuid.UUID | str,
    *,
    project_id: uuid.UUID | str | None = None,
    actor: str = "",
) -> Event:
    return new_event(
        event_type,
        payload,  # type: ignore[arg-type]
        source=SOURCE,
        organization_id=str(organization_id),
        project_id=str(project_id or ""),
        actor=actor or current_actor.get() or "system",
    )


def money(amount: int, currency: str) -> Money:
    return Money(amount=amount, currency=currency)


TRANSACTION_TYPE_URL = "type.googleapis.com/" + pb.TransactionPosted.DESCRIPTOR.full_name


def transaction_posted(
    request: TransferRequest,
    transaction_id: uuid.UUID,
    amount: int,
    currency: str,
    at: Timestamp,
    *,
    event_id: str = "",
) -> Event:
    """The event announcing one ledger transaction, built directly (batches make thousands)."""
    payload = pb.TransactionPosted(
        transaction_id=str(transaction_id),
        kind=request.kind.value,
        resource_type=request.resource_type,
        resource_id=request.resource_id,
    )
    payload.amount.amount = amount
    payload.amount.currency = currency
    event = Event(
        id=event_id or str(uuid.uuid4()),
        type=TRANSACTION_EVENT[request.kind],
        source=SOURCE,
        organization_id=str(request.organization_id),
        project_id=str(request.project_id or ""),
        actor=request.actor or current_actor.get() or "system",
    )
    event.time.CopyFrom(at)
    event.payload.type_url = TRANSACTION_TYPE_URL
    event.payload.value = payload.SerializeToString()
    return event


def transactions_posted(planned: Sequence[PlannedTransaction], now: datetime) -> list[Event]:
    stamp = Timestamp()
    stamp.FromDatetime(now)
    ids = random_ids(len(planned))
    return [
        transaction_posted(tx.request, tx.id, tx.amount, tx.currency, stamp, event_id=event_id)
        for tx, event_id in zip(planned, ids, strict=True)
    ]


def random_ids(count: int) -> list[str]:
    """`count` strings like str(uuid.uuid4()), made from one read of the random source."""
    raw = os.urandom(16 * count)
    ids = []
    for i in range(0, 16 * count, 16):
        value = int.from_bytes(raw[i : i + 16]) & _UUID4_KEEP | _UUID4_SET
        h = f"{value:032x}"
        ids.append(f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")
    return ids


# Version 4 and the RFC 4122 variant, as uuid.UUID(bytes=…, version=4) sets them.
_UUID4_KEEP = ~((0xF000 << 64) | (0xC000 << 48))
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)


def balance_event(
    event_type: str,
    organization_id: uuid.UUID,
    *,
    currency: str,
    balance: int,
    held_balance: int,
    run_rate: int,
    level: str,
    previous_level: str = "",
    actor: str = "system",
) -> Event:
    """A wallet.balance.* event; `actor` "" is the caller of the current call (the one whose
    charge or top-up crossed a threshold), else "system"."""
    payload = pb.BalanceChanged(
        balance=money(balance, currency),
        held_balance=money(held_balance, currency),
        spendable=money(balance - held_balance, currency),
        run_rate_per_hour=money(run_rate, currency),
        level=level,
        previous_level=previous_level,
    )
    hours = hours_remaining(balance, run_rate)
    if hours is not None:
        payload.hours_remaining = hours
    return _event(event_type, payload, organization_id, actor=actor)


def hold_changed(
    event_type: str,
    organization_id: uuid.UUID,
    hold_id: uuid.UUID,
    status: str,
    amount: int,
    captured: int,
    currency: str,
    project_id: uuid.UUID | None = None,
    *,
    actor: str = "",
) -> Event:
    """`actor` "": the caller (an expiry at its time is the wallet's own: "system")."""
    payload = pb.HoldChanged(
        hold_id=str(hold_id),
        status=status,
        amount=money(amount, currency),
        captured=money(captured, currency),
    )
    return _event(event_type, payload, organization_id, project_id=project_id, actor=actor)


def account_changed(
    event_type: str,
    organization_id: uuid.UUID | str,
    *,
    kind: str,
    id: uuid.UUID | str,
    name: str = "",
    role: str = "",
    email: str = "",
    project_id: uuid.UUID | None = None,
) -> Event:
    payload = pb.AccountChanged(kind=kind, id=str(id), name=name, role=role, email=email)
    return _event(event_type, payload, organization_id, project_id=project_id)


def meter_changed(
    event_type: str,
    organization_id: uuid.UUID,
    *,
    meter_id: str,
    resource_type: str,
    resource_id: str,
    hourly_rate: int,
    total_charged: int,
    project_id: uuid.UUID | None,
) -> Event:
    payload = pb.MeterChanged(
        meter_id=meter_id,
        resource_type=resource_type,
        resource_id=resource_id,
        hourly_rate=hourly_rate,
        total_charged=total_charged,
    )
    return _event(event_type, payload, organization_id, project_id=project_id)


def auto_topup_disabled(organization_id: uuid.UUID, reason: str, failures: int) -> Event:
    payload = pb.AutoTopUpDisabled(reason=reason, failures=failures)
    return _event("wallet.autotopup.disabled", payload, organization_id, actor="system")


def auto_topup(
    event_type: str, organization_id: uuid.UUID, pending_id: uuid.UUID, amount: int, currency: str
) -> Event:
    """wallet.autotopup.requested, or .cancelled: a request called off (the payment side
    should not take it; one it still completes is credited)."""
    payload = pb.AutoTopUpRequested(
        pending_top_up_id=str(pending_id), amount=money(amount, currency)
    )
    return _event(event_type, payload, organization_id, actor="system")
