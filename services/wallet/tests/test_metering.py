"""Per-second metering: exact charges across restarts, rate changes and late closes."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from processes import TOKEN, start_wallet, wait_serving, wallet_env
from psycopg_pool import AsyncConnectionPool

from gpudeck.kit.config import EventsConfig
from gpudeck.kit.errors import Conflict
from gpudeck.kit.events import parse_event
from gpudeck.kit.grpcclient import channel
from gpudeck.proto.common.v1.money_pb2 import Money
from gpudeck.proto.wallet.v1 import account_pb2
from gpudeck.proto.wallet.v1 import wallet_pb2 as pb
from gpudeck.proto.wallet.v1.account_pb2_grpc import AccountServiceStub
from gpudeck.proto.wallet.v1.wallet_pb2_grpc import WalletServiceStub
from gpudeck.wallet import audit
from gpudeck.wallet.deps import Wallet
from gpudeck.wallet.ledger import Kind, SpendLine, TransferRequest
from gpudeck.wallet.ledger_store import db_now
from gpudeck.wallet.metering import MeterRequest, in_transfers, owed

NewOrg = Callable[..., Awaitable[uuid.UUID]]


def ts(value: datetime) -> Timestamp:
    t = Timestamp()
    t.FromDatetime(value)
    return t


def test_owed_floors_the_cumulative_amount() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    assert owed(36_000_000, start, start + timedelta(seconds=5)) == 50_000
    assert owed(1_000_003, start, start + timedelta(seconds=5)) == 1388  # 1388.89 floored
    # Many small steps add up to the same floor as one step: no drift.
    steps = [owed(1_000_003, start, start + timedelta(milliseconds=250 * i)) for i in range(21)]
    assert steps[-1] == 1388 and steps == sorted(steps)


def test_in_transfers_cuts_what_one_transfer_cannot_move() -> None:
    lines = [SpendLine("pod", 7, "a"), SpendLine("vm", 25, "b"), SpendLine("pod", 3, "c")]
    groups = in_transfers(lines, limit=10)
    assert [sum(line.amount for line in g) for g in groups] == [10, 10, 10, 5]
    assert [(line.resource_id, line.amount) for g in groups for line in g] == [
        ("a", 7), ("b", 3), ("b", 10), ("b", 10), ("b", 2), ("c", 3),
    ]  # fmt: skip
    assert in_transfers(lines, limit=100) == [lines]
    assert in_transfers([]) == []


async def top_up(stub: WalletServiceStub, org: uuid.UUID, amount: int) -> None:
    await stub.Transfer(
        pb.TransferRequest(
            idempotency_key=uuid.uuid4().hex, organization_id=str(org), kind=pb.TOPUP,
            amount=Money(amount=amount),
        )
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("rate", [36_000_000, 1_000_003])
async def test_a_meter_open_n_seconds_across_a_restart_is_charged_rate_times_n(
    database_url: str,
    events_config: EventsConfig,
    wallet_pool: AsyncConnectionPool,
    new_org: NewOrg,
    rate: int,
) -> None:
    # A graceful restart, closed at a chosen instant; the SIGKILL of a process while its billing
    # loop charges the meter is test_crash_billing.py.
    n = 4
    env = wallet_env(database_url, events_config, GPUDECK_BILLING_INTERVAL="0.3")
    address = env["GPUDECK_WALLET_LISTEN"]
    org = await new_org()
    meter_id = f"pod:{uuid.uuid4()}"
    proc = start_wallet(env)
    try:
        await wait_serving(address)
        async with channel(address, TOKEN) as ch:
            stub = WalletServiceStub(ch)
            await top_up(stub, org, 100_000_000)
            start = datetime.now(UTC) - timedelta(seconds=1)
            await stub.OpenMeter(
                pb.OpenMeterRequest(
                    meter_id=meter_id, organization_id=str(org), resource_id="pod-1",
                    resource_type="pod", hourly_rate=rate, at=ts(start),
                )
            )  # fmt: skip
        await asyncio.sleep(1.0)  # some ticks bill
        proc.terminate()
        proc.wait(10)
        proc = start_wallet(env)
        await wait_serving(address)
        end = start + timedelta(seconds=n)
        while datetime.now(UTC) < end + timedelta(seconds=0.7):  # ticks bill past the end
            await asyncio.sleep(0.2)
        async with channel(address, TOKEN) as ch:
            meter = await WalletServiceStub(ch).CloseMeter(
                pb.CloseMeterRequest(meter_id=meter_id, at=ts(end))
            )
    finally:
        proc.terminate()
        proc.wait(10)
    expected = rate * n // 3600
    assert meter.total_charged == expected
    async with wallet_pool.connection() as conn:
        cur = await conn.execute(
            "SELECT coalesce(sum(CASE WHEN kind = 'refund' THEN -amount ELSE amount END), 0)"
            " FROM transactions t WHERE organization_id = %s AND kind IN ('usage', 'refund')",
            (org,),
        )
        assert (await cur.fetchone()) == (expected,)
        cur = await conn.execute("SELECT balance FROM wallets WHERE organization_id = %s", (org,))
        assert (await cur.fetchone()) == (100_000_000 - expected,)
        cur = await conn.execute(
            "SELECT total FROM resource_costs WHERE organization_id = %s AND resource_id = 'pod-1'",
            (org,),
        )
        assert (await cur.fetchone()) == (expected,)
        assert await audit.check(conn) == []


async def test_rate_change_bills_each_segment_at_its_rate(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    org = await new_org()
    await top_up(wallet_stub, org, 100_000_000)
    start = datetime.now(UTC) - timedelta(seconds=30)
    meter_id = f"vm:{uuid.uuid4()}"
    await wallet_stub.OpenMeter(
        pb.OpenMeterRequest(
            meter_id=meter_id, organization_id=str(org), resource_id="vm-1",
            resource_type="vm", hourly_rate=3_600_000, at=ts(start),
        )
    )  # fmt: skip
    await wallet_stub.UpdateMeterRate(
        pb.UpdateMeterRateRequest(
            meter_id=meter_id,
            hourly_rate=7_200_000,
            at=ts(start + timedelta(seconds=10)),
            idempotency_key="rate-1",
        )
    )
    closed = await wallet_stub.CloseMeter(
        pb.CloseMeterRequest(meter_id=meter_id, at=ts(start + timedelta(seconds=20)))
    )
    assert closed.total_charged == 10 * 1000 + 10 * 2000
    again = await wallet_stub.CloseMeter(pb.CloseMeterRequest(meter_id=meter_id))
    assert again == closed


async def test_open_is_idempotent_and_run_rate_follows_meters(
    wallet_stub: WalletServiceStub, wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    org = await new_org()
    request = pb.OpenMeterRequest(
        meter_id=f"nfs:{uuid.uuid4()}", organization_id=str(org), resource_id="vol-1",
        resource_type="nfs_volume", hourly_rate=500_000,
    )  # fmt: skip
    first = await wallet_stub.OpenMeter(request)
    second = await wallet_stub.OpenMeter(request)
    assert first.opened_at == second.opened_at
    async with wallet_pool.connection() as conn:
        cur = await conn.execute("SELECT run_rate FROM wallets WHERE organization_id = %s", (org,))
        assert (await cur.fetchone()) == (500_000,)
    await wallet_stub.CloseMeter(pb.CloseMeterRequest(meter_id=request.meter_id))
    async with wallet_pool.connection() as conn:
        cur = await conn.execute("SELECT run_rate FROM wallets WHERE organization_id = %s", (org,))
        assert (await cur.fetchone()) == (0,)


async def test_a_retry_that_changes_the_meter_is_refused_not_ignored(
    wallet_stub: WalletServiceStub, account_stub: AccountServiceStub, new_org: NewOrg
) -> None:
    org = await new_org()
    project = await account_stub.CreateProject(
        account_pb2.CreateProjectRequest(organization_id=str(org), name="second")
    )
    request = pb.OpenMeterRequest(
        meter_id=f"pod:{uuid.uuid4()}", organization_id=str(org), resource_id="pod-1",
        resource_type="pod", hourly_rate=3_600_000,
    )  # fmt: skip
    await wallet_stub.OpenMeter(request)
    an_hour_ago = Timestamp()
    an_hour_ago.FromDatetime(datetime.now(UTC) - timedelta(hours=1))
    for changed, says in (
        ({"hourly_rate": 7_200_000}, "hourly_rate"),
        ({"resource_id": "pod-2"}, "resource"),
        ({"project_id": project.id}, "project_id"),
        ({"at": an_hour_ago}, "at"),  # was ignored: the meter billed from its first time
    ):
        retry = pb.OpenMeterRequest()
        retry.CopyFrom(request)
        for name, value in changed.items():
            if isinstance(value, Timestamp):
                getattr(retry, name).CopyFrom(value)
            else:
                setattr(retry, name, value)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await wallet_stub.OpenMeter(retry)
        assert err.value.code() == grpc.StatusCode.ABORTED, changed
        assert says in (err.value.details() or ""), err.value.details()
        trailers = dict(err.value.trailing_metadata() or ())
        assert trailers.get("x-error-reason") == "IDEMPOTENCY_KEY_REUSED", trailers
    # The meter kept its first rate; the same request again is still the same meter.
    again = await wallet_stub.OpenMeter(request)
    assert again.hourly_rate == 3_600_000
    # After a rate change, a late retry of the opening request still returns the meter.
    await wallet_stub.UpdateMeterRate(
        pb.UpdateMeterRateRequest(
            meter_id=request.meter_id, hourly_rate=1_800_000, idempotency_key="rate-1"
        )
    )
    assert (await wallet_stub.OpenMeter(request)).hourly_rate == 1_800_000


async def test_a_close_retried_with_another_time_is_refused_not_ignored(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    """It answered with the first close, as if its time had been taken."""
    wallet = Wallet(wallet_pool)
    org = await new_org()
    request = MeterRequest(
        f"pod:{uuid.uuid4()}", org, "pod-1", "pod", 3_600_000,
        at=datetime.now(UTC) - timedelta(minutes=10),
    )  # fmt: skip
    stopped = datetime.now(UTC) - timedelta(minutes=5)
    async with wallet_pool.connection() as conn, conn.transaction():
        await wallet.meters.open(conn, request)
        closed = await wallet.meters.close(conn, request.meter_id, stopped)
    for same in (stopped, None, datetime.now(UTC) + timedelta(minutes=1)):  # ahead: taken as now
        async with wallet_pool.connection() as conn, conn.transaction():
            assert await wallet.meters.close(conn, request.meter_id, same) == closed
    with pytest.raises(Conflict) as err:
        async with wallet_pool.connection() as conn, conn.transaction():
            await wallet.meters.close(conn, request.meter_id, stopped - timedelta(seconds=1))
    assert err.value.field == "at" and "was closed at" in str(err.value)


async def test_a_retry_sent_with_a_time_ahead_of_the_clock_is_the_same_request_later(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    """A time ahead is taken as the clock's: once it has passed, the same request (a caller a
    little ahead of the database, retrying after a timeout) must not read as another time."""
    wallet = Wallet(wallet_pool)
    org = await new_org()
    ahead = datetime.now(UTC) + timedelta(seconds=1)
    request = MeterRequest(f"pod:{uuid.uuid4()}", org, "pod-1", "pod", 3_600_000, at=ahead)
    async with wallet_pool.connection() as conn, conn.transaction():
        opened = await wallet.meters.open(conn, request)
        closed = await wallet.meters.close(conn, request.meter_id, ahead)
    await asyncio.sleep(1.2)
    async with wallet_pool.connection() as conn, conn.transaction():
        assert (await wallet.meters.open(conn, request)).opened_at == opened.opened_at
        assert await wallet.meters.close(conn, request.meter_id, ahead) == closed


@pytest.mark.parametrize("opened", [datetime(1970, 1, 1, tzinfo=UTC), "25h ago"])
async def test_a_meter_cannot_open_long_ago(
    wallet_stub: WalletServiceStub, new_org: NewOrg, opened: datetime | str
) -> None:
    org = await new_org()
    await top_up(wallet_stub, org, 10_000_000)
    at = opened if isinstance(opened, datetime) else datetime.now(UTC) - timedelta(hours=25)
    request = pb.OpenMeterRequest(
        meter_id=f"pod:{uuid.uuid4()}", organization_id=str(org), resource_id="pod-1",
        resource_type="pod", hourly_rate=3_600_000, at=ts(at),
    )  # fmt: skip
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wallet_stub.OpenMeter(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ("x-error-field", "at") in list(err.value.trailing_metadata() or ())
    meters = await wallet_stub.ListMeters(pb.ListMetersRequest(organization_id=str(org)))
    assert not meters.meters
    # An hour ago is a caller catching up: billed from then.
    request.at.CopyFrom(ts(datetime.now(UTC) - timedelta(hours=1)))
    opened_meter = await wallet_stub.OpenMeter(request)
    assert opened_meter.opened_at.ToDatetime(UTC) < datetime.now(UTC) - timedelta(minutes=59)


async def test_a_close_waiting_on_a_rate_change_takes_effect_after_it(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    """A close (no `at`) whose transaction began before a rate change committed: it closes the
    meter at the change (the new rate owed nothing yet); it was refused as "before the meter's
    current rate began", an INVALID_ARGUMENT the caller had not caused."""
    wallet = Wallet(wallet_pool)
    org = await new_org()
    meter_id = f"pod:{uuid.uuid4()}"
    async with wallet_pool.connection() as conn, conn.transaction():
        await wallet.meters.open(
            conn,
            MeterRequest(
                meter_id, org, "pod-1", "pod", 3_600_000,
                at=datetime.now(UTC) - timedelta(seconds=30),
            ),
        )  # fmt: skip
    async with wallet_pool.connection() as closing, closing.transaction():
        await closing.execute("SELECT now()")  # the close's transaction (and its now) begins
        async with wallet_pool.connection() as other, other.transaction():
            changed = await wallet.meters.update_rate(other, meter_id, 7_200_000, None, "up-1")
        closed = await wallet.meters.close(closing, meter_id)
    assert closed.closed_at == changed.segment_started_at
    assert closed.total_charged == owed(3_600_000, closed.opened_at, changed.segment_started_at)
    async with wallet_pool.connection() as conn:
        cur = await conn.execute("SELECT run_rate FROM wallets WHERE organization_id = %s", (org,))
        assert (await cur.fetchone()) == (0,)


