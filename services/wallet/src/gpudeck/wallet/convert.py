"""Between protobuf messages and the wallet's domain values: ids, times, money, transactions."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from functools import lru_cache

from google.protobuf.timestamp_pb2 import Timestamp

from gpudeck.kit.errors import InvalidArgument, echo
from gpudeck.proto.common.v1.money_pb2 import Money
from gpudeck.proto.wallet.v1 import wallet_pb2 as pb
from gpudeck.wallet.holds import Hold
from gpudeck.wallet.ledger import Kind, Transaction
from gpudeck.wallet.metering import Meter

KIND_FROM_PROTO = {
    pb.TOPUP: Kind.TOPUP,
    pb.CHARGE: Kind.CHARGE,
    pb.REFUND: Kind.REFUND,
    pb.ADJUSTMENT: Kind.ADJUSTMENT,
    pb.CREDIT_GRANT: Kind.CREDIT_GRANT,
    pb.USAGE: Kind.USAGE,
}
# CREDIT_EXPIRY is posted by the wallet itself: shown, never accepted from callers.
KIND_TO_PROTO = {v: k for k, v in KIND_FROM_PROTO.items()} | {Kind.CREDIT_EXPIRY: pb.CREDIT_EXPIRY}


def parse_id(value: str, field: str) -> uuid.UUID:
    """A UUID from a request field; InvalidArgument naming the field otherwise."""
    if not value:
        raise InvalidArgument(f"{field} is required", field=field)
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidArgument(f"{field} is not a valid id: {echo(value)}", field=field) from None


class IdCache:
    """Ids parsed once per request: a batch names the same organizations many times."""

    def __init__(self) -> None:
        self._parsed: dict[str, uuid.UUID] = {}

    def parse(self, value: str, field: str) -> uuid.UUID:
        found = self._parsed.get(value)
        if found is None:
            found = self._parsed[value] = parse_id(value, field)
        return found

    def optional(self, value: str, field: str) -> uuid.UUID | None:
        return self.parse(value, field) if value else None


def optional_id(value: str, field: str) -> uuid.UUID | None:
    return parse_id(value, field) if value else None


def to_datetime(ts: Timestamp) -> datetime:
    return ts.ToDatetime(tzinfo=UTC)


def optional_time(message: object, field: str) -> datetime | None:
    """The timestamp `field` of `message` if set; InvalidArgument naming it when no date holds
    it (before year 1 or after 9999)."""
    if not message.HasField(field):  # type: ignore[attr-defined]
        return None
    try:
        return to_datetime(getattr(message, field))
    except ValueError:
        raise InvalidArgument(f"{field} is out of range (years 1 to 9999)", field=field) from None


def timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def money(amount: int, currency: str) -> Money:
    return Money(amount=amount, currency=currency)


def transaction(tx: Transaction, *, postings: bool = True) -> pb.Transaction:
    message = pb.Transaction()
    fill_transaction(message, tx, postings=postings)
    return message


def fill_transaction(message: pb.Transaction, tx: Transaction, *, postings: bool = True) -> None:
    """Write `tx` into an empty `message` (in place: a batch's answers are not copied)."""
    message.id = str(tx.id)
    message.organization_id = str(tx.organization_id)
    message.kind = KIND_TO_PROTO.get(tx.kind, pb.TRANSFER_KIND_UNSPECIFIED)
    currency = tx.currency
    _set_money(message.amount, tx.amount, currency)
    message.exchange_rate = tx.exchange_rate or ""
    message.description = tx.description
    message.resource_type = tx.resource_type
    message.resource_id = tx.resource_id
    message.project_id = str(tx.project_id or "")
    _set_money(message.balance_after, tx.balance_after, currency)
    if tx.created_at is not None:
        message.created_at.seconds, message.created_at.nanos = _seconds_nanos(tx.created_at)
    message.idempotency_key = tx.idempotency_key
    message.actor = tx.actor
    message.reference = tx.reference
    if postings:
        add = message.postings.add
        for p in tx.postings:
            add(
                account=p.account,
                amount=p.amount,
                balance_before=p.balance_before,
                balance_after=p.balance_after,
                currency=currency,
            )
    if tx.payment_amount is not None:
        _set_money(message.payment_amount, tx.payment_amount, tx.payment_currency or "")


def _set_money(message: Money, amount: int, currency: str) -> None:
    # Field by field, as Money(amount=…, currency=…) would: zero values stay unset alike.
    message.amount = amount
    message.currency = currency


@lru_cache(maxsize=64)
def _seconds_nanos(value: datetime) -> tuple[int, int]:
    """Timestamp fields of `value` (a batch's transactions share one time)."""
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts.seconds, ts.nanos


def hold(h: Hold) -> pb.Hold:
    return pb.Hold(
        id=str(h.id),
        organization_id=str(h.organization_id),
        amount=money(h.amount, h.currency),
        status=h.status,
        captured=money(h.captured, h.currency),
        description=h.description,
        created_at=timestamp(h.created_at),
        expires_at=timestamp(h.expires_at),
        resolved_at=timestamp(h.resolved_at),
        project_id=str(h.project_id or ""),
        resource_type=h.resource_type,
        resource_id=h.resource_id,
    )


def meter(m: Meter) -> pb.Meter:
    return pb.Meter(
        id=m.id,
        organization_id=str(m.organization_id),
        project_id=str(m.project_id or ""),
        resource_id=m.resource_id,
        resource_type=m.resource_type,
        hourly_rate=m.hourly_rate,
        opened_at=timestamp(m.opened_at),
        closed_at=timestamp(m.closed_at),
        billed_until=timestamp(m.billed_until),
        total_charged=m.total_charged,
        currency=m.currency,
    )
