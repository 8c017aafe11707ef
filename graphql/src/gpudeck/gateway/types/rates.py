"""Exchange rates: every caller may read them (each converted amount names the rate it used);
only the platform's operators (GPUDECK_ADMIN_TOKEN) may set one."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import strawberry

from gpudeck.gateway.context import Info
from gpudeck.gateway.permissions import Member, PlatformAdmin, require
from gpudeck.gateway.types.common import OptionalKey, check_first, timestamp, when
from gpudeck.proto.wallet.v1 import wallet_pb2


@strawberry.type(description="1 `base` = `rate` `quote` (a decimal string) as of `asOf`.")
class ExchangeRate:
    id: strawberry.ID
    base: str
    quote: str
    rate: str
    as_of: datetime | None
    source: str

    @classmethod
    def from_pb(cls, m: wallet_pb2.ExchangeRate) -> ExchangeRate:
        return cls(
            id=strawberry.ID(str(m.id)),
            base=m.base,
            quote=m.quote,
            rate=m.rate,
            as_of=when(m.as_of, m.HasField("as_of")),
            source=m.source,
        )


async def resolve_exchange_rates(
    info: Info, base: str | None = None, quote: str | None = None, first: int | None = None
) -> list[ExchangeRate]:
    c = info.context.wallet
    request = wallet_pb2.ListExchangeRatesRequest(
        base=(base or "").upper(), quote=(quote or "").upper(), limit=check_first(first)
    )
    answer = await c.wallet.ListExchangeRates(request, metadata=c.metadata)
    return [ExchangeRate.from_pb(r) for r in answer.rates]


async def resolve_set_exchange_rate(
    info: Info,
    base: str,
    quote: str,
    rate: str,
    as_of: datetime | None = None,
    # (`source` is Strawberry's name for the parent value: the argument is named in the schema)
    origin: Annotated[str | None, strawberry.argument(name="source")] = None,
    idempotency_key: OptionalKey = None,
) -> ExchangeRate:
    c = info.context.wallet
    request = wallet_pb2.SetExchangeRateRequest(
        base=base.upper(),
        quote=quote.upper(),
        rate=rate,
        source=origin or "admin",
        idempotency_key=idempotency_key or "",
    )
    stamp = timestamp(as_of, "asOf")
    if stamp is not None:
        request.as_of.CopyFrom(stamp)
    return ExchangeRate.from_pb(await c.wallet.SetExchangeRate(request, metadata=c.metadata))


@strawberry.type
class Query:
    exchange_rates = strawberry.field(
        resolver=resolve_exchange_rates,
        description="Stored exchange rates, newest first (history included); filter by pair.",
        extensions=require(Member()),
    )


@strawberry.type
class Mutation:
    set_exchange_rate = strawberry.mutation(
        resolver=resolve_set_exchange_rate,
        description=(
            "Store a rate (1 base = rate quote, a decimal string), effective from `asOf` (now "
            "when left out); the platform admin only."
        ),
        extensions=require(PlatformAdmin()),
    )
