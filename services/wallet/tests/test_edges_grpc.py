"""Edges of the wallet's gRPC API: holds, meters, events and projects, against the running
service (real PostgreSQL, NATS and gRPC; no mocks)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import grpc
import nats
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from psycopg_pool import AsyncConnectionPool

from gpudeck.kit.config import EventsConfig
from gpudeck.kit.events import parse_event, unpack
from gpudeck.kit.logs import actor
from gpudeck.proto.common.v1.money_pb2 import Money
from gpudeck.proto.events.v1.envelope_pb2 import Event
from gpudeck.proto.wallet.v1 import account_pb2, events_pb2
from gpudeck.proto.wallet.v1 import wallet_pb2 as pb
from gpudeck.proto.wallet.v1.account_pb2_grpc import AccountServiceStub
from gpudeck.proto.wallet.v1.wallet_pb2_grpc import WalletServiceStub
from gpudeck.wallet.alerts import Thresholds
from gpudeck.wallet.group_commit import GroupCommit
from gpudeck.wallet.ledger import Kind, TransferRequest
from gpudeck.wallet.ledger_store import LedgerStore
from gpudeck.wallet.money import MAX_AMOUNT
from gpudeck.wallet.thresholds_store import ThresholdStore

NewOrg = Callable[..., Awaitable[uuid.UUID]]
USD = 1_000_000
INT64_MAX = 2**63 - 1
ACTOR = "user:edge-tester"
AS_ACTOR = (("x-actor", ACTOR),)


# ---------------------------------------------------------------------------- helpers


def transfer(
    org: uuid.UUID | str, kind: int, amount: int, key: str | None = None, **kw: object
) -> pb.TransferRequest:
    return pb.TransferRequest(
        idempotency_key=key or uuid.uuid4().hex,
        organization_id=str(org),
        kind=kind,  # type: ignore[arg-type]
        amount=Money(amount=amount, currency=str(kw.pop("currency", ""))),
        **kw,  # type: ignore[arg-type]
    )


def hold_request(
    org: uuid.UUID | str, amount: int, key: str | None = None, **kw: object
) -> pb.CreateHoldRequest:
    return pb.CreateHoldRequest(
        idempotency_key=key or uuid.uuid4().hex,
        organization_id=str(org),
        amount=amount,
        **kw,  # type: ignore[arg-type]
    )


def meter_request(org: uuid.UUID | str, **kw: object) -> pb.OpenMeterRequest:
    fields: dict[str, object] = {
        "meter_id": f"pod:{uuid.uuid4()}",
        "organization_id": str(org),
        "resource_id": f"res-{uuid.uuid4().hex[:8]}",
        "resource_type": "pod",
        "hourly_rate": 3_600_000,
    }
    fields.update(kw)
    return pb.OpenMeterRequest(**fields)  # type: ignore[arg-type]


def usage_request(org: uuid.UUID | str, **kw: object) -> pb.RecordUsageRequest:
    fields: dict[str, object] = {
        "event_id": uuid.uuid4().hex,
        "organization_id": str(org),
        "meter": "tokens",
        "quantity": 1000.0,
        "unit_price": 2 * USD,
        "success": True,
    }
    fields.update(kw)
    return pb.RecordUsageRequest(**fields)  # type: ignore[arg-type]


async def top_up(stub: WalletServiceStub, org: uuid.UUID, amount: int) -> pb.Transaction:
    return await stub.Transfer(transfer(org, pb.TOPUP, amount), timeout=5)


async def summary(stub: WalletServiceStub, org: uuid.UUID | str) -> pb.WalletSummary:
    return await stub.GetWalletSummary(
        pb.GetWalletSummaryRequest(organization_id=str(org)), timeout=5
    )


async def refused(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    """The error `call` fails with (the test fails if it succeeds)."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value


def trailer(err: grpc.aio.AioRpcError, key: str) -> str | None:
    for k, v in err.trailing_metadata() or ():
        if k == key:
            return str(v)
    return None


async def count(pool: AsyncConnectionPool, sql: str, *args: object) -> int:
    async with pool.connection() as conn:
        cur = await conn.execute(sql, args)
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def holds_of(pool: AsyncConnectionPool, org: uuid.UUID) -> int:
    return await count(pool, "SELECT count(*) FROM holds WHERE organization_id = %s", org)


async def transactions_of(stub: WalletServiceStub, org: uuid.UUID) -> list[pb.Transaction]:
    listed = await stub.ListTransactions(
        pb.ListTransactionsRequest(organization_id=str(org), limit=100), timeout=5
    )
    return list(listed.transactions)


async def new_project(account_stub: AccountServiceStub, org: uuid.UUID, name: str = "ml") -> str:
    made = await account_stub.CreateProject(
        account_pb2.CreateProjectRequest(organization_id=str(org), name=name), timeout=5
    )
    return str(made.id)


async def wait_hold_status(
    stub: WalletServiceStub, hold_id: str, status: str, *, seconds: float = 10
) -> pb.Hold:
    deadline = time.monotonic() + seconds
    while True:
        hold = await stub.GetHold(pb.GetHoldRequest(hold_id=hold_id), timeout=5)
        if hold.status == status or time.monotonic() > deadline:
            return hold
        await asyncio.sleep(0.1)


async def wallet_events(
    config: EventsConfig,
    org: uuid.UUID | str,
    done: Callable[[list[Event]], bool],
    *,
    seconds: float = 10,
) -> list[Event]:
    """The organization's wallet.* events on the stream, read until `done(events)` holds (or
    `seconds` pass), oldest first."""
    nc = await nats.connect(config.nats_url, connect_timeout=2)
    js = nc.jetstream()
    name = f"edges-{uuid.uuid4().hex[:8]}"
    sub = await js.pull_subscribe(
        f"{config.subject_prefix}.wallet.>",
        durable=name,
        stream=config.stream,
        config=ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL),
    )
    found: list[Event] = []
    try:
        deadline = time.monotonic() + seconds
        while not done(found) and time.monotonic() < deadline:
            try:
                msgs = await sub.fetch(500, timeout=0.3)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            found += [
                e for e in (parse_event(m.data) for m in msgs) if e.organization_id == str(org)
            ]
    finally:
        await js.delete_consumer(config.stream, name)
        await nc.close()
    return found


def has_types(*types: str) -> Callable[[list[Event]], bool]:
    return lambda found: set(types) <= {e.type for e in found}


def of_type(found: list[Event], event_type: str) -> list[Event]:
    return [e for e in found if e.type == event_type]


# ---------------------------------------------------------------------------- holds


