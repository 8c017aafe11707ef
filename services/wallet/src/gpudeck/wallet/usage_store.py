"""All SQL of usage events: record one (de-duplicated, charged in the same transaction) and read
the analytics from the rollups; only "recent records" reads the events themselves.

Writing usage_hourly is all a record does to the rollups: a trigger on it (migration 006) adds
the same amounts to usage_daily and usage_totals in the same transaction. The last 48 hours are
read from usage_hourly, the last 30 days from usage_daily and all time from usage_totals, so the
cost of the dashboard does not grow with the length of the history."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from psycopg import AsyncConnection

from gpudeck.kit.errors import Conflict, NotFound, echo
from gpudeck.wallet.ledger import Kind, TransferRequest
from gpudeck.wallet.ledger_store import LedgerStore
from gpudeck.wallet.usage import (
    HOURS_SHOWN,
    Analytics,
    Calls,
    DimensionUsage,
    UsageEvent,
    UsageRecord,
    by_quantity,
    day_start,
    event_time,
    exact,
    hour_start,
    hourly,
    per_dimension,
    summed,
    validate,
)

Conn = AsyncConnection[Any]

EVENT_COLUMNS = (
    "e.event_id, e.organization_id, e.meter, e.quantity, e.unit_price, e.dimensions,"
    " e.project_id, e.success, e.latency_ms, e.at, e.cost, w.currency, e.transaction_id"
)
INSERT_EVENT = """
INSERT INTO usage_events (event_id, organization_id, project_id, meter, quantity, unit_price,
                          cost, dimensions, success, latency_ms, at)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (organization_id, event_id) DO NOTHING
RETURNING event_id
"""
ROLL_UP = """
INSERT INTO usage_hourly AS u (organization_id, hour, meter, model, provider, region, api,
                               calls, errors, quantity, cost, latency_ms_sum, latency_calls)
VALUES (%s, %s, %s, %s, %s, %s, %s, 1, %s, %s, %s, %s, %s)
ON CONFLICT (organization_id, hour, meter, model, provider, region, api) DO UPDATE
SET calls = u.calls + 1, errors = u.errors + excluded.errors,
    quantity = u.quantity + excluded.quantity, cost = u.cost + excluded.cost,
    latency_ms_sum = u.latency_ms_sum + excluded.latency_ms_sum,
    latency_calls = u.latency_calls + excluded.latency_calls
"""
# Per meter and model over 30 days, with today's part: the widgets from one pass over the daily
# rollup (at most 30 rows per model and meter). Events dated a little ahead (clocks differ; see
# usage.validate) count when their day, or hour, comes.
MODELS = """
SELECT meter, model,
       coalesce(sum(quantity) FILTER (WHERE day = %(today)s), 0),
       coalesce(sum(cost) FILTER (WHERE day = %(today)s), 0)::bigint,
       coalesce(sum(calls) FILTER (WHERE day = %(today)s), 0)::bigint,
       coalesce(sum(errors) FILTER (WHERE day = %(today)s), 0)::bigint,
       sum(quantity), sum(cost)::bigint, sum(calls)::bigint, sum(errors)::bigint
FROM usage_daily
WHERE organization_id = %(org)s AND day BETWEEN %(since)s AND %(today)s
  AND (%(meter)s = '' OR meter = %(meter)s)
GROUP BY meter, model
"""
HOURS = """
SELECT hour, sum(calls)::bigint, sum(errors)::bigint, sum(latency_ms_sum)::bigint,
       sum(latency_calls)::bigint
FROM usage_hourly
WHERE organization_id = %(org)s AND hour BETWEEN %(since)s AND %(last_hour)s
  AND (%(meter)s = '' OR meter = %(meter)s)
