"""Usage events: their cost and validation without servers; over gRPC, de-duplication by event id,
the charge in the same transaction, and the analytics read from the hourly rollup."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from psycopg_pool import AsyncConnectionPool

from gpudeck.kit.errors import InvalidArgument
from gpudeck.proto.common.v1.money_pb2 import Money
from gpudeck.proto.wallet.v1 import account_pb2 as apb
from gpudeck.proto.wallet.v1 import wallet_pb2 as pb
from gpudeck.proto.wallet.v1.account_pb2_grpc import AccountServiceStub
from gpudeck.proto.wallet.v1.wallet_pb2_grpc import WalletServiceStub
from gpudeck.wallet.usage import (
    Calls,
    DimensionUsage,
    UsageEvent,
    breakdown,
    cost,
    hourly,
    validate,
)
from gpudeck.wallet.usage_store import ALL_TIME_TOP

NewOrg = Callable[..., Awaitable[uuid.UUID]]
USD = 1_000_000


def test_cost_is_quantity_times_price_per_million_rounded_half_up() -> None:
    assert cost(1500, 2_000_000) == 3000  # 1,500 tokens at 2 USD per million tokens
    assert cost(1, 500_000) == 1  # 0.5 micro-units → 1
    assert cost(1, 499_999) == 0
    assert cost(3, 500_000) == 2  # 1.5 → 2
    # …388.49999999999997 exactly: 28 significant digits rounded it to …388.5, then up.
    assert cost(855983.95817169, 160265836047213) == 137184984699388
    assert cost(0.1, 10_000_000) == 1  # 0.1 taken as written, not as its binary neighbour
    assert cost(0, 123) == 0 and cost(10**9, 0) == 0


def event(**kw: object) -> UsageEvent:
    fields: dict[str, object] = {
        "event_id": "e1",
        "organization_id": uuid.uuid4(),
        "meter": "tokens",
        "quantity": 1.0,
        "unit_price": 1,
    }
    fields.update(kw)
    return UsageEvent(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"event_id": " "}, "event_id"),
        ({"meter": ""}, "meter"),
        ({"quantity": -1.0}, "quantity"),
        ({"quantity": float("nan")}, "quantity"),
        ({"quantity": float("inf")}, "quantity"),
        ({"unit_price": -1}, "unit_price"),
        ({"latency_ms": -5}, "latency_ms"),
        ({"quantity": 1e15, "unit_price": 10**15}, "unit_price"),
        # A tiny cost at a price no display currency could show (it failed the usage card).
        ({"quantity": 0.000001, "unit_price": 2**62}, "unit_price"),
    ],
)
def test_bad_events_name_the_field(kw: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate(event(**kw))
    assert err.value.field == field


def test_the_charge_goes_to_the_resource_type_of_its_dimensions() -> None:
    assert event().resource_type == "api"
    assert event(dimensions={"resource_type": "inference"}).resource_type == "inference"
    assert event(dimensions={"model": "m", "api": "chat"}).rollup_dimensions() == (
        "m",
        "",
        "",
        "chat",
    )


def test_hourly_counts_cover_48_hours_with_zeros() -> None:
    now = datetime(2026, 3, 1, 10, 30, tzinfo=UTC)
    hours = hourly({datetime(2026, 3, 1, 10, tzinfo=UTC): (5, 2)}, now)
    assert len(hours) == 48
    assert hours[0].hour == datetime(2026, 2, 27, 11, tzinfo=UTC)
    assert (hours[-1].success, hours[-1].errors) == (3, 2)
    assert sum(h.success + h.errors for h in hours[:-1]) == 0


def test_success_rate_and_latency_without_calls_are_unset() -> None:
    assert Calls().success_rate is None and Calls().average_latency_ms is None
    assert Calls(4, 1, 400, 4).success_rate == 0.75
    assert Calls(4, 1, 400, 4).average_latency_ms == 100.0
    # Over the calls that measured a latency only: 0 ms is "not measured" (a per-token meter).
    assert Calls(4, 1, 400, 2).average_latency_ms == 200.0
    assert Calls(4, 1, 0, 0).average_latency_ms is None


def test_breakdown_splits_combinations_per_dimension() -> None:
    rows = breakdown(
        [
            (("m1", "p1", "in", "chat"), DimensionUsage("", "", 10.0, 20, 2, 1)),
            (("m1", "p2", "us", "chat"), DimensionUsage("", "", 5.0, 10, 1, 0)),
            (("m2", "p2", "", "chat"), DimensionUsage("", "", 30.0, 60, 3, 0)),
        ]
    )
    assert [(r.dimension, r.value, r.quantity, r.cost, r.calls, r.errors) for r in rows] == [
        ("model", "m2", 30.0, 60, 3, 0),
        ("model", "m1", 15.0, 30, 3, 1),
        ("provider", "p2", 35.0, 70, 4, 0),
        ("provider", "p1", 10.0, 20, 2, 1),
        ("region", "in", 10.0, 20, 2, 1),
        ("region", "us", 5.0, 10, 1, 0),
        ("api", "chat", 45.0, 90, 6, 1),
    ]


# ------------------------------------------------------------------ over gRPC


def ts(value: datetime) -> Timestamp:
    t = Timestamp()
    t.FromDatetime(value)
    return t


async def record(
    stub: WalletServiceStub, org: uuid.UUID, event_id: str | None = None, **kw: object
) -> pb.UsageRecord:
    fields: dict[str, object] = {
        "event_id": uuid.uuid4().hex if event_id is None else event_id,
        "organization_id": str(org),
        "meter": "tokens",
        "quantity": 1000.0,
        "unit_price": 2 * USD,
        "success": True,
    }
    fields.update(kw)
    return await stub.RecordUsage(pb.RecordUsageRequest(**fields), timeout=5)  # type: ignore[arg-type]


async def balance(stub: WalletServiceStub, org: uuid.UUID) -> int:
    s = await stub.GetWalletSummary(pb.GetWalletSummaryRequest(organization_id=str(org)), timeout=5)
    return s.balance.amount


async def count(pool: AsyncConnectionPool, sql: str, *args: object) -> int:
    async with pool.connection() as conn:
        cur = await conn.execute(sql, args)
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def test_a_usage_event_is_charged_once_by_event_id(
    wallet_stub: WalletServiceStub, wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    org = await new_org("USD")
    event = {
        "quantity": 1500.0,
        "dimensions": {"model": "llama-3", "provider": "p1", "region": "in", "api": "chat"},
        "latency_ms": 120,
    }
    first = await record(wallet_stub, org, "evt-1-" + str(org), **event)
    assert first.cost == Money(amount=3000, currency="USD")
    assert first.transaction_id and first.unit_price == 2 * USD
    assert await balance(wallet_stub, org) == -3000  # usage may overdraw; auto-stop handles it
    assert await record(wallet_stub, org, "evt-1-" + str(org), **event) == first  # a retry
    with pytest.raises(grpc.aio.AioRpcError) as err:  # the same id for another event
        await record(wallet_stub, org, "evt-1-" + str(org), quantity=99.0)
    assert err.value.code() == grpc.StatusCode.ABORTED
    assert await balance(wallet_stub, org) == -3000
    assert (
        await count(
            wallet_pool, "SELECT count(*) FROM transactions WHERE organization_id = %s", org
        )
        == 1
    )
    assert (
        await count(
            wallet_pool, "SELECT sum(calls) FROM usage_hourly WHERE organization_id = %s", org
        )
        == 1
    )
    [tx] = (
        await wallet_stub.ListTransactions(
            pb.ListTransactionsRequest(organization_id=str(org)), timeout=5
        )
    ).transactions
    assert (tx.id, tx.kind, tx.resource_type, tx.amount.amount) == (
        first.transaction_id,
        pb.USAGE,
        "api",
        3000,
    )
    e = await wallet_stub.GetExpenditure(
        pb.GetExpenditureRequest(organization_id=str(org)), timeout=5
    )
    assert e.last_7_days.total.amount == 3000


async def test_concurrent_retries_of_one_event_charge_it_once(
    wallet_stub: WalletServiceStub, wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    org = await new_org("USD")
    records = await asyncio.gather(
        *(record(wallet_stub, org, f"burst-{org}", quantity=500.0) for _ in range(10))
    )
    assert len({r.transaction_id for r in records}) == 1
    assert await balance(wallet_stub, org) == -1000
    sql = "SELECT count(*) FROM transactions WHERE organization_id = %s"
    assert await count(wallet_pool, sql, org) == 1


async def test_an_event_id_is_its_organizations_own(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    """Ids were unique across tenants: one tenant's "req-1" refused another's event (ABORTED),
    which went unbilled, and told it the id was in use somewhere."""
    a, b = await new_org("USD"), await new_org("USD")
    first = await record(wallet_stub, a, "req-1")
    other = await record(wallet_stub, b, "req-1", quantity=500.0)
    assert other.organization_id == str(b) and other.transaction_id != first.transaction_id
    assert (await balance(wallet_stub, a), await balance(wallet_stub, b)) == (-2000, -1000)
    assert await record(wallet_stub, a, "req-1") == first  # each its own replay
    assert await record(wallet_stub, b, "req-1", quantity=500.0) == other
    with pytest.raises(grpc.aio.AioRpcError) as err:  # and its own refusal
        await record(wallet_stub, b, "req-1")
    assert err.value.code() == grpc.StatusCode.ABORTED


async def test_a_retry_answers_as_the_first_call_once_its_project_is_deleted(
    wallet_stub: WalletServiceStub, account_stub: AccountServiceStub, new_org: NewOrg
) -> None:
    """A caller whose first call timed out was told NOT_FOUND, as if nothing was charged."""
    org = await new_org("USD")
    for name in ("kept", "gone"):  # an organization keeps one project at least
        project = await account_stub.CreateProject(
            apb.CreateProjectRequest(organization_id=str(org), name=name), timeout=5
        )
    first = await record(wallet_stub, org, "in-gone", project_id=project.id)
    await account_stub.DeleteProject(apb.DeleteProjectRequest(project_id=project.id), timeout=5)
    assert await record(wallet_stub, org, "in-gone", project_id=project.id) == first
    with pytest.raises(grpc.aio.AioRpcError) as err:  # a new event there is still refused
        await record(wallet_stub, org, "new-in-gone", project_id=project.id)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert await balance(wallet_stub, org) == -2000  # the first only


async def test_quantities_are_summed_exactly(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    """Summed as binary floating point, ten events of 0.1 showed 0.9999999999999999."""
    org = await new_org("USD")
    for _ in range(10):
        await record(wallet_stub, org, quantity=0.1, dimensions={"model": "m"})
    usage = await wallet_stub.GetUsageAnalytics(
        pb.GetUsageAnalyticsRequest(organization_id=str(org)), timeout=5
    )
    assert usage.today_quantity == 1.0
    assert [u.quantity for u in usage.today_by_model] == [1.0]
    assert [u.quantity for u in usage.top_models_30_days] == [1.0]
    assert [u.quantity for u in usage.all_time] == [1.0]
    assert [r.quantity for r in usage.recent] == [0.1] * 10


async def test_a_free_event_is_recorded_without_a_charge(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    org = await new_org("USD")
    free = await record(wallet_stub, org, unit_price=0)
    assert free.cost.amount == 0 and free.transaction_id == ""


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"event_id": ""}, "event_id"),
        ({"quantity": -1.0}, "quantity"),
        ({"unit_price": -1}, "unit_price"),
    ],
)
async def test_bad_events_are_invalid_arguments(
    wallet_stub: WalletServiceStub, new_org: NewOrg, kw: dict[str, object], field: str
) -> None:
    org = await new_org("USD")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await record(wallet_stub, org, **kw)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ("x-error-field", field) in list(err.value.trailing_metadata() or ())


async def test_usage_analytics(
    wallet_stub: WalletServiceStub, wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    org = await new_org("USD")
    await wallet_stub.Transfer(
        pb.TransferRequest(
            idempotency_key="t", organization_id=str(org), kind=pb.TOPUP, amount=Money(amount=USD)
        ),
        timeout=5,
    )
    dims_a = {"model": "model-a", "provider": "p1", "region": "in", "api": "chat"}
    dims_b = {"model": "model-b", "provider": "p2", "region": "in", "api": "chat"}
    await record(
        wallet_stub, org, "a1" + str(org), quantity=1000.0, dimensions=dims_a, latency_ms=100
    )
    await record(
        wallet_stub, org, "a2" + str(org), quantity=500.0, dimensions=dims_a, latency_ms=300
    )
    await record(
        wallet_stub,
        org,
        "b1" + str(org),
        quantity=2000.0,
        dimensions=dims_b,
        success=False,
        latency_ms=200,
    )
    await record(wallet_stub, org, "c1" + str(org), meter="api_calls", quantity=1.0, unit_price=0)
    now = datetime.now(UTC)
    hour = now.replace(minute=0, second=0, microsecond=0)
    async with wallet_pool.connection() as conn:
        for at, model, quantity, calls, errors in [
            (hour - timedelta(hours=5), "model-c", 10.0, 4, 1),  # in the last 24 h
            (hour - timedelta(hours=30), "model-c", 20.0, 6, 6),  # 48 h, not 24 h
            (hour - timedelta(days=10), "model-c", 9000.0, 1, 0),  # 30 days
            (hour - timedelta(days=40), "model-d", 99999.0, 1, 0),  # all time only
            # Dated ahead (clocks differ): it counted in today's and the last 24 hours' figures
            # before its day and hour came.
            (hour + timedelta(days=1), "model-e", 77.0, 5, 0),
        ]:
            await conn.execute(
                "INSERT INTO usage_hourly (organization_id, hour, meter, model, provider, calls,"
                " errors, quantity, cost, latency_ms_sum) VALUES (%s, %s, 'tokens', %s, 'p3',"
                " %s, %s, %s, 7, 0)",
                (org, at, model, calls, errors, quantity),
            )
    a = await wallet_stub.GetUsageAnalytics(
        pb.GetUsageAnalyticsRequest(organization_id=str(org), top=2, recent=3, meter="tokens"),
        timeout=5,
    )
    today = {(u.value, u.quantity, u.cost.amount, u.calls, u.errors) for u in a.today_by_model}
    assert {("model-a", 1500.0, 3000, 2, 0), ("model-b", 2000.0, 4000, 1, 1)} <= today
    assert "model-e" not in {u.value for u in a.today_by_model}
    if (hour - timedelta(hours=5)).date() == now.date():
        assert a.today_quantity == 3510.0
    else:
        assert a.today_quantity == 3500.0
    assert [(u.value, u.quantity) for u in a.top_models_30_days] == [
        ("model-c", 9030.0),
        ("model-b", 2000.0),
    ]
    assert a.calls_24h == 3 + 4
    assert a.success_rate_24h == pytest.approx((7 - 2) / 7)
    # Over the three that measured one (it counted all seven, the others as 0 ms).
    assert a.average_latency_ms_24h == pytest.approx(600 / 3)
    assert len(a.hourly_48h) == 48
    by_hour = {h.hour: (h.success, h.errors) for h in a.hourly_48h}
    iso = lambda t: t.isoformat().replace("+00:00", "Z")  # noqa: E731
    assert by_hour[iso(hour)] == (2, 1)
    assert by_hour[iso(hour - timedelta(hours=5))] == (3, 1)
    assert by_hour[iso(hour - timedelta(hours=30))] == (0, 6)
    assert a.hourly_48h[-1].hour == iso(hour)
    all_time = {(u.dimension, u.value): u.quantity for u in a.all_time}
    assert all_time[("model", "model-d")] == 99999.0
    assert all_time[("provider", "p1")] == 1500.0
    assert all_time[("api", "chat")] == 3500.0
    assert all_time[("region", "in")] == 3500.0
    assert [r.event_id for r in a.recent] == ["b1" + str(org), "a2" + str(org), "a1" + str(org)]
    assert a.recent[0].dimensions["model"] == "model-b" and not a.recent[0].success
    every = await wallet_stub.GetUsageAnalytics(
        pb.GetUsageAnalyticsRequest(organization_id=str(org)), timeout=5
    )
    assert every.calls_24h == 8 and len(every.recent) == 4
    # Tokens and API calls are different units: today's usage per meter keeps them apart.
    meters = {u.value: (u.quantity, u.calls) for u in every.today_by_meter}
    assert meters["api_calls"] == (1.0, 1)
    earlier_today = (hour - timedelta(hours=5)).date() == now.date()
    assert meters["tokens"] == (a.today_quantity, 3 + (4 if earlier_today else 0))
    assert {u.dimension for u in every.today_by_meter} == {"meter"}
    assert every.today_quantity == a.today_quantity + 1.0


async def test_all_time_shows_the_values_of_each_dimension_used_most(
    wallet_stub: WalletServiceStub, wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    """At most ALL_TIME_TOP values per dimension (the answer grew with every model ever used)."""
    org = await new_org()
    async with wallet_pool.connection() as conn:
        await conn.execute(
            "INSERT INTO usage_totals (organization_id, meter, dimension, value, calls, errors,"
            " quantity, cost) SELECT %s, 'tokens', 'model', 'm' || i, 1, 0, i, i"
            " FROM generate_series(1, %s) AS i",
            (org, ALL_TIME_TOP + 5),
        )
        await conn.execute(
            "INSERT INTO usage_totals (organization_id, meter, dimension, value, calls, errors,"
            " quantity, cost) VALUES (%s, 'tokens', 'region', 'in', 3, 1, 7, 7)",
            (org,),
        )
    a = await wallet_stub.GetUsageAnalytics(
        pb.GetUsageAnalyticsRequest(organization_id=str(org)), timeout=5
    )
    models = [u.value for u in a.all_time if u.dimension == "model"]
    assert models == [f"m{i}" for i in range(ALL_TIME_TOP + 5, 5, -1)]  # largest first
    assert [(u.value, u.calls) for u in a.all_time if u.dimension == "region"] == [("in", 3)]
