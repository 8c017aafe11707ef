"""The daily and all-time usage rollups (migration 006) say what summing usage_hourly says: after
RecordUsage calls (retries included), after direct writes to usage_hourly, and after the backfill
of a database that had usage before them; the analytics read from them answer as the hourly
rollup does."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from psycopg_pool import AsyncConnectionPool

import gpudeck.wallet
from gpudeck.kit.db import migrate, open_pool
from gpudeck.kit.runtime import KIT_MIGRATIONS
from gpudeck.proto.wallet.v1 import wallet_pb2 as pb
from gpudeck.proto.wallet.v1.wallet_pb2_grpc import WalletServiceStub
from gpudeck.wallet.usage import DimensionUsage, breakdown, by_quantity

MIGRATIONS = Path(gpudeck.wallet.__file__).parent / "migrations"
NewOrg = Callable[..., Awaitable[uuid.UUID]]
USD = 1_000_000

# usage_daily and usage_totals as sums of usage_hourly, and the rollups themselves, same order.
DAILY_FROM_HOURLY = """
SELECT (hour AT TIME ZONE 'UTC')::date, meter, model, sum(calls)::bigint, sum(errors)::bigint,
       sum(quantity), sum(cost)::bigint
FROM usage_hourly WHERE organization_id = %s GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
"""
DAILY = """
SELECT day, meter, model, calls, errors, quantity, cost
FROM usage_daily WHERE organization_id = %s ORDER BY 1, 2, 3
"""
TOTALS_FROM_HOURLY = """
SELECT h.meter, v.dimension, v.value, sum(h.calls)::bigint, sum(h.errors)::bigint,
       sum(h.quantity), sum(h.cost)::bigint
FROM usage_hourly h
CROSS JOIN LATERAL (VALUES ('model', h.model), ('provider', h.provider), ('region', h.region),
                           ('api', h.api)) AS v (dimension, value)
