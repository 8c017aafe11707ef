"""All SQL of what the dashboards read and of exchange rates.

Reads only rollups the ledger keeps in step with its entries (the wallets row, daily_spend,
resource_costs, open meters by type), never the ledger itself, so a read costs the same after a
million entries as after ten. "Today" is the database's clock, in UTC.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from psycopg import AsyncConnection

from gpudeck.kit.errors import NotFound
from gpudeck.wallet import readmodels as rm
from gpudeck.wallet.alerts import Thresholds, level_for
from gpudeck.wallet.money import check_currency
from gpudeck.wallet.rates import (
    Conversion,
    ExchangeRate,
    NewRate,
    Pair,
    RateProvider,
    check_new_rate,
    conversion,
)

Conn = AsyncConnection[Any]

# What the wallet holds now: its open holds but those past their time, which the sweep (or the
# next transfer: LedgerStore.expire_due_holds) is yet to expire, read in one snapshot with the
# wallet row.
HELD_NOW = """w.held_balance - CASE WHEN w.held_balance > 0 THEN (
    SELECT coalesce(sum(h.amount), 0)::bigint FROM holds h
    WHERE h.organization_id = w.organization_id AND h.status = 'open' AND h.expires_at <= now()
) ELSE 0 END"""
WALLET = f"""
SELECT w.organization_id, w.currency, w.balance, w.credits, {HELD_NOW}, w.run_rate,
       now(), m.types, m.rates, coalesce(t.warning_amount, 0), coalesce(t.critical_amount, 0),
       coalesce(t.warning_hours, 0), coalesce(t.critical_hours, 0)
FROM wallets w
LEFT JOIN thresholds t ON t.organization_id = w.organization_id
LEFT JOIN LATERAL (
    SELECT array_agg(t ORDER BY t) AS types, array_agg(r ORDER BY t) AS rates
    FROM (SELECT resource_type AS t, sum(hourly_rate)::bigint AS r FROM meters
          WHERE organization_id = w.organization_id AND closed_at IS NULL GROUP BY 1) x
) m ON true
WHERE w.organization_id = %s
"""
DAILY = """
SELECT day, resource_type, amount FROM daily_spend
WHERE organization_id = %s AND day BETWEEN %s AND %s
"""
MONTHLY = """
SELECT date_trunc('month', day)::date, resource_type, sum(amount)::bigint FROM daily_spend
WHERE organization_id = %s AND day >= %s GROUP BY 1, 2
"""
RESOURCE_COSTS = """
SELECT resource_id, resource_type, project_id, total, first_charged_at, last_charged_at
FROM resource_costs
WHERE organization_id = %s AND (cardinality(%s::text[]) = 0 OR resource_id = ANY(%s))
ORDER BY last_charged_at DESC, resource_id LIMIT %s
"""
RATE_COLUMNS = "id, base, quote, rate, as_of, source"
LATEST_RATES = f"""
(SELECT {RATE_COLUMNS} FROM exchange_rates WHERE base = %(a)s AND quote = %(b)s
   AND as_of <= now()
 ORDER BY as_of DESC, id DESC LIMIT 1)
UNION ALL
(SELECT {RATE_COLUMNS} FROM exchange_rates WHERE base = %(b)s AND quote = %(a)s
   AND as_of <= now()
 ORDER BY as_of DESC, id DESC LIMIT 1)
"""


def rate_row(row: Sequence[Any]) -> ExchangeRate:
    rate_id, base, quote, rate, as_of, source = row
    return ExchangeRate(rate_id, base, quote, Decimal(rate), as_of, source)


def utc_day(now: datetime) -> date:
    return now.astimezone(UTC).date()


async def wallet(
    conn: Conn, organization_id: uuid.UUID, depletion_seconds: float
) -> tuple[rm.WalletState, datetime, dict[str, int]]:
    """The wallet row, the database's now, and the open meters' hourly rates by type. Its level
    is the one of the balance read with it (`level_for`): the stored one, which edge events
    follow, is written a moment after a fast-path transfer commits its balance."""
    cur = await conn.execute(WALLET, (organization_id,))
    row = await cur.fetchone()
    if row is None:
        raise NotFound(f"organization {organization_id} not found", field="organization_id")
    org, currency, balance, credits, held, rate, now, types, rates, *limits = row
    level = level_for(balance, rate, Thresholds(*limits), depletion_seconds)
    state = rm.WalletState(org, currency, balance, credits, held, rate, level)
    return state, now, dict(zip(types or (), rates or (), strict=True))


async def currency_and_now(conn: Conn, organization_id: uuid.UUID) -> tuple[str, datetime]:
    """The wallet currency and the database's clock."""
    cur = await conn.execute(
        "SELECT currency, now() FROM wallets WHERE organization_id = %s", (organization_id,)
    )
    row = await cur.fetchone()
    if row is None:
        raise NotFound(f"organization {organization_id} not found", field="organization_id")
    return row[0], row[1]


