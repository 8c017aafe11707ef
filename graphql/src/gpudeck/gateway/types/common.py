"""Types every domain shares: Money, Conversion, Role, and reading them from protobuf."""

from __future__ import annotations

import enum
from datetime import UTC, datetime

import strawberry
from google.protobuf.timestamp_pb2 import Timestamp

from gpudeck.gateway.errors import BAD_USER_INPUT, GatewayError
from gpudeck.gateway.money import convert, format_micro, parse_currency
from gpudeck.proto.common.v1 import money_pb2


@strawberry.type(
    description=(
        "An amount of money. `amount` is a decimal string with exactly 6 decimals "
        '("12.500000"), never a float.'
    )
)
class Money:
    amount: str
    currency: str

    @classmethod
    def from_pb(cls, m: money_pb2.Money, conversion: money_pb2.Conversion | None = None) -> Money:
        """`m`, converted with `conversion` when given (see gpudeck.gateway.money.convert)."""
        if conversion is not None:
            m = convert(m, conversion)
        return cls(amount=format_micro(m.amount), currency=m.currency)

    @classmethod
    def of(cls, micro: int, currency: str) -> Money:
        return cls(amount=format_micro(micro), currency=currency)


@strawberry.type(
    description=(
        "The exchange rate amounts were converted with: 1 `base` = `rate` `quote` (a decimal "
        "string), as of `asOf`."
    )
)
class Conversion:
    base: str
    quote: str
    rate: str
    as_of: datetime | None
    rate_id: strawberry.ID

    @classmethod
    def from_pb(cls, m: money_pb2.Conversion) -> Conversion | None:
        """None when nothing was converted (an unset or empty message)."""
        if not m.rate:
            return None
        return cls(
            base=m.base,
            quote=m.quote,
            rate=m.rate,
            as_of=_rfc3339(m.as_of),
            rate_id=strawberry.ID(str(m.rate_id)),
        )


@strawberry.enum(description="Roles, from most to least powerful.")
class Role(enum.Enum):
    OWNER = "owner"
    ADMIN = "admin"
    BILLING = "billing"
    MEMBER = "member"
    VIEWER = "viewer"


def role(value: str) -> Role:
    return Role(value)


def when(ts: Timestamp, present: bool = True) -> datetime | None:
    """A protobuf timestamp as an aware datetime; None when unset."""
    return ts.ToDatetime(UTC) if present and (ts.seconds or ts.nanos) else None


def timestamp(at: datetime | None) -> Timestamp | None:
    """An aware datetime as a protobuf timestamp (naive ones are taken as UTC)."""
    if at is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(at if at.tzinfo is not None else at.replace(tzinfo=UTC))
    return ts


def display_currency(value: str | None, *, field: str = "displayCurrency") -> str:
    """A display currency argument: "" when not given, else a checked, upper-cased code."""
    return "" if value is None or not value.strip() else parse_currency(value, field=field)


def check_first(value: int | None, *, field: str = "first", maximum: int = 500) -> int:
    """A page size argument: 0 (the service's default) when not given, else 1..maximum."""
    if value is None:
        return 0
    if not 1 <= value <= maximum:
        raise GatewayError(
            f"{field} must be between 1 and {maximum}, got {value}",
            code=BAD_USER_INPUT,
            field=field,
        )
    return value


def _rfc3339(text: str) -> datetime | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