async def test_a_hold_beyond_spendable_is_refused_and_writes_nothing(
    wallet_stub: WalletServiceStub, wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    org = await new_org()
    await top_up(wallet_stub, org, 5 * USD)
    await wallet_stub.CreateHold(hold_request(org, 2 * USD), timeout=5)  # spendable: 3
    err = await refused(wallet_stub.CreateHold(hold_request(org, 3 * USD + 1), timeout=5))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "insufficient funds" in (err.details() or "")
    assert trailer(err, "x-error-reason") == "INSUFFICIENT_FUNDS"
    s = await summary(wallet_stub, org)
    assert (s.balance.amount, s.held_balance.amount, s.spendable.amount) == (
        5 * USD,
        2 * USD,
        3 * USD,
    )
    assert await holds_of(wallet_pool, org) == 1
    # Exactly what is spendable may be held.
    exact = await wallet_stub.CreateHold(hold_request(org, 3 * USD), timeout=5)
    assert exact.status == "open"
    assert (await summary(wallet_stub, org)).spendable.amount == 0


async def test_create_hold_is_idempotent_by_key(
    wallet_stub: WalletServiceStub, wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    org = await new_org()
    await top_up(wallet_stub, org, 10 * USD)
    request = hold_request(org, 4 * USD, key="hold-key-1", timeout_seconds=120)
    first = await wallet_stub.CreateHold(request, timeout=5)
    second = await wallet_stub.CreateHold(request, timeout=5)
    assert second.id == first.id
    assert second == first
    assert await holds_of(wallet_pool, org) == 1
    assert (await summary(wallet_stub, org)).held_balance.amount == 4 * USD

    other = hold_request(org, 5 * USD, key="hold-key-1", timeout_seconds=120)
    err = await refused(wallet_stub.CreateHold(other, timeout=5))
    assert err.code() == grpc.StatusCode.ABORTED  # Conflict, as for transfers
    assert "hold-key-1" in (err.details() or "")
    assert "idempotency_key" in (err.details() or "")
    assert trailer(err, "x-error-reason") == "IDEMPOTENCY_KEY_REUSED"
    assert await holds_of(wallet_pool, org) == 1
    assert (await summary(wallet_stub, org)).held_balance.amount == 4 * USD


async def test_a_key_is_one_request_whatever_the_call(
    wallet_stub: WalletServiceStub, wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    """A key a transfer used is refused to a hold, a capture or a plan change, and the other
    way round, on every path a transfer takes; retries still get their first answers."""
    org = await new_org()
    await top_up(wallet_stub, org, 100 * USD)
    paid = await wallet_stub.Transfer(transfer(org, pb.CHARGE, USD, key="t-key"), timeout=5)
    hold = await wallet_stub.CreateHold(hold_request(org, 5 * USD, key="h-key"), timeout=5)

    def reused(err: grpc.aio.AioRpcError) -> bool:
        return trailer(err, "x-error-reason") == "IDEMPOTENCY_KEY_REUSED"

    assert reused(await refused(wallet_stub.CreateHold(hold_request(org, USD, key="t-key"))))
    capture = pb.CaptureHoldRequest(idempotency_key="t-key", hold_id=hold.id)
    assert reused(await refused(wallet_stub.CaptureHold(capture)))
    change = pb.ChangePlanRequest(idempotency_key="t-key", organization_id=str(org))
    change.plan_code = "premium"
    assert reused(await refused(wallet_stub.ChangePlan(change)))
    # The hold's key, to a transfer: alone (the one-statement path), among others at once (the
    # grouped path), in a batch, and as a refund (the general path).
    assert reused(await refused(wallet_stub.Transfer(transfer(org, pb.CHARGE, USD, key="h-key"))))
    at_once = await asyncio.gather(
        *(wallet_stub.Transfer(transfer(org, pb.CHARGE, USD), timeout=5) for _ in range(6)),
        wallet_stub.Transfer(transfer(org, pb.CHARGE, USD, key="h-key"), timeout=5),
        return_exceptions=True,
    )
    assert all(isinstance(r, pb.Transaction) for r in at_once[:-1])
    last = at_once[-1]
    assert isinstance(last, grpc.aio.AioRpcError) and reused(last)
    batch = pb.TransferBatchRequest(
        transfers=[transfer(org, pb.CHARGE, USD, key="h-key"), transfer(org, pb.CHARGE, USD)]
    )
    answers = (await wallet_stub.TransferBatch(batch, timeout=5)).results
    assert [r.error_code for r in answers] == ["ABORTED", ""]
    assert "different request" in answers[0].error_message
    refund = transfer(org, pb.REFUND, USD, key="h-key")
    assert reused(await refused(wallet_stub.Transfer(refund)))
    # Retries with their own payloads are answered as the first time.
    again = await wallet_stub.Transfer(transfer(org, pb.CHARGE, USD, key="t-key"), timeout=5)
    assert again.id == paid.id
    assert (await wallet_stub.CreateHold(hold_request(org, 5 * USD, key="h-key"))).id == hold.id
    wallet = await summary(wallet_stub, org)
    assert (wallet.balance.amount, wallet.held_balance.amount) == (92 * USD, 5 * USD)
    assert await holds_of(wallet_pool, org) == 1


@pytest.mark.parametrize("batch", [False, True], ids=["single", "batch"])
async def test_a_retry_may_name_the_wallet_currency_or_leave_it_out(
    wallet_stub: WalletServiceStub, new_org: NewOrg, batch: bool
) -> None:
    """Naming the wallet's own currency or leaving it out is one request, as a retry sees."""
    org = await new_org()

    async def send(currency: str) -> pb.Transaction:
        request = transfer(org, pb.TOPUP, 7 * USD, key="pay-7", currency=currency)
        if not batch:
            return await wallet_stub.Transfer(request, timeout=5)
        answer = await wallet_stub.TransferBatch(
            pb.TransferBatchRequest(transfers=[request]), timeout=5
        )
        return answer.results[0].transaction

    first = await send("")
    assert await send("USD") == first
    assert await send("usd") == first
    assert (await summary(wallet_stub, org)).balance.amount == 7 * USD
    # Another payment currency is another request.
    if batch:
        other = transfer(org, pb.TOPUP, 7 * USD, key="pay-7", currency="INR")
        answer = await wallet_stub.TransferBatch(
            pb.TransferBatchRequest(transfers=[other]), timeout=5
        )
        assert answer.results[0].error_code == "ABORTED"
        assert "different request" in answer.results[0].error_message
    else:
        err = await refused(send("INR"))
        assert trailer(err, "x-error-reason") == "IDEMPOTENCY_KEY_REUSED"
    assert (await summary(wallet_stub, org)).balance.amount == 7 * USD


@pytest.mark.parametrize(
    "amount",
    [0, -1, -5 * USD, MAX_AMOUNT + 1, INT64_MAX],
    ids=["zero", "minus-one", "negative", "above-max", "int64-max"],
)
async def test_bad_hold_amounts_are_invalid_arguments_naming_the_field(
    wallet_stub: WalletServiceStub, wallet_pool: AsyncConnectionPool, new_org: NewOrg, amount: int
) -> None:
    org = await new_org()
    await top_up(wallet_stub, org, 10 * USD)
    err = await refused(wallet_stub.CreateHold(hold_request(org, amount), timeout=5))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "amount" in (err.details() or "")
    assert trailer(err, "x-error-field") == "amount"
    assert await holds_of(wallet_pool, org) == 0
    assert (await summary(wallet_stub, org)).held_balance.amount == 0


async def test_unknown_holds_are_not_found(wallet_stub: WalletServiceStub) -> None:
    missing = str(uuid.uuid4())
    for call in (
        wallet_stub.CaptureHold(pb.CaptureHoldRequest(idempotency_key="c", hold_id=missing)),
        wallet_stub.VoidHold(pb.VoidHoldRequest(idempotency_key="v", hold_id=missing)),
        wallet_stub.GetHold(pb.GetHoldRequest(hold_id=missing)),
    ):
        err = await refused(call)
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert missing in (err.details() or "")
        assert trailer(err, "x-error-field") == "hold_id"


async def test_a_malformed_hold_id_is_an_invalid_argument(wallet_stub: WalletServiceStub) -> None:
    err = await refused(
        wallet_stub.CaptureHold(pb.CaptureHoldRequest(idempotency_key="c", hold_id="nope"))
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "hold_id" in (err.details() or "")


async def test_captures_above_the_hold_twice_or_after_a_void_are_refused(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    org = await new_org()
    await top_up(wallet_stub, org, 10 * USD)
    hold = await wallet_stub.CreateHold(hold_request(org, 3 * USD), timeout=5)

    for key, amount in (("over", 3 * USD + 1), ("nothing", 0)):  # 0 was "captured" as nothing
        err = await refused(
            wallet_stub.CaptureHold(
                pb.CaptureHoldRequest(idempotency_key=key, hold_id=hold.id, amount=amount)
            )
        )
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert trailer(err, "x-error-field") == "amount"
    still = await wallet_stub.GetHold(pb.GetHoldRequest(hold_id=hold.id))
    assert still.status == "open"
    assert (await summary(wallet_stub, org)).held_balance.amount == 3 * USD

    captured = await wallet_stub.CaptureHold(
        pb.CaptureHoldRequest(idempotency_key="first", hold_id=hold.id, amount=2 * USD)
    )
    assert (captured.hold.status, captured.hold.captured.amount) == ("captured", 2 * USD)
    assert captured.transaction.balance_after.amount == 8 * USD

    err = await refused(
        wallet_stub.CaptureHold(pb.CaptureHoldRequest(idempotency_key="second", hold_id=hold.id))
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "captured" in (err.details() or "")

    err = await refused(
        wallet_stub.VoidHold(pb.VoidHoldRequest(idempotency_key="void", hold_id=hold.id))
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "captured" in (err.details() or "")

    s = await summary(wallet_stub, org)
    assert (s.balance.amount, s.held_balance.amount) == (8 * USD, 0)
    assert len(await transactions_of(wallet_stub, org)) == 2  # the top-up and one capture


async def test_a_capture_after_a_void_is_refused(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    org = await new_org()
    await top_up(wallet_stub, org, 10 * USD)
    hold = await wallet_stub.CreateHold(hold_request(org, 3 * USD), timeout=5)
    await wallet_stub.VoidHold(pb.VoidHoldRequest(idempotency_key="v", hold_id=hold.id))
    err = await refused(
        wallet_stub.CaptureHold(pb.CaptureHoldRequest(idempotency_key="c", hold_id=hold.id))
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "voided" in (err.details() or "")
    assert (await summary(wallet_stub, org)).balance.amount == 10 * USD


async def test_void_releases_the_held_amount_and_leaves_the_balance(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    org = await new_org()
    await top_up(wallet_stub, org, 10 * USD)
    hold = await wallet_stub.CreateHold(hold_request(org, 4 * USD), timeout=5)
    s = await summary(wallet_stub, org)
    assert (s.balance.amount, s.held_balance.amount, s.spendable.amount) == (
        10 * USD,
        4 * USD,
        6 * USD,
    )
    voided = await wallet_stub.VoidHold(pb.VoidHoldRequest(idempotency_key="v", hold_id=hold.id))
    assert voided.status == "voided"
    assert voided.captured.amount == 0
    assert voided.HasField("resolved_at")
    again = await wallet_stub.VoidHold(pb.VoidHoldRequest(idempotency_key="v", hold_id=hold.id))
    assert again == voided
    s = await summary(wallet_stub, org)
    assert (s.balance.amount, s.held_balance.amount, s.spendable.amount) == (
        10 * USD,
        0,
        10 * USD,
    )
    assert [t.kind for t in await transactions_of(wallet_stub, org)] == [pb.TOPUP]


async def test_a_hold_past_its_timeout_expires_and_is_announced(
    wallet_stub: WalletServiceStub, new_org: NewOrg, events_config: EventsConfig
) -> None:
    org = await new_org()
    await top_up(wallet_stub, org, 10 * USD)
    hold = await wallet_stub.CreateHold(hold_request(org, 4 * USD, timeout_seconds=1), timeout=5)
    assert (await summary(wallet_stub, org)).held_balance.amount == 4 * USD
    # The running wallet's housekeeping loop (every second) expires it.
    expired = await wait_hold_status(wallet_stub, hold.id, "expired")
    assert expired.status == "expired"
    assert expired.captured.amount == 0
    assert expired.resolved_at.ToDatetime() >= expired.expires_at.ToDatetime()
    s = await summary(wallet_stub, org)
    assert (s.balance.amount, s.held_balance.amount, s.spendable.amount) == (
        10 * USD,
        0,
        10 * USD,
    )
    assert [t.kind for t in await transactions_of(wallet_stub, org)] == [pb.TOPUP]

    found = await wallet_events(events_config, org, has_types("wallet.hold.expired"))
    [event] = of_type(found, "wallet.hold.expired")
    payload = unpack(event, events_pb2.HoldChanged)
    assert (payload.hold_id, payload.status) == (hold.id, "expired")
    assert payload.amount == Money(amount=4 * USD, currency="USD")
    assert payload.captured.amount == 0
    assert event.actor == "system"
    assert event.source == "wallet"


async def _wait_past_expiry(pool: AsyncConnectionPool, hold: pb.Hold) -> None:
    """Sleep until the database's clock is past the hold's expiry."""
    left = (hold.expires_at.ToDatetime(tzinfo=UTC) - datetime.now(UTC)).total_seconds()
    await asyncio.sleep(max(left, 0))
    while not await count(
        pool, "SELECT (clock_timestamp() > expires_at)::int FROM holds WHERE id = %s", hold.id
    ):
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("resolve", ["capture", "void"])
async def test_a_hold_past_its_timeout_cannot_be_resolved_before_the_sweep(
    wallet_stub: WalletServiceStub, wallet_pool: AsyncConnectionPool, new_org: NewOrg, resolve: str
) -> None:
    """Past its expiry a hold is expired even if the sweep has not marked it yet: a capture (or
    void) in between is FAILED_PRECONDITION and charges nothing."""
    org = await new_org()
    await top_up(wallet_stub, org, 10 * USD)
    for _ in range(5):  # the sweep runs every second; retry if it got there first
        hold = await wallet_stub.CreateHold(
            hold_request(org, 2 * USD, timeout_seconds=1), timeout=5
        )
        await _wait_past_expiry(wallet_pool, hold)
        call = (
            wallet_stub.CaptureHold(
                pb.CaptureHoldRequest(idempotency_key=f"c-{hold.id}", hold_id=hold.id), timeout=5
            )
            if resolve == "capture"
            else wallet_stub.VoidHold(
                pb.VoidHoldRequest(idempotency_key=f"v-{hold.id}", hold_id=hold.id), timeout=5
            )
        )
        err = await refused(call)
        if trailer(err, "x-error-reason") == "HOLD_RESOLVED":
            continue  # the sweep expired it before our call: not the case under test
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
        assert "expired" in (err.details() or "")
        break
    else:
        pytest.fail("the expiry sweep won every race; the pre-sweep path was never exercised")
    assert [t.kind for t in await transactions_of(wallet_stub, org)] == [pb.TOPUP]
    final = await wait_hold_status(wallet_stub, hold.id, "expired")
    assert (final.status, final.captured.amount) == ("expired", 0)
    s = await summary(wallet_stub, org)
    assert (s.balance.amount, s.held_balance.amount) == (10 * USD, 0)


# ---------------------------------------------------------------------------- meters


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"resource_type": "gpu"}, "resource_type"),
        ({"resource_type": ""}, "resource_type"),
        ({"hourly_rate": -1}, "hourly_rate"),
        ({"hourly_rate": MAX_AMOUNT + 1}, "hourly_rate"),
    ],
    ids=["unknown-type", "empty-type", "negative-rate", "rate-too-large"],
)
async def test_open_meter_with_bad_input_is_an_invalid_argument(
    wallet_stub: WalletServiceStub, new_org: NewOrg, fields: dict[str, object], field: str
) -> None:
    org = await new_org()
    err = await refused(wallet_stub.OpenMeter(meter_request(org, **fields), timeout=5))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (err.details() or "")
    assert trailer(err, "x-error-field") == field
    listed = await wallet_stub.ListMeters(pb.ListMetersRequest(organization_id=str(org)))
    assert list(listed.meters) == []
    assert (await summary(wallet_stub, org)).run_rate.per_hour.amount == 0


async def test_a_negative_rate_update_is_an_invalid_argument(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    org = await new_org()
    await top_up(wallet_stub, org, 100 * USD)
    meter = await wallet_stub.OpenMeter(meter_request(org, hourly_rate=720_000), timeout=5)
    err = await refused(
        wallet_stub.UpdateMeterRate(
            pb.UpdateMeterRateRequest(meter_id=meter.id, hourly_rate=-1, idempotency_key="r1")
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "hourly_rate" in (err.details() or "")
    closed = await wallet_stub.CloseMeter(pb.CloseMeterRequest(meter_id=meter.id))
    assert closed.hourly_rate == 720_000


async def test_unknown_meters_are_not_found(wallet_stub: WalletServiceStub) -> None:
    missing = f"pod:{uuid.uuid4()}"
    for call in (
        wallet_stub.UpdateMeterRate(
            pb.UpdateMeterRateRequest(meter_id=missing, hourly_rate=1, idempotency_key="r1")
        ),
        wallet_stub.CloseMeter(pb.CloseMeterRequest(meter_id=missing)),
    ):
        err = await refused(call)
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert missing in (err.details() or "")
        assert trailer(err, "x-error-field") == "meter_id"


async def test_a_rate_update_on_a_closed_meter_is_refused(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    org = await new_org()
    await top_up(wallet_stub, org, 100 * USD)
    meter = await wallet_stub.OpenMeter(meter_request(org, hourly_rate=360_000), timeout=5)
    closed = await wallet_stub.CloseMeter(pb.CloseMeterRequest(meter_id=meter.id))
    err = await refused(
        wallet_stub.UpdateMeterRate(
            pb.UpdateMeterRateRequest(meter_id=meter.id, hourly_rate=720_000, idempotency_key="r1")
        )
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "closed" in (err.details() or "")
    [listed] = (await wallet_stub.ListMeters(pb.ListMetersRequest(organization_id=str(org)))).meters
    assert listed.hourly_rate == 360_000
    assert listed.closed_at == closed.closed_at
    assert (await summary(wallet_stub, org)).run_rate.per_hour.amount == 0


async def test_unknown_organizations_are_not_found_for_meters_and_usage(
    wallet_stub: WalletServiceStub,
) -> None:
    org = uuid.uuid4()
    for call in (
        wallet_stub.OpenMeter(meter_request(org), timeout=5),
        wallet_stub.RecordUsage(usage_request(org), timeout=5),
    ):
        err = await refused(call)
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert str(org) in (err.details() or "")
        assert trailer(err, "x-error-field") == "organization_id"


async def test_an_object_storage_meter_shows_in_the_run_rate_by_type(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    org = await new_org()
    await top_up(wallet_stub, org, 100 * USD)
    meter = await wallet_stub.OpenMeter(
        meter_request(
            org, meter_id=f"s3:{uuid.uuid4()}", resource_type="object_storage", hourly_rate=72_000
        ),
        timeout=5,
    )
    assert meter.resource_type == "object_storage"
    assert not meter.HasField("closed_at")
    s = await summary(wallet_stub, org)
    assert s.run_rate.per_hour.amount == 72_000
    assert {t.resource_type: t.per_hour.amount for t in s.run_rate.by_resource_type} == {
        "pod": 0,
        "vm": 0,
        "nfs_volume": 0,
        "object_storage": 72_000,
    }
    await wallet_stub.CloseMeter(pb.CloseMeterRequest(meter_id=meter.id))
    s = await summary(wallet_stub, org)
    assert {t.resource_type: t.per_hour.amount for t in s.run_rate.by_resource_type}[
        "object_storage"
    ] == 0


# ---------------------------------------------------------------------------- events


async def test_ledger_events_carry_actor_organization_and_project(
    wallet_stub: WalletServiceStub,
    account_stub: AccountServiceStub,
    new_org: NewOrg,
    events_config: EventsConfig,
) -> None:
    org = await new_org()
    project = await new_project(account_stub, org)
    top = await wallet_stub.Transfer(
        transfer(org, pb.TOPUP, 20 * USD, project_id=project), metadata=AS_ACTOR, timeout=5
    )
    charge = await wallet_stub.Transfer(
        transfer(
            org, pb.CHARGE, 3 * USD, project_id=project, resource_type="pod", resource_id="p-1"
        ),
        metadata=AS_ACTOR,
        timeout=5,
    )
    assert (top.actor, charge.actor) == (ACTOR, ACTOR)
    assert (top.project_id, charge.project_id) == (project, project)

    found = await wallet_events(
        events_config, org, has_types("wallet.topup.completed", "wallet.charge.posted")
    )
    [topped] = of_type(found, "wallet.topup.completed")
    [charged] = of_type(found, "wallet.charge.posted")
    for event, tx in ((topped, top), (charged, charge)):
        assert (event.actor, event.organization_id, event.project_id) == (ACTOR, str(org), project)
        assert event.source == "wallet"
        payload = unpack(event, events_pb2.TransactionPosted)
        assert payload.transaction_id == tx.id
        assert payload.amount == tx.amount
    assert unpack(topped, events_pb2.TransactionPosted).kind == "topup"
    posted = unpack(charged, events_pb2.TransactionPosted)
    assert (posted.kind, posted.resource_type, posted.resource_id) == ("charge", "pod", "p-1")
    assert posted.amount == Money(amount=3 * USD, currency="USD")


async def test_hold_events_carry_actor_organization_and_project(
    wallet_stub: WalletServiceStub,
    account_stub: AccountServiceStub,
    new_org: NewOrg,
    events_config: EventsConfig,
) -> None:
    org = await new_org()
    project = await new_project(account_stub, org)
    await top_up(wallet_stub, org, 20 * USD)
    kept = await wallet_stub.CreateHold(
        hold_request(org, 5 * USD, project_id=project, resource_type="vm", resource_id="vm-1"),
        metadata=AS_ACTOR,
        timeout=5,
    )
    dropped = await wallet_stub.CreateHold(
        hold_request(org, 2 * USD, project_id=project), metadata=AS_ACTOR, timeout=5
    )
    captured = await wallet_stub.CaptureHold(
        pb.CaptureHoldRequest(idempotency_key="c", hold_id=kept.id, amount=4 * USD),
        metadata=AS_ACTOR,
        timeout=5,
    )
    await wallet_stub.VoidHold(
        pb.VoidHoldRequest(idempotency_key="v", hold_id=dropped.id), metadata=AS_ACTOR, timeout=5
    )
    assert captured.transaction.project_id == project
    assert captured.transaction.actor == ACTOR

    found = await wallet_events(
        events_config,
        org,
        lambda seen: (
            len(of_type(seen, "wallet.hold.created")) >= 2
            and has_types("wallet.hold.captured", "wallet.hold.voided", "wallet.charge.posted")(
                seen
            )
        ),
    )
    holds = [e for e in found if e.type.startswith("wallet.hold.")]
    assert sorted(e.type for e in holds) == [
        "wallet.hold.captured",
        "wallet.hold.created",
        "wallet.hold.created",
        "wallet.hold.voided",
    ]
    for event in holds:
        assert (event.actor, event.organization_id, event.project_id) == (ACTOR, str(org), project)
        assert event.source == "wallet"
    payloads = {(e.type, p.hold_id): p for e in holds for p in [unpack(e, events_pb2.HoldChanged)]}
    created = payloads["wallet.hold.created", kept.id]
    assert (created.status, created.amount.amount, created.captured.amount) == (
        "open",
        5 * USD,
        0,
    )
    assert payloads["wallet.hold.created", dropped.id].amount.amount == 2 * USD
    done = payloads["wallet.hold.captured", kept.id]
    assert (done.status, done.amount.amount, done.captured.amount) == (
        "captured",
        5 * USD,
        4 * USD,
    )
    assert done.captured.currency == "USD"
    voided = payloads["wallet.hold.voided", dropped.id]
    assert (voided.status, voided.captured.amount) == ("voided", 0)
    # The capture's charge is announced like any other, for the same actor and project.
    [charge] = of_type(found, "wallet.charge.posted")
    assert (charge.actor, charge.project_id) == (ACTOR, project)
    posted = unpack(charge, events_pb2.TransactionPosted)
    assert posted.transaction_id == captured.transaction.id
    assert (posted.amount.amount, posted.resource_type, posted.resource_id) == (
        4 * USD,
        "vm",
        "vm-1",
    )


# ---------------------------------------------------------------------------- projects


@pytest.fixture
async def foreign_project(account_stub: AccountServiceStub, new_org: NewOrg) -> str:
    """A project of another organization."""
    return await new_project(account_stub, await new_org(name="Other"), name="theirs")


def _calls(org: uuid.UUID, project: str) -> dict[str, Callable[[WalletServiceStub], Any]]:
    return {
        "transfer": lambda s: s.Transfer(
            transfer(org, pb.TOPUP, 5 * USD, project_id=project), timeout=5
        ),
        "charge": lambda s: s.Transfer(
            transfer(org, pb.CHARGE, USD, project_id=project, resource_type="pod"), timeout=5
        ),
        "hold": lambda s: s.CreateHold(hold_request(org, USD, project_id=project), timeout=5),
        "meter": lambda s: s.OpenMeter(meter_request(org, project_id=project), timeout=5),
        "usage": lambda s: s.RecordUsage(usage_request(org, project_id=project), timeout=5),
    }


@pytest.mark.parametrize("owner", ["nobody", "another-organization"])
@pytest.mark.parametrize("call", ["transfer", "charge", "hold", "meter", "usage"])
async def test_an_unknown_project_is_not_found(
    wallet_stub: WalletServiceStub,
    wallet_pool: AsyncConnectionPool,
    new_org: NewOrg,
    foreign_project: str,
    owner: str,
    call: str,
) -> None:
    org = await new_org()
    await top_up(wallet_stub, org, 10 * USD)
    project = str(uuid.uuid4()) if owner == "nobody" else foreign_project
    err = await refused(_calls(org, project)[call](wallet_stub))
    assert err.code() == grpc.StatusCode.NOT_FOUND, err.details()
    assert project in (err.details() or "")
    assert trailer(err, "x-error-field") == "project_id"
    # Nothing was written.
    s = await summary(wallet_stub, org)
    assert (s.balance.amount, s.held_balance.amount, s.run_rate.per_hour.amount) == (
        10 * USD,
        0,
        0,
    )
    assert [t.kind for t in await transactions_of(wallet_stub, org)] == [pb.TOPUP]
    assert await holds_of(wallet_pool, org) == 0
    assert (
        await count(wallet_pool, "SELECT count(*) FROM meters WHERE organization_id = %s", org) == 0
    )
    assert (
        await count(
            wallet_pool, "SELECT count(*) FROM usage_events WHERE organization_id = %s", org
        )
        == 0
    )


async def test_an_unknown_project_fails_its_batch_item_only(
    wallet_stub: WalletServiceStub, new_org: NewOrg, foreign_project: str
) -> None:
    org = await new_org()
    results = (
        await wallet_stub.TransferBatch(
            pb.TransferBatchRequest(
                transfers=[
                    transfer(org, pb.TOPUP, 5 * USD),
                    transfer(org, pb.TOPUP, 5 * USD, project_id=str(uuid.uuid4())),
                    transfer(org, pb.TOPUP, 5 * USD, project_id=foreign_project),
                ]
            ),
            timeout=5,
        )
    ).results
    assert [r.error_code for r in results] == ["", "NOT_FOUND", "NOT_FOUND"]
    assert foreign_project in results[2].error_message
    assert (await summary(wallet_stub, org)).balance.amount == 5 * USD


async def test_a_project_of_the_same_organization_is_accepted_everywhere(
    wallet_stub: WalletServiceStub, account_stub: AccountServiceStub, new_org: NewOrg
) -> None:
    org = await new_org()
    project = await new_project(account_stub, org)
    await top_up(wallet_stub, org, 10 * USD)
    calls = _calls(org, project)
    tx = await calls["charge"](wallet_stub)
    assert tx.project_id == project
    hold = await calls["hold"](wallet_stub)
    assert hold.status == "open"
    meter = await calls["meter"](wallet_stub)
    assert meter.project_id == project
    usage = await calls["usage"](wallet_stub)
    assert usage.project_id == project
    await wallet_stub.CloseMeter(pb.CloseMeterRequest(meter_id=meter.id))


@pytest.mark.parametrize("key", ["meter:m1:x:y", "usage:now:org", "plan:premium:2026-01:fee"])
async def test_the_wallets_own_keys_are_refused_to_callers(
    wallet_stub: WalletServiceStub, new_org: NewOrg, key: str
) -> None:
    org = await new_org()
    request = transfer(org, pb.TOPUP, USD)
    request.idempotency_key = key
    err = await refused(wallet_stub.Transfer(request, timeout=5))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "idempotency_key" in (err.details() or "")
    batch = await wallet_stub.TransferBatch(
        pb.TransferBatchRequest(transfers=[request, transfer(org, pb.TOPUP, USD)]), timeout=5
    )
    assert [r.error_code for r in batch.results] == ["INVALID_ARGUMENT", ""]
    assert len(await transactions_of(wallet_stub, org)) == 1


# ---------------------------------------------------------------------------- text, keys, kinds


NUL = "a\x00b"


async def test_control_characters_are_invalid_arguments_naming_the_field(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    org = await new_org()
    await top_up(wallet_stub, org, 10 * USD)
    calls = {
        "description": wallet_stub.Transfer(transfer(org, pb.TOPUP, USD, description=NUL)),
        "idempotency_key": wallet_stub.Transfer(transfer(org, pb.TOPUP, USD, key=NUL)),
        "reference": wallet_stub.Transfer(transfer(org, pb.TOPUP, USD, reference=NUL)),
        "resource_id": wallet_stub.OpenMeter(meter_request(org, resource_id=NUL)),
        "meter_id": wallet_stub.OpenMeter(meter_request(org, meter_id=NUL)),
        "meter": wallet_stub.RecordUsage(usage_request(org, meter=NUL)),
        "dimensions.model": wallet_stub.RecordUsage(usage_request(org, dimensions={"model": NUL})),
    }
    calls["description "] = wallet_stub.CreateHold(hold_request(org, USD, description=NUL))
    for field, call in calls.items():
        err = await refused(call)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, err.details())
        assert trailer(err, "x-error-field") == field.strip(), (field, err.details())
    s = await summary(wallet_stub, org)
    assert (s.balance.amount, s.held_balance.amount) == (10 * USD, 0)


async def test_a_bad_batch_item_fails_alone(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    org = await new_org()
    batch = await wallet_stub.TransferBatch(
        pb.TransferBatchRequest(
            transfers=[
                transfer(org, pb.TOPUP, USD),
                transfer(org, pb.TOPUP, USD, description=NUL),
                transfer(org, pb.TOPUP, USD, description="x" * 1001),
                transfer(org, pb.CHARGE, USD, resource_type="Bogus Type!"),
            ]
        ),
        timeout=5,
    )
    assert [r.error_code for r in batch.results] == [
        "",
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
    ]
    assert "longer than 1000" in batch.results[2].error_message
    assert "resource_type" in batch.results[3].error_message
    assert (await summary(wallet_stub, org)).balance.amount == USD


@pytest.mark.parametrize("key", ["meter:x", "hold:y", "plan:z"])
async def test_the_wallets_own_keys_are_refused_for_holds_and_plans(
    wallet_stub: WalletServiceStub, new_org: NewOrg, key: str
) -> None:
    org = await new_org()
    await top_up(wallet_stub, org, 10 * USD)
    hold = await wallet_stub.CreateHold(hold_request(org, USD), timeout=5)
    calls = [
        wallet_stub.CreateHold(hold_request(org, USD, key=key)),
        wallet_stub.CaptureHold(pb.CaptureHoldRequest(hold_id=hold.id, idempotency_key=key)),
        wallet_stub.VoidHold(pb.VoidHoldRequest(hold_id=hold.id, idempotency_key=key)),
        wallet_stub.ChangePlan(
            pb.ChangePlanRequest(organization_id=str(org), plan_code="premium", idempotency_key=key)
        ),
    ]
    for call in calls:
        err = await refused(call)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert trailer(err, "x-error-field") == "idempotency_key"
    assert (await summary(wallet_stub, org)).held_balance.amount == USD


async def test_a_credit_grant_that_has_already_expired_is_refused(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    org = await new_org()
    request = transfer(org, pb.CREDIT_GRANT, 5 * USD, credit_source="promotion")
    request.credit_expires_at.FromDatetime(datetime(2020, 1, 1, tzinfo=UTC))
    err = await refused(wallet_stub.Transfer(request, timeout=5))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert trailer(err, "x-error-field") == "credit_expires_at"
    assert (await summary(wallet_stub, org)).balance.amount == 0


async def test_list_transactions_refuses_what_it_cannot_answer(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    org = await new_org()
    await top_up(wallet_stub, org, USD)
    foreign = await top_up(wallet_stub, await new_org(), USD)  # another organization's
    for request, code, field in (
        (pb.ListTransactionsRequest(organization_id=str(uuid.uuid4())), "NOT_FOUND", None),
        (pb.ListTransactionsRequest(organization_id=str(org), limit=-5), "INVALID_ARGUMENT", "limit"),
        (pb.ListTransactionsRequest(organization_id=str(org), kinds=[99]), "INVALID_ARGUMENT",
         "kinds"),
        (pb.ListTransactionsRequest(organization_id=str(org), before_id=str(uuid.uuid4())),
         "INVALID_ARGUMENT", "before_id"),
        (pb.ListTransactionsRequest(organization_id=str(org), before_id=foreign.id),
         "INVALID_ARGUMENT", "before_id"),
    ):  # fmt: skip
        err = await refused(wallet_stub.ListTransactions(request, timeout=5))
        assert err.code().name == code, err.details()
        if field:
            assert trailer(err, "x-error-field") == field
    # The kinds the wallet posts itself can be asked for too.
    listed = await wallet_stub.ListTransactions(
        pb.ListTransactionsRequest(organization_id=str(org), kinds=[pb.CREDIT_EXPIRY]), timeout=5
    )
    assert list(listed.transactions) == []


async def test_a_usage_event_id_sent_again_with_other_values_is_refused(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    org = await new_org()
    await top_up(wallet_stub, org, 10 * USD)
    first = usage_request(org)
    recorded = await wallet_stub.RecordUsage(first, timeout=5)
    assert (await wallet_stub.RecordUsage(first, timeout=5)).event_id == recorded.event_id
    changed = pb.RecordUsageRequest()
    changed.CopyFrom(first)
    changed.quantity = 5000.0
    err = await refused(wallet_stub.RecordUsage(changed, timeout=5))
    assert err.code() == grpc.StatusCode.ABORTED
    assert trailer(err, "x-error-reason") == "IDEMPOTENCY_KEY_REUSED"
    assert (await summary(wallet_stub, org)).balance.amount == 10 * USD - recorded.cost.amount


async def test_money_calls_refuse_a_project_deleted_a_moment_ago(
    wallet_stub: WalletServiceStub, account_stub: AccountServiceStub, new_org: NewOrg
) -> None:
    org = await new_org()
    await new_project(account_stub, org, "kept")  # the last project cannot go
    project = await new_project(account_stub, org, "short-lived")
    await top_up(wallet_stub, org, 10 * USD)
    await _calls(org, project)["charge"](wallet_stub)  # seen live: trusted for a few seconds
    await account_stub.DeleteProject(account_pb2.DeleteProjectRequest(project_id=project))
    for name, call in _calls(org, project).items():
        err = await refused(call(wallet_stub))
        assert err.code() == grpc.StatusCode.NOT_FOUND, (name, err.details())
        assert trailer(err, "x-error-field") == "project_id"


async def test_a_meter_waiting_for_a_project_deletion_is_refused_once_it_is_deleted(
    wallet_stub: WalletServiceStub, account_stub: AccountServiceStub, new_org: NewOrg,
    wallet_pool: AsyncConnectionPool,
) -> None:  # fmt: skip
    """The open waits for the wallet lock the deletion holds; it then checked the project on
    the answer this process had cached a moment before ("live"), and opened a billed meter in
    a deleted project. Both calls succeeded."""
    org = await new_org()
    await new_project(account_stub, org, "kept")
    project = await new_project(account_stub, org, "going")
    await top_up(wallet_stub, org, 10 * USD)
    warm = await wallet_stub.OpenMeter(meter_request(org, project_id=project), timeout=5)
    await wallet_stub.CloseMeter(pb.CloseMeterRequest(meter_id=warm.id), timeout=5)  # cached live
    async with wallet_pool.connection() as holder, holder.transaction():  # both queue behind it
        await holder.execute("SELECT 1 FROM wallets WHERE organization_id = %s FOR UPDATE", (org,))
        deletion = asyncio.ensure_future(
            account_stub.DeleteProject(account_pb2.DeleteProjectRequest(project_id=project))
        )
        await asyncio.sleep(0.5)  # the deletion waits first, then the open
        opening = asyncio.ensure_future(
            wallet_stub.OpenMeter(meter_request(org, project_id=project), timeout=10)
        )
        await asyncio.sleep(0.5)
        assert not deletion.done() and not opening.done()
    await deletion
    err = await refused(opening)
    assert (err.code(), trailer(err, "x-error-field")) == (grpc.StatusCode.NOT_FOUND, "project_id")


async def test_deleting_a_project_says_why_it_cannot(
    wallet_stub: WalletServiceStub, account_stub: AccountServiceStub, new_org: NewOrg
) -> None:
    org = await new_org()
    await new_project(account_stub, org, "kept")
    project = await new_project(account_stub, org, "busy")
    meter = await wallet_stub.OpenMeter(meter_request(org, project_id=project), timeout=5)
    err = await refused(
        account_stub.DeleteProject(account_pb2.DeleteProjectRequest(project_id=project))
    )
    assert (err.code(), trailer(err, "x-error-reason")) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "PROJECT_IN_USE",
    )
    await wallet_stub.CloseMeter(pb.CloseMeterRequest(meter_id=meter.id))
    await account_stub.DeleteProject(account_pb2.DeleteProjectRequest(project_id=project))
    listed = await account_stub.ListProjects(
        account_pb2.ListProjectsRequest(organization_id=str(org))
    )
    [last] = [p for p in listed.projects]
    err = await refused(
        account_stub.DeleteProject(account_pb2.DeleteProjectRequest(project_id=last.id))
    )
    assert trailer(err, "x-error-reason") == "LAST_PROJECT"


async def test_an_auto_top_up_an_unverified_organization_could_never_post_is_refused(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    org = await new_org(kyc="unverified")
    rule = pb.SetAutoTopUpRequest(
        organization_id=str(org), enabled=True, below=10 * USD, amount=600 * USD
    )
    err = await refused(wallet_stub.SetAutoTopUp(rule, timeout=5))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (trailer(err, "x-error-reason"), trailer(err, "x-error-field")) == (
        "KYC_REQUIRED",
        "amount",
    )
    rule.amount = 400 * USD  # within the limit: fine
    assert (await wallet_stub.SetAutoTopUp(rule, timeout=5)).amount == 400 * USD


async def test_an_organization_waiting_for_a_top_up_payment_is_not_deleted(
    wallet_stub: WalletServiceStub, account_stub: AccountServiceStub, new_org: NewOrg
) -> None:
    org = await new_org(name="Waiting Co")
    rule = await wallet_stub.SetAutoTopUp(
        pb.SetAutoTopUpRequest(organization_id=str(org), enabled=True, below=USD, amount=5 * USD),
        timeout=5,
    )
    assert rule.pending.status == "pending"
    delete = account_pb2.DeleteOrganizationRequest(
        organization_id=str(org), confirm_name="Waiting Co"
    )
    err = await refused(account_stub.DeleteOrganization(delete))
    assert trailer(err, "x-error-reason") == "ORGANIZATION_IN_USE"
    assert "top-up" in (err.details() or "")
    await wallet_stub.CompleteTopUp(
        pb.CompleteTopUpRequest(pending_top_up_id=rule.pending.id, succeeded=False), timeout=5
    )
    await wallet_stub.SetAutoTopUp(
        pb.SetAutoTopUpRequest(organization_id=str(org), enabled=False, below=USD, amount=5 * USD)
    )
    await account_stub.DeleteOrganization(delete)


async def test_a_top_up_paid_after_its_organization_was_deleted_is_to_be_refunded(
    wallet_stub: WalletServiceStub, account_stub: AccountServiceStub, new_org: NewOrg,
    wallet_pool: AsyncConnectionPool,
) -> None:  # fmt: skip
    """A timed-out top-up may still be paid (and is credited), but its organization could be
    deleted meanwhile: the payment was NOT_FOUND, as if never asked for, and went nowhere."""
    org = await new_org(name="Late Co")
    rule = await wallet_stub.SetAutoTopUp(
        pb.SetAutoTopUpRequest(organization_id=str(org), enabled=True, below=USD, amount=5 * USD),
        timeout=5,
    )
    await wallet_stub.SetAutoTopUp(
        pb.SetAutoTopUpRequest(organization_id=str(org), enabled=False, below=USD, amount=5 * USD)
    )
    async with wallet_pool.connection() as conn:  # timed out (as the housekeeping does it)
        await conn.execute(
            "UPDATE pending_topups SET status = 'expired', resolved_at = now() WHERE id = %s",
            (uuid.UUID(rule.pending.id),),
        )
    await account_stub.DeleteOrganization(
        account_pb2.DeleteOrganizationRequest(organization_id=str(org), confirm_name="Late Co")
    )
    paid = pb.CompleteTopUpRequest(pending_top_up_id=rule.pending.id, succeeded=True)
    err = await refused(wallet_stub.CompleteTopUp(paid, timeout=5))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert trailer(err, "x-error-reason") == "ORGANIZATION_DELETED"
    assert "refund" in (err.details() or "")
    declined = await wallet_stub.CompleteTopUp(
        pb.CompleteTopUpRequest(pending_top_up_id=rule.pending.id, succeeded=False), timeout=5
    )
    assert declined.status == "expired"  # nothing to do


async def test_a_batch_lists_in_the_order_it_was_booked(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    org = await new_org()
    await top_up(wallet_stub, org, 100 * USD)
    await wallet_stub.TransferBatch(
        pb.TransferBatchRequest(transfers=[transfer(org, pb.CHARGE, USD + i) for i in range(30)]),
        timeout=5,
    )
    listed = await transactions_of(wallet_stub, org)  # newest first
    charges = [t for t in listed if t.kind == pb.CHARGE]
    afters = [t.balance_after.amount for t in charges]
    assert len(afters) == 30 and afters == sorted(afters)  # each one lower than the one before


async def test_a_threshold_crossing_names_who_crossed_it(
    wallet_stub: WalletServiceStub, new_org: NewOrg, events_config: EventsConfig
) -> None:
    org = await new_org()
    await top_up(wallet_stub, org, 10 * USD)
    await wallet_stub.SetThresholds(
        pb.SetThresholdsRequest(organization_id=str(org), warning_amount=5 * USD), timeout=5
    )
    await wallet_stub.Transfer(transfer(org, pb.CHARGE, 6 * USD), metadata=AS_ACTOR, timeout=5)
    found = await wallet_events(events_config, org, has_types("wallet.balance.warning"))
    [event] = of_type(found, "wallet.balance.warning")
    assert event.actor == ACTOR  # the charge's caller, not "system"
    changed = await wallet_events(events_config, org, has_types("wallet.balance.changed"))
    assert {e.actor for e in of_type(changed, "wallet.balance.changed")} == {"system"}


async def test_a_threshold_crossed_in_a_group_names_its_own_caller(
    wallet_pool: AsyncConnectionPool,
    new_org: NewOrg,
    events_config: EventsConfig,
    wallet_service: object,  # its relay publishes what this test writes
) -> None:
    """Group commit posts many callers' transfers in one writer task, which the first caller
    started: its actor used to name the threshold crossings of everyone in the group."""
    ledger = LedgerStore()
    a, b = await new_org(), await new_org()
    async with wallet_pool.connection() as conn, conn.transaction():
        await ledger.post_transfers(conn, [TransferRequest("seed", b, Kind.TOPUP, 10 * USD)])
        await ThresholdStore(ledger).set_thresholds(conn, b, Thresholds(warning_amount=5 * USD))
    groups = GroupCommit(wallet_pool, ledger, writers=1)

    async def as_caller(who: str, request: TransferRequest) -> None:
        actor.set(who)
        await groups.post(dataclasses.replace(request, actor=who))

    first = asyncio.create_task(  # starts the one writer, in user:a's context
        as_caller("user:a", TransferRequest("a1", a, Kind.TOPUP, USD))
    )
    await asyncio.sleep(0)
    await asyncio.gather(
        first,
        as_caller("user:b", TransferRequest("b1", b, Kind.CHARGE, 6 * USD)),
        *(as_caller("user:a", TransferRequest(f"a{i}", a, Kind.TOPUP, USD)) for i in range(2, 6)),
    )
    found = await wallet_events(events_config, b, has_types("wallet.balance.warning"))
    [event] = of_type(found, "wallet.balance.warning")
    assert event.actor == "user:b"


async def test_a_batch_whose_answer_a_client_cannot_take_posts_nothing(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    """An answer past gRPC's default 4 MiB fails at the client after the server committed: the
    caller would never learn what was posted (a retry replays the same answer). The batch is
    refused before its commit instead, naming `transfers`."""
    org = await new_org()
    long = pb.TransferBatchRequest(
        transfers=[transfer(org, pb.TOPUP, 1_000, description="d" * 1000) for _ in range(3600)]
    )
    assert long.ByteSize() < 4 * 1024 * 1024  # the request itself is taken
    err = await refused(wallet_stub.TransferBatch(long, timeout=60))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "transfers" in (err.details() or "") and "this call posted nothing" in (
        err.details() or ""
    )
    assert (await summary(wallet_stub, org)).balance.amount == 0
    assert await transactions_of(wallet_stub, org) == []
    del long.transfers[1800:]  # half of it fits
    answer = await wallet_stub.TransferBatch(long, timeout=60)
    assert [r.error_code for r in answer.results] == [""] * 1800
    assert (await summary(wallet_stub, org)).balance.amount == 1800 * 1_000