async def currency_and_today(conn: Conn, organization_id: uuid.UUID) -> tuple[str, date]:
    """The wallet currency and today's date (UTC) by the database's clock."""
    currency, now = await currency_and_now(conn, organization_id)
    return currency, utc_day(now)


async def daily(
    conn: Conn, organization_id: uuid.UUID, start: date, end: date
) -> list[rm.DayAmount]:
    cur = await conn.execute(DAILY, (organization_id, start, end))
    return [rm.DayAmount(*row) for row in await cur.fetchall()]


async def period_totals(
    conn: Conn, organization_id: uuid.UUID, periods: rm.Periods
) -> dict[str, int]:
    """What each of `periods` spent, summed by the database: one row whatever the history."""
    named = periods.named()
    sums = ", ".join(
        "coalesce(sum(amount) FILTER (WHERE day BETWEEN %s AND %s), 0)::bigint" for _ in named
    )
    bounds = [d for p in named.values() for d in (p.start, p.end)]
    end = max(p.end for p in named.values())
    cur = await conn.execute(
        f"SELECT {sums} FROM daily_spend"  # only placeholders are interpolated
        " WHERE organization_id = %s AND day BETWEEN %s AND %s",
        (*bounds, organization_id, periods.earliest, end),
    )
    row = await cur.fetchone()
    assert row is not None
    return dict(zip(named, row, strict=True))


async def monthly(conn: Conn, organization_id: uuid.UUID, start: date) -> list[rm.DayAmount]:
    cur = await conn.execute(MONTHLY, (organization_id, start))
    return [rm.DayAmount(*row) for row in await cur.fetchall()]


async def resource_costs(
    conn: Conn, organization_id: uuid.UUID, resource_ids: Sequence[str], limit: int
) -> list[rm.ResourceCost]:
    ids = list(resource_ids)
    cur = await conn.execute(RESOURCE_COSTS, (organization_id, ids, ids, limit))
    return [rm.ResourceCost(*row) for row in await cur.fetchall()]


# ------------------------------------------------------------------ exchange rates


async def latest_rates(conn: Conn, a: str, b: str) -> dict[Pair, ExchangeRate]:
    """The newest stored rate of a → b and of b → a, where they exist."""
    cur = await conn.execute(LATEST_RATES, {"a": a, "b": b})
    rates = [rate_row(row) for row in await cur.fetchall()]
    return {(r.base, r.quote): r for r in rates}


async def conversion_to(conn: Conn, source: str, display_currency: str) -> Conversion:
    """How to show amounts of `source` in `display_currency` (empty: as they are)."""
    if not display_currency:
        return Conversion(source, source)
    target = check_currency(display_currency, field="display_currency")
    if target == source:
        return Conversion(source, target)
    return conversion(source, target, await latest_rates(conn, source, target))


async def add_rate(conn: Conn, new: NewRate) -> ExchangeRate:
    rate = check_new_rate(new)
    cur = await conn.execute(
        f"INSERT INTO exchange_rates (base, quote, rate, as_of, source)"
        f" VALUES (%s, %s, %s, coalesce(%s, now()), %s) RETURNING {RATE_COLUMNS}",
        (rate.base, rate.quote, rate.rate, rate.as_of, rate.source),
    )
    row = await cur.fetchone()
    assert row is not None
    return rate_row(row)


async def list_rates(conn: Conn, base: str, quote: str, limit: int) -> list[ExchangeRate]:
    """Stored rates, newest first; `base` and `quote` filter when set."""
    base = check_currency(base, field="base") if base else ""
    quote = check_currency(quote, field="quote") if quote else ""
    cur = await conn.execute(
        f"SELECT {RATE_COLUMNS} FROM exchange_rates"
        " WHERE (%(base)s = '' OR base = %(base)s) AND (%(quote)s = '' OR quote = %(quote)s)"
        " ORDER BY as_of DESC, id DESC LIMIT %(limit)s",
        {"base": base, "quote": quote, "limit": limit},
    )
    return [rate_row(row) for row in await cur.fetchall()]


async def import_rates(
    conn: Conn, provider: RateProvider, pairs: Sequence[Pair]
) -> list[ExchangeRate]:
    """Store what `provider` quotes for `pairs`, its name as the source."""
    stored = []
    for quote in await provider.fetch(pairs):
        stored.append(
            await add_rate(
                conn, NewRate(quote.base, quote.quote, quote.rate, quote.as_of, provider.name)
            )
        )
    return stored