GROUP BY hour
"""
# Per dimension and value: one row each per meter in the all-time totals.
# The ALL_TIME_TOP values of each dimension used most (a model per fine-tune or a region per
# zone could otherwise make the answer grow without bound).
ALL_TIME = """
SELECT dimension, value, q, c, n, e FROM (
    SELECT dimension, value, sum(quantity) AS q, sum(cost)::bigint AS c, sum(calls)::bigint AS n,
           sum(errors)::bigint AS e,
           row_number() OVER (PARTITION BY dimension
                              ORDER BY sum(quantity) DESC, sum(cost) DESC, value) AS r
    FROM usage_totals
    WHERE organization_id = %(org)s AND (%(meter)s = '' OR meter = %(meter)s)
    GROUP BY 1, 2
) ranked
WHERE r <= %(all_time_top)s
"""
ALL_TIME_TOP = 100


def _record(row: Sequence[Any]) -> UsageRecord:
    (event_id, org, meter, quantity, unit_price, dimensions, project, success, latency, at,
     cost, currency, tx_id) = row  # fmt: skip
    event = UsageEvent(
        event_id, org, meter, float(quantity), unit_price, dict(dimensions), project, success,
        latency, at,
    )  # fmt: skip
    return UsageRecord(event, at, cost, currency, tx_id)


class UsageStore:
    def __init__(self, ledger: LedgerStore) -> None:
        self.ledger = ledger

    async def get(
        self, conn: Conn, organization_id: uuid.UUID, event_id: str
    ) -> UsageRecord | None:
        cur = await conn.execute(
            f"SELECT {EVENT_COLUMNS} FROM usage_events e JOIN wallets w USING (organization_id)"
            " WHERE e.organization_id = %s AND e.event_id = %s",
            (organization_id, event_id),
        )
        row = await cur.fetchone()
        return _record(row) if row is not None else None

    async def record(self, conn: Conn, event: UsageEvent, *, actor: str = "") -> UsageRecord:
        """Record `event` and charge its cost, in the caller's transaction; an event id its
        organization used before returns the first record and writes nothing (even once its
        project is deleted)."""
        validate(event)
        cur = await conn.execute(
            "SELECT now() FROM wallets WHERE organization_id = %s", (event.organization_id,)
        )
        row = await cur.fetchone()
        if row is None:
            raise NotFound(
                f"organization {event.organization_id} not found", field="organization_id"
            )
        now: datetime = row[0]
        at = event_time(event.at, now)
        cost = event.cost
        cur = await conn.execute(
            INSERT_EVENT,
            (event.event_id, event.organization_id, event.project_id, event.meter,
             exact(event.quantity), event.unit_price, cost, json.dumps(dict(event.dimensions)),
             event.success, event.latency_ms, at),
        )  # fmt: skip
        if await cur.fetchone() is None:
            return await self._first(conn, event)
        # A new event's project must be live (a refusal undoes the insert with the caller's
        # transaction); a retry's is not asked again: it answers as the first call did.
        await self.ledger.projects.use(conn, event.organization_id, event.project_id)
        tx_id = await self._charge(conn, event, cost, now, actor) if cost > 0 else None
        if tx_id is not None:
            await conn.execute(
                "UPDATE usage_events SET transaction_id = %s"
                " WHERE organization_id = %s AND event_id = %s",
                (tx_id, event.organization_id, event.event_id),
            )
        await conn.execute(
            ROLL_UP,
            (event.organization_id, hour_start(at), event.meter, *event.rollup_dimensions(),
             0 if event.success else 1, exact(event.quantity), cost, event.latency_ms,
             1 if event.latency_ms > 0 else 0),
        )  # fmt: skip
        record = await self.get(conn, event.organization_id, event.event_id)
        assert record is not None
        return record

    async def _first(self, conn: Conn, event: UsageEvent) -> UsageRecord:
        first = await self.get(conn, event.organization_id, event.event_id)
        assert first is not None
        if not first.event.same_as(event):
            raise Conflict(
                f"event_id {echo(event.event_id)} was already used by another request",
                field="event_id",
                reason="IDEMPOTENCY_KEY_REUSED",
            )
        return first

    async def _charge(
        self, conn: Conn, event: UsageEvent, cost: int, now: datetime, actor: str
    ) -> uuid.UUID:
        request = TransferRequest(
            key=f"usage-event:{event.event_id}",
            organization_id=event.organization_id,
            kind=Kind.USAGE,
            amount=cost,
            description=f"Usage: {event.quantity:g} {event.meter}",
            project_id=event.project_id,
            resource_type=event.resource_type,
            resource_id=event.resource_id,
            allow_overdraft=True,
            record_key=False,
            actor=actor or "system",
        )
        [outcome] = await self.ledger.post_transfers(conn, [request], now=now)
        if outcome.error is not None:
            raise outcome.error
        assert outcome.transaction is not None
        return outcome.transaction.id

    async def analytics(
        self, conn: Conn, organization_id: uuid.UUID, *, top: int, recent: int, meter: str = ""
    ) -> tuple[str, Analytics]:
        """The wallet currency and the usage dashboard of an organization."""
        cur = await conn.execute(
            "SELECT currency, now() FROM wallets WHERE organization_id = %s", (organization_id,)
        )
        row = await cur.fetchone()
        if row is None:
            raise NotFound(f"organization {organization_id} not found", field="organization_id")
        currency, now = row
        args = {"org": organization_id, "meter": meter}
        today_quantity, today_cost, today, meters, month = await _models(conn, args, now)
        counts, last_24h = await _hours(conn, args, now)
        return currency, Analytics(
            today_quantity=today_quantity,
            today_cost=today_cost,
            today_by_model=by_quantity(today),
            today_by_meter=by_quantity(meters),
            top_models_30_days=by_quantity(month)[:top],
            last_24h=last_24h,
            hourly_48h=tuple(hourly(counts, now)),
            all_time=await _all_time(conn, args),
            recent=await _recent(conn, args, recent),
        )


Args = dict[str, Any]


async def _models(
    conn: Conn, args: Args, now: datetime
) -> tuple[Decimal, int, list[DimensionUsage], list[DimensionUsage], list[DimensionUsage]]:
    """Today's quantity and cost; today's usage per model and per meter; the last 30 days' per
    model."""
    today = day_start(now).date()
    cur = await conn.execute(MODELS, {**args, "today": today, "since": today - timedelta(days=29)})
    quantity, cost = Decimal(0), 0
    by_model_today, by_meter_today, by_model_30_days = [], [], []
    for meter, model, tq, tc, tn, te, q, c, n, e in await cur.fetchall():
        quantity, cost = quantity + tq, cost + tc
        if tn:
            by_meter_today.append(DimensionUsage("meter", meter, tq, tc, tn, te))
        if model and tn:
            by_model_today.append(DimensionUsage("model", model, tq, tc, tn, te))
        if model:
            by_model_30_days.append(DimensionUsage("model", model, q, c, n, e))
    return (
        quantity, cost, summed(by_model_today), summed(by_meter_today), summed(by_model_30_days)
    )  # fmt: skip


async def _hours(
    conn: Conn, args: Args, now: datetime
) -> tuple[dict[datetime, tuple[int, int]], Calls]:
    """Calls and errors per hour over 48 hours, and the calls of the last 24 of them (the hour
    in progress and the 23 before it)."""
    last_hour = hour_start(now)
    since = last_hour - timedelta(hours=HOURS_SHOWN - 1)
    cur = await conn.execute(HOURS, {**args, "since": since, "last_hour": last_hour})
    counts: dict[datetime, tuple[int, int]] = {}
    calls, errors, latency, timed = 0, 0, 0, 0
    for hour, n, e, lat, t in await cur.fetchall():
        counts[hour] = (n, e)
        if hour > last_hour - timedelta(hours=24):
            calls, errors, latency, timed = calls + n, errors + e, latency + lat, timed + t
    return counts, Calls(calls, errors, latency, timed)


async def _all_time(conn: Conn, args: Args) -> tuple[DimensionUsage, ...]:
    """Per dimension (model, provider, region, api) and value set: everything ever used, the
    ALL_TIME_TOP values used most of each."""
    cur = await conn.execute(ALL_TIME, {**args, "all_time_top": ALL_TIME_TOP})
    return per_dimension(DimensionUsage(*row) for row in await cur.fetchall())


async def _recent(conn: Conn, args: Args, limit: int) -> tuple[UsageRecord, ...]:
    cur = await conn.execute(
        f"SELECT {EVENT_COLUMNS} FROM usage_events e JOIN wallets w USING (organization_id)"
        " WHERE e.organization_id = %(org)s AND (%(meter)s = '' OR e.meter = %(meter)s)"
        " ORDER BY e.at DESC, e.event_id DESC LIMIT %(limit)s",
        {**args, "limit": limit},
    )
    return tuple(_record(r) for r in await cur.fetchall())
