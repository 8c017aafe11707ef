"""Types every domain shares: Money, Conversion, Role, Long, the optional idempotency key, and
reading them from protobuf."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, NewType

import strawberry
from google.protobuf.timestamp_pb2 import Timestamp
from graphql import EnumValueNode, GraphQLError, IntValueNode, StringValueNode, ValueNode
from strawberry.schema.types.base_scalars import DateTimeDefinition

from gpudeck.gateway.errors import BAD_USER_INPUT, VALIDATION_FAILED, GatewayError
from gpudeck.gateway.money import INT64_MAX, INT64_MIN, check_currency, convert, format_micro
from gpudeck.kit.errors import echo
from gpudeck.proto.common.v1 import money_pb2

# The optional key of a mutation: a retry by the same caller with it gets the first answer and
# changes nothing (a late retry cannot undo a newer change); the key with other arguments is a
# CONFLICT.
OptionalKey = Annotated[
    str | None,
    strawberry.argument(
        description=(
            "Optional. A retry by the same caller with this key returns the first answer and "
            "changes nothing; the same key with other arguments, in another mutation or from "
            "another caller in the organization, is a CONFLICT."
        )
    ),
]


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


ROLES = ("owner", "admin", "billing", "member", "viewer")


def _parse_role(value: object) -> str:
    name = str(value).strip().lower()
    if name not in ROLES:
        raise GatewayError(
            f"role must be one of {', '.join(ROLES)}, got {echo(str(value))}",
            code=BAD_USER_INPUT,
            field="role",
        )
    return name


def _parse_role_literal(node: ValueNode, variables: dict[str, object] | None = None) -> str:
    if isinstance(node, StringValueNode | EnumValueNode):
        return _parse_role(node.value)
    raise GatewayError('role must be a word such as "admin"', code=BAD_USER_INPUT, field="role")


# A role is a word, lower case on the way out; on the way in any case, quoted ("viewer") or bare
# (VIEWER), so clients written either way work.
Role = NewType("Role", str)
# The schema maps Role to this scalar (StrawberryConfig.scalar_map in gpudeck.gateway.schema).
ROLE_SCALAR = strawberry.scalar(
    name="Role",
    description="An organization role: owner, admin, billing, member or viewer (most to least"
    " powerful). Accepted in any case, as a string or a bare word; returned in lower case.",
    serialize=lambda value: str(value).lower(),
    parse_value=_parse_role,
    parse_literal=_parse_role_literal,
)


def parse_long(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise GatewayError(
            f"a Long must be a whole number, got {echo(str(value))}", code=BAD_USER_INPUT
        )
    if not INT64_MIN <= value <= INT64_MAX:
        raise GatewayError(f"a Long must fit in 64 bits, got {value}", code=BAD_USER_INPUT)
    return value


def parse_long_literal(node: ValueNode, variables: dict[str, object] | None = None) -> int:
    if isinstance(node, IntValueNode):
        return parse_long(int(node.value))
    raise GatewayError("a Long must be a whole number", code=BAD_USER_INPUT)


# A count the services keep in int64 (calls, errors): GraphQL's Int is 32-bit, so a busy
# organization's count would fail the whole field as INTERNAL.
Long = NewType("Long", int)
# The schema maps Long to this scalar (StrawberryConfig.scalar_map in gpudeck.gateway.schema).
LONG_SCALAR = strawberry.scalar(
    name="Long",
    description="A 64-bit signed integer, sent as a JSON number. JavaScript's JSON.parse reads it"
    " exactly only up to 2^53 (Number.MAX_SAFE_INTEGER); read larger values with a parser that"
    " keeps big integers.",
    serialize=int,
    parse_value=parse_long,
    parse_literal=parse_long_literal,
)


def _parse_datetime_literal(node: ValueNode, variables: dict[str, object] | None = None) -> object:
    """A DateTime written in the query. Strawberry's parser refuses a bad one with an error that
    carries no place in the document, so nothing named its argument (the same value in a
    variable was named); refused with an exception of ours, it gets one (graphql-core places
    the errors it did not make) and is named as every bad literal is (gpudeck.gateway.errors)."""
    value = node.value if isinstance(node, StringValueNode) else None
    try:
        return DateTimeDefinition.parse_value(value)  # type: ignore[misc]
    except GraphQLError as exc:
        raise GatewayError(exc.message, code=VALIDATION_FAILED) from None


# The schema maps datetime to this scalar (StrawberryConfig.scalar_map in gpudeck.gateway.schema).
DATETIME_SCALAR = strawberry.scalar(
    name="DateTime",
    description=DateTimeDefinition.description,
    serialize=datetime.isoformat,
    parse_value=DateTimeDefinition.parse_value,
    parse_literal=_parse_datetime_literal,
)


def role(value: str) -> Role:
    return Role(value.lower())


def when(ts: Timestamp, present: bool = True) -> datetime | None:
    """A protobuf timestamp as an aware datetime; None when unset."""
    return ts.ToDatetime(UTC) if present and (ts.seconds or ts.nanos) else None


def timestamp(at: datetime | None, field: str) -> Timestamp | None:
    """An aware datetime as a protobuf timestamp (naive ones are taken as UTC); BAD_USER_INPUT
    naming `field` for one no timestamp holds (year 1 at +14:00)."""
    if at is None:
        return None
    ts = Timestamp()
    try:
        ts.FromDatetime(at if at.tzinfo is not None else at.replace(tzinfo=UTC))
    except (OverflowError, ValueError):
        raise GatewayError(
            f"{field} is out of range: {at.isoformat()}", code=BAD_USER_INPUT, field=field
        ) from None
    return ts


def display_currency(value: str | None, *, field: str = "displayCurrency") -> str:
    """A display currency argument: "" when not given (null), else one of CURRENCIES."""
    return "" if value is None else check_currency(value, field=field)


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