WHERE h.organization_id = %s AND v.value <> ''
GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
"""
TOTALS = """
SELECT meter, dimension, value, calls, errors, quantity, cost
FROM usage_totals WHERE organization_id = %s ORDER BY 1, 2, 3
"""


def ts(value: datetime) -> Timestamp:
    t = Timestamp()
    t.FromDatetime(value)
    return t


async def record(
    stub: WalletServiceStub, org: uuid.UUID, event_id: str, **kw: object
) -> pb.UsageRecord:
    fields: dict[str, object] = {
        "event_id": f"{event_id}-{org}",
        "organization_id": str(org),
        "meter": "tokens",
        "quantity": 1000.0,
        "unit_price": 2 * USD,
        "success": True,
    }
    fields.update(kw)
    return await stub.RecordUsage(pb.RecordUsageRequest(**fields), timeout=5)  # type: ignore[arg-type]


async def rows(pool: AsyncConnectionPool, sql: str, *args: object) -> list[tuple[Any, ...]]:
    async with pool.connection() as conn:
        cur = await conn.execute(sql, args)
        return [tuple(r) for r in await cur.fetchall()]


async def assert_rollups_agree(pool: AsyncConnectionPool, org: uuid.UUID) -> None:
    assert await rows(pool, DAILY, org) == await rows(pool, DAILY_FROM_HOURLY, org)
    assert await rows(pool, TOTALS, org) == await rows(pool, TOTALS_FROM_HOURLY, org)


async def record_a_mix(stub: WalletServiceStub, org: uuid.UUID) -> None:
    """Events over several days and meters, some failed, some without dimensions, some retried;
    quantities are exact in binary so every order of summing gives the same number."""
    now = datetime.now(UTC)
    a = {"model": "m-a", "provider": "p1", "region": "in", "api": "chat"}
    b = {"model": "m-b", "provider": "p2", "api": "chat"}
    await record(stub, org, "e1", quantity=1500.0, dimensions=a, latency_ms=120)
    await record(stub, org, "e2", quantity=0.5, dimensions=a, success=False, latency_ms=80)
    await record(stub, org, "e3", quantity=1.25, dimensions=b, at=ts(now - timedelta(hours=3)))
    await record(stub, org, "e4", quantity=250.0, dimensions=b, at=ts(now - timedelta(days=3)))
    await record(stub, org, "e5", quantity=64.0, dimensions=a, at=ts(now - timedelta(days=40)))
    await record(stub, org, "e6", meter="api_calls", quantity=1.0, unit_price=0, dimensions=b)
    await record(stub, org, "e7", quantity=8.0)  # no dimensions: daily only, under model ''
    await record(stub, org, "e1", quantity=1500.0, dimensions=a, latency_ms=120)  # counted once
    await asyncio.gather(
        *(record(stub, org, "burst", quantity=16.0, dimensions=a) for _ in range(5))
    )


async def test_rollups_agree_with_the_hourly_rollup_after_recorded_usage(
    wallet_stub: WalletServiceStub, wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    org = await new_org("USD")
    await record_a_mix(wallet_stub, org)
    await assert_rollups_agree(wallet_pool, org)
    totals = {(m, d, v): (n, e, q) for m, d, v, n, e, q, _ in await rows(wallet_pool, TOTALS, org)}
    assert totals[("tokens", "model", "m-a")] == (4, 1, 1500.0 + 0.5 + 64.0 + 16.0)
    assert totals[("tokens", "model", "m-b")] == (2, 0, 251.25)
    assert totals[("api_calls", "api", "chat")] == (1, 0, 1.0)
    assert ("tokens", "region", "") not in totals
    daily = await rows(
        wallet_pool, "SELECT sum(calls) FROM usage_daily WHERE organization_id = %s", org
    )
    assert daily == [(8,)]  # e1–e7 and one burst


async def test_direct_writes_to_the_hourly_rollup_reach_the_rollups(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    org = await new_org("USD")
    hour = datetime(2026, 1, 10, 23, tzinfo=UTC)
    async with wallet_pool.connection() as conn, conn.transaction():
        for at, model, region in [(hour, "m-a", "in"), (hour + timedelta(hours=1), "m-a", "")]:
            await conn.execute(
                "INSERT INTO usage_hourly (organization_id, hour, meter, model, region, calls,"
                " errors, quantity, cost) VALUES (%s, %s, 'tokens', %s, %s, 3, 1, 7.5, 11)",
                (org, at, model, region),
            )
        await conn.execute(
            "UPDATE usage_hourly SET calls = calls + 2, quantity = quantity + 0.25"
            " WHERE organization_id = %s AND hour = %s",
            (org, hour),
        )
    await assert_rollups_agree(wallet_pool, org)
    daily = await rows(wallet_pool, DAILY, org)
    assert [(d.isoformat(), model, calls) for d, _, model, calls, *_ in daily] == [
        ("2026-01-10", "m-a", 5),
        ("2026-01-11", "m-a", 3),
    ]


async def test_analytics_answer_as_sums_of_the_hourly_rollup(
    wallet_stub: WalletServiceStub, wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    org = await new_org("USD")
    await record_a_mix(wallet_stub, org)
    for meter in ("", "tokens"):
        a = await wallet_stub.GetUsageAnalytics(
            pb.GetUsageAnalyticsRequest(organization_id=str(org), top=100, meter=meter), timeout=5
        )
        args = (org, meter, meter)
        combinations = await rows(
            wallet_pool,
            "SELECT model, provider, region, api, sum(quantity), sum(cost)::bigint,"
            " sum(calls)::bigint, sum(errors)::bigint FROM usage_hourly"
            " WHERE organization_id = %s AND (%s = '' OR meter = %s) GROUP BY 1, 2, 3, 4",
            *args,
        )
        expected = breakdown(
            (tuple(values), DimensionUsage("", "", q, c, n, e))
            for *values, q, c, n, e in combinations
        )
        got = [
            (u.dimension, u.value, u.quantity, u.cost.amount, u.calls, u.errors) for u in a.all_time
        ]
        assert got == [
            (d.dimension, d.value, d.quantity, d.cost, d.calls, d.errors) for d in expected
        ]
        month = await rows(
            wallet_pool,
            "SELECT model, sum(quantity), sum(cost)::bigint, sum(calls)::bigint,"
            " sum(errors)::bigint FROM usage_hourly WHERE organization_id = %s"
            " AND hour >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'"
            " - interval '29 days' AND (%s = '' OR meter = %s) AND model <> '' GROUP BY 1",
            *args,
        )
        top = by_quantity(DimensionUsage("model", *r) for r in month)
        assert [(u.value, u.quantity, u.calls) for u in a.top_models_30_days] == [
            (d.value, d.quantity, d.calls) for d in top
        ]


async def test_the_migration_backfills_the_rollups_from_usage_already_recorded(
    database_url: str, tmp_path: Path
) -> None:
    schema = f"wallet_backfill_{uuid.uuid4().hex[:8]}"
    before = tmp_path / "migrations"
    before.mkdir()
    for path in sorted(MIGRATIONS.glob("*.sql")):
        if path.name < "006":
            shutil.copy(path, before)
    pool = await open_pool(database_url, min_size=1, max_size=2, schema=schema)
    try:
        await migrate(pool, schema, KIT_MIGRATIONS, table="kit_migrations")
        await migrate(pool, schema, before)
        org = uuid.uuid4()
        hour = datetime(2026, 2, 1, tzinfo=UTC)
        async with pool.connection() as conn:
            for i, (model, provider) in enumerate([("m-a", "p1"), ("m-a", "p2"), ("", "p1")]):
                await conn.execute(
                    "INSERT INTO usage_hourly (organization_id, hour, meter, model, provider,"
                    " calls, errors, quantity, cost) VALUES (%s, %s, 'tokens', %s, %s, %s, 0,"
                    " %s, %s)",
                    (org, hour + timedelta(hours=13 * i), model, provider, i + 1, 2.5 * i, i),
                )
        later = sorted(int(p.name[:3]) for p in MIGRATIONS.glob("*.sql") if p.name >= "006")
        assert await migrate(pool, schema, MIGRATIONS) == later
        await assert_rollups_agree(pool, org)
        assert len(await rows(pool, DAILY, org)) == 2
        async with pool.connection() as conn:  # and from then on, the trigger keeps them
            await conn.execute(
                "UPDATE usage_hourly SET calls = calls + 1 WHERE organization_id = %s", (org,)
            )
        await assert_rollups_agree(pool, org)
    finally:
        async with pool.connection() as conn:
            await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await pool.close()