async def test_a_retry_of_an_open_near_the_backdate_limit_is_still_the_same_meter(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    wallet = Wallet(wallet_pool)
    org = await new_org()
    request = MeterRequest(
        f"pod:{uuid.uuid4()}", org, "pod-1", "pod", 3_600_000,
        at=datetime.now(UTC) - timedelta(hours=24) + timedelta(seconds=1),
    )  # fmt: skip
    async with wallet_pool.connection() as conn, conn.transaction():
        opened = await wallet.meters.open(conn, request)
    await asyncio.sleep(1.5)  # the retry's `at` is now more than 24 h ago
    async with wallet_pool.connection() as conn, conn.transaction():
        again = await wallet.meters.open(conn, request)
    assert again.opened_at == opened.opened_at
    changed = MeterRequest(request.meter_id, org, "pod-2", "pod", 3_600_000, at=request.at)
    with pytest.raises(Conflict):
        async with wallet_pool.connection() as conn, conn.transaction():
            await wallet.meters.open(conn, changed)


async def test_a_rate_change_is_one_request_per_key(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    """A late retry of an older rate change answers as it did and changes nothing: it would
    otherwise undo the newer change (A → B → A). A key is required; another request with it
    is ABORTED."""
    org = await new_org()
    meter = await wallet_stub.OpenMeter(
        pb.OpenMeterRequest(
            meter_id=f"pod:{uuid.uuid4()}", organization_id=str(org), resource_id="pod-1",
            resource_type="pod", hourly_rate=3_600_000,
        )
    )  # fmt: skip
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wallet_stub.UpdateMeterRate(
            pb.UpdateMeterRateRequest(meter_id=meter.id, hourly_rate=7_200_000)
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ("x-error-field", "idempotency_key") in list(err.value.trailing_metadata() or ())
    scale_up = pb.UpdateMeterRateRequest(
        meter_id=meter.id, hourly_rate=7_200_000, idempotency_key="scale-up"
    )
    first = await wallet_stub.UpdateMeterRate(scale_up)
    assert first.hourly_rate == 7_200_000
    await wallet_stub.UpdateMeterRate(
        pb.UpdateMeterRateRequest(meter_id=meter.id, hourly_rate=1_800_000, idempotency_key="down")
    )
    late = await wallet_stub.UpdateMeterRate(scale_up)  # the first call's answer, replayed
    assert late == first
    meters = await wallet_stub.ListMeters(pb.ListMetersRequest(organization_id=str(org)))
    assert [m.hourly_rate for m in meters.meters] == [1_800_000]  # the newer change stands
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wallet_stub.UpdateMeterRate(
            pb.UpdateMeterRateRequest(
                meter_id=meter.id, hourly_rate=9_000_000, idempotency_key="scale-up"
            )
        )
    assert err.value.code() == grpc.StatusCode.ABORTED


@pytest.mark.parametrize("change", ["cut", "close"])
async def test_cutting_or_closing_a_meter_announces_no_depletion_that_never_was(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg, change: str
) -> None:
    """The settling charge was checked at the old run rate: cutting a $360/h meter to $36/h
    (or closing it) on $1.20 announced `depleted` (compute pauses on it), then `recovered`."""
    wallet = Wallet(wallet_pool)
    org = await new_org()
    async with wallet_pool.connection() as conn, conn.transaction():
        [topped] = await wallet.ledger.post_transfers(
            conn, [TransferRequest(uuid.uuid4().hex, org, Kind.TOPUP, 1_200_000)]
        )
        assert topped.error is None
    async with wallet_pool.connection() as conn, conn.transaction():  # one transaction: the
        now = await db_now(conn)  # outbox is read before the relay takes it
        await wallet.meters.open(
            conn, MeterRequest(f"pod:{uuid.uuid4()}", org, "pod-1", "pod", 360_000_000,
                               at=now - timedelta(seconds=5)),
        )  # fmt: skip
        [meter_id] = [
            row[0]
            for row in await (
                await conn.execute("SELECT id FROM meters WHERE organization_id = %s", (org,))
            ).fetchall()
        ]
        # $0.50 owed: $0.70 left, 7 s at $360/h (under the 10 s of depletion), 70 s at $36/h.
        if change == "cut":
            await wallet.meters.update_rate(conn, meter_id, 36_000_000, None, "cut")
        else:
            await wallet.meters.close(conn, meter_id)
        cur = await conn.execute(
            "SELECT data FROM outbox WHERE type LIKE 'wallet.balance.%%'"
            " AND type <> 'wallet.balance.changed'"
        )
        found = [parse_event(bytes(row[0])) for row in await cur.fetchall()]
        edges = [e.type for e in found if e.organization_id == str(org)]
        cur = await conn.execute(
            "SELECT balance, level FROM wallets WHERE organization_id = %s", (org,)
        )
        state = await cur.fetchone()
    assert state == (700_000, "ok")
    assert edges == []


async def test_settling_one_segment_twice_at_one_time_is_two_transfers(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    """Rate changes (and a close) all dated T, with billing ticks between them: each settles a
    segment that starts at T up to T, and they shared one internal key. The second one failed
    on the key's unique index, as INTERNAL, on every retry: the meter could not be closed."""
    from gpudeck.wallet.metering_store import bill_open_meters

    wallet = Wallet(wallet_pool)
    org = await new_org()
    async with wallet_pool.connection() as conn:
        now = await db_now(conn)
    at = now - timedelta(minutes=10)
    meter_id = f"pod:{uuid.uuid4()}"
    async with wallet_pool.connection() as conn, conn.transaction():
        request = MeterRequest(meter_id, org, "pod-1", "pod", 3_600_000, at=at)
        await wallet.meters.open(conn, request)
    for n, rate in enumerate((7_200_000, 10_800_000)):
        await bill_open_meters(wallet_pool, wallet.meters)
        async with wallet_pool.connection() as conn, conn.transaction():
            await wallet.meters.update_rate(conn, meter_id, rate, at, f"rate-{n}")
    await bill_open_meters(wallet_pool, wallet.meters)
    async with wallet_pool.connection() as conn, conn.transaction():
        closed = await wallet.meters.close(conn, meter_id, at)
        assert await audit.check(conn) == []
    assert closed.closed_at == at and closed.total_charged == 0  # it never ran past T


async def test_a_project_cannot_be_deleted_while_a_meter_opens_in_it(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    """The open holds the wallet row; the deletion locked only the organization's, so its "no
    open meters" check ran beside the open and both committed: a billed resource in a deleted
    project."""
    from gpudeck.kit.errors import FailedPrecondition
    from gpudeck.wallet.accounts_store import AccountStore

    wallet = Wallet(wallet_pool)
    accounts = AccountStore(wallet.ledger.outbox)
    org = await new_org()
    async with wallet_pool.connection() as conn, conn.transaction():
        await accounts.create_project(conn, org, "other")  # not the last one
        project = await accounts.create_project(conn, org, "busy")
    async with wallet_pool.connection() as opening:
        async with opening.transaction():
            meter_id = f"pod:{uuid.uuid4()}"
            request = MeterRequest(meter_id, org, "pod-1", "pod", 3_600_000, project.id)
            await wallet.meters.open(opening, request)

            async def delete() -> object:
                async with wallet_pool.connection() as conn, conn.transaction():
                    return await accounts.delete_project(conn, project.id)

            deleting = asyncio.create_task(delete())
            await asyncio.sleep(0.3)
            assert not deleting.done()  # it waits for the open
        with pytest.raises(FailedPrecondition) as refused:
            await deleting
    assert refused.value.reason == "PROJECT_IN_USE"


async def test_an_organizations_meters_add_up_to_no_more_than_one_meter_may(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    """Thirteen meters at the most one may charge made a run rate whose month (× 720 h) passed
    a bigint: every wallet card failed, blaming a display currency no one asked for."""
    from gpudeck.kit.errors import FailedPrecondition
    from gpudeck.wallet.money import MAX_AMOUNT
    from gpudeck.wallet.readmodels import RunRate

    wallet = Wallet(wallet_pool)
    org = await new_org()
    half = MAX_AMOUNT // 2
    async with wallet_pool.connection() as conn, conn.transaction():
        for n in range(2):
            await wallet.meters.open(conn, MeterRequest(f"big:{org}:{n}", org, "r", "pod", half))
    with pytest.raises(FailedPrecondition) as refused:
        async with wallet_pool.connection() as conn, conn.transaction():
            await wallet.meters.open(conn, MeterRequest(f"big:{org}:2", org, "r", "pod", 2))
    assert (refused.value.field, refused.value.reason) == ("hourly_rate", "RUN_RATE_LIMIT")
    with pytest.raises(FailedPrecondition):
        async with wallet_pool.connection() as conn, conn.transaction():
            await wallet.meters.update_rate(conn, f"big:{org}:1", half + 2, None, "raise")
    async with wallet_pool.connection() as conn:
        cur = await conn.execute(
            "SELECT w.run_rate, (SELECT count(*) FROM meters m WHERE m.organization_id = %s)"
            " FROM wallets w WHERE w.organization_id = %s",
            (org, org),
        )
        assert await cur.fetchone() == (2 * half, 2)  # nothing of the refused calls stayed
    assert RunRate(2 * half).per_month < 2**63  # the month at the most still an amount


async def test_a_retried_open_answers_after_its_project_was_deleted(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    """The project was checked before the meter was looked up: a retry of an open whose meter
    had been closed and its project deleted since was NOT_FOUND instead of its answer."""
    from gpudeck.wallet.accounts_store import AccountStore

    wallet = Wallet(wallet_pool)
    accounts = AccountStore(wallet.ledger.outbox)
    org = await new_org()
    async with wallet_pool.connection() as conn, conn.transaction():
        await accounts.create_project(conn, org, "stays")
        project = await accounts.create_project(conn, org, "goes")
        request = MeterRequest(f"pod:{uuid.uuid4()}", org, "pod-1", "pod", 3_600_000, project.id)
        first = await wallet.meters.open(conn, request)
    async with wallet_pool.connection() as conn, conn.transaction():
        closed = await wallet.meters.close(conn, first.id)
        await accounts.delete_project(conn, project.id)
    restarted = Wallet(wallet_pool)  # knows nothing of the project from before
    async with wallet_pool.connection() as conn, conn.transaction():
        again = await restarted.meters.open(conn, request)
    assert again == closed


async def test_a_meter_with_the_longest_id_can_change_rate_and_close(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    """Its settling key (id and times) passed the 300 characters a key may have: a rate change
    or close of a meter with a 200-character id was refused on every retry, and it billed on."""
    wallet = Wallet(wallet_pool)
    org = await new_org()
    meter_id = ("m" + uuid.uuid4().hex) * 7
    meter_id = meter_id[:200]
    async with wallet_pool.connection() as conn, conn.transaction():
        at = await db_now(conn) - timedelta(minutes=5)
        await wallet.meters.open(conn, MeterRequest(meter_id, org, "r", "pod", 3_600_000, at=at))
    async with wallet_pool.connection() as conn, conn.transaction():
        await wallet.meters.update_rate(conn, meter_id, 7_200_000, at + timedelta(minutes=1), "k")
    async with wallet_pool.connection() as conn, conn.transaction():
        closed = await wallet.meters.close(conn, meter_id, at + timedelta(minutes=2))
    assert closed.closed_at is not None and closed.total_charged == 60_000 + 120_000
