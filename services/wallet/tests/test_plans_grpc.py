"""Plans and credits over gRPC against real PostgreSQL; the events of plans and invoices
through NATS."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from nats.js.api import AckPolicy, ConsumerConfig
from psycopg_pool import AsyncConnectionPool

from gpudeck.kit.config import EventsConfig
from gpudeck.kit.events import EventBus, parse_event, unpack
from gpudeck.proto.common.v1.money_pb2 import Money
from gpudeck.proto.events.v1.envelope_pb2 import Event
from gpudeck.proto.wallet.v1 import events_pb2
from gpudeck.proto.wallet.v1 import wallet_pb2 as pb
from gpudeck.proto.wallet.v1.wallet_pb2_grpc import WalletServiceStub
from gpudeck.wallet.ledger import Kind, TransferRequest
from gpudeck.wallet.ledger_store import LedgerStore
from gpudeck.wallet.plans_store import PURCHASE_SOURCE, PlanStore

NewOrg = Callable[..., Awaitable[uuid.UUID]]
USD = 1_000_000
INR = 1_000_000
TIMEOUT = 10


async def top_up(stub: WalletServiceStub, org: uuid.UUID, amount: int) -> pb.Transaction:
    return await post(stub, org, pb.TOPUP, amount)


async def post(
    stub: WalletServiceStub, org: uuid.UUID, kind: pb.TransferKind, amount: int, **kw: str
) -> pb.Transaction:
    return await stub.Transfer(
        pb.TransferRequest(
            idempotency_key=uuid.uuid4().hex,
            organization_id=str(org),
            kind=kind,
            amount=Money(amount=amount),
            **kw,
        ),
        timeout=TIMEOUT,
    )


async def change(
    stub: WalletServiceStub, org: uuid.UUID, plan: str, key: str | None = None
) -> pb.PlanStatus:
    return await stub.ChangePlan(
        pb.ChangePlanRequest(
            idempotency_key=key or uuid.uuid4().hex, organization_id=str(org), plan_code=plan
        ),
        timeout=TIMEOUT,
    )


Summary = Callable[[uuid.UUID], Awaitable[tuple[int, int]]]


@pytest.fixture
def summary(wallet_pool: AsyncConnectionPool) -> Summary:
    """The wallet's balance and credits, from its row."""

    async def read(org: uuid.UUID) -> tuple[int, int]:
        async with wallet_pool.connection() as conn:
            cur = await conn.execute(
                "SELECT balance, credits FROM wallets WHERE organization_id = %s", (org,)
            )
            row = await cur.fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    return read


async def transactions(stub: WalletServiceStub, org: uuid.UUID) -> list[pb.Transaction]:
    listed = await stub.ListTransactions(
        pb.ListTransactionsRequest(organization_id=str(org)), timeout=TIMEOUT
    )
    return list(listed.transactions)


def error_field(err: grpc.aio.AioRpcError) -> str:
    return dict(err.trailing_metadata() or ()).get("x-error-field", "")  # type: ignore[no-any-return]


def error_reason(err: grpc.aio.AioRpcError) -> str:
    return dict(err.trailing_metadata() or ()).get("x-error-reason", "")  # type: ignore[no-any-return]


async def test_the_catalog_in_each_currency(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    usd = await wallet_stub.ListPlans(pb.ListPlansRequest(currency="usd"), timeout=TIMEOUT)
    assert [(p.code, p.name) for p in usd.plans] == [
        ("standard", "Standard"),
        ("premium", "Premium"),
        ("enterprise", "Enterprise"),
    ]
    premium = usd.plans[1]
    assert (premium.monthly_fee.amount, premium.monthly_fee.currency) == (49 * USD, "USD")
    assert premium.included_credits.amount == 60 * USD
    org = await new_org(currency="INR")
    inr = await wallet_stub.ListPlans(
        pb.ListPlansRequest(organization_id=str(org)), timeout=TIMEOUT
    )
    assert {p.monthly_fee.currency for p in inr.plans} == {"INR"}
    assert inr.plans[1].monthly_fee.amount == 4000 * INR


@pytest.mark.parametrize(
    ("request_", "field"),
    [(pb.ListPlansRequest(), "currency"), (pb.ListPlansRequest(currency="EUR"), "currency")],
)
async def test_the_catalog_needs_a_known_currency(
    wallet_stub: WalletServiceStub, request_: pb.ListPlansRequest, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wallet_stub.ListPlans(request_, timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_field(err.value) == field


async def test_a_new_organization_is_on_standard_without_credits(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    org = await new_org()
    status = await wallet_stub.GetPlan(pb.GetPlanRequest(organization_id=str(org)), timeout=TIMEOUT)
    assert status.plan.code == "standard"
    assert (status.available_credits.amount, status.available_credits.currency) == (0, "USD")


async def test_an_upgrade_charges_the_fee_and_grants_the_credits(
    wallet_stub: WalletServiceStub, new_org: NewOrg, summary: Summary
) -> None:
    org = await new_org()
    await top_up(wallet_stub, org, 100 * USD)
    status = await change(wallet_stub, org, "premium")
    assert (status.plan.code, status.previous_plan_code) == ("premium", "standard")
    assert (status.charged.amount, status.credits_granted.amount) == (49 * USD, 60 * USD)
    assert status.available_credits.amount == 60 * USD
    assert await summary(org) == (111 * USD, 60 * USD)
    by_kind = {t.kind: t for t in await transactions(wallet_stub, org)}
    fee, grant = by_kind[pb.CHARGE], by_kind[pb.CREDIT_GRANT]
    assert (fee.kind, fee.resource_type, fee.amount.amount) == (pb.CHARGE, "plan", 49 * USD)
    assert (grant.kind, grant.amount.amount) == (pb.CREDIT_GRANT, 60 * USD)
    got = await wallet_stub.GetPlan(pb.GetPlanRequest(organization_id=str(org)), timeout=TIMEOUT)
    assert (got.plan.code, got.available_credits.amount) == ("premium", 60 * USD)


async def test_a_plan_renews_today_while_this_month_is_not_paid_yet(
    wallet_stub: WalletServiceStub, wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    """After midnight on the 1st the hourly loop has still to renew the plan: it renews today
    (it said the 1st of next month); once paid, the 1st of next month."""
    org = await new_org()
    async with wallet_pool.connection() as conn:  # on Premium, paid in an earlier month
        await conn.execute("UPDATE organizations SET plan_code = 'premium' WHERE id = %s", (org,))
    today = datetime.now(UTC).date()
    got = await wallet_stub.GetPlan(pb.GetPlanRequest(organization_id=str(org)), timeout=TIMEOUT)
    assert got.renews_on == today.isoformat()
    await top_up(wallet_stub, org, 1000 * USD)
    await change(wallet_stub, org, "enterprise")  # paid this month now
    got = await wallet_stub.GetPlan(pb.GetPlanRequest(organization_id=str(org)), timeout=TIMEOUT)
    next_month = (today.replace(day=1) + timedelta(days=32)).replace(day=1)
    assert got.renews_on == next_month.isoformat()


async def test_a_retry_with_the_same_key_returns_the_first_answer(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    org = await new_org()
    await top_up(wallet_stub, org, 100 * USD)
    first = await change(wallet_stub, org, "premium", key="plan-1")
    again = await change(wallet_stub, org, "premium", key="plan-1")
    assert again == first
    assert len(await transactions(wallet_stub, org)) == 3
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await change(wallet_stub, org, "enterprise", key="plan-1")
    assert err.value.code() == grpc.StatusCode.ABORTED
    assert error_field(err.value) == "idempotency_key"


async def test_a_plan_is_paid_once_a_month_even_with_new_keys(
    wallet_stub: WalletServiceStub, new_org: NewOrg, summary: Summary
) -> None:
    org = await new_org()
    await top_up(wallet_stub, org, 100 * USD)
    await change(wallet_stub, org, "premium")
    same = await change(wallet_stub, org, "premium")
    assert (same.charged.amount, same.credits_granted.amount) == (0, 0)
    down = await change(wallet_stub, org, "standard")
    assert (down.plan.code, down.charged.amount, down.credits_granted.amount) == ("standard", 0, 0)
    back = await change(wallet_stub, org, "premium")
    assert (back.plan.code, back.charged.amount, back.credits_granted.amount) == ("premium", 0, 0)
    assert await summary(org) == (111 * USD, 60 * USD)
    kinds = [t.kind for t in await transactions(wallet_stub, org)]
    assert sorted(kinds) == sorted([pb.TOPUP, pb.CHARGE, pb.CREDIT_GRANT])


async def test_concurrent_changes_with_new_keys_pay_once(
    wallet_stub: WalletServiceStub, new_org: NewOrg, summary: Summary
) -> None:
    org = await new_org()
    await top_up(wallet_stub, org, 1000 * USD)
    results = await asyncio.gather(*(change(wallet_stub, org, "enterprise") for _ in range(8)))
    assert sum(r.charged.amount for r in results) == 499 * USD
    assert sum(r.credits_granted.amount for r in results) == 650 * USD
    assert await summary(org) == ((1000 - 499 + 650) * USD, 650 * USD)


async def test_an_upgrade_the_wallet_cannot_pay_is_refused_and_changes_nothing(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    org = await new_org()
    await top_up(wallet_stub, org, 10 * USD)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await change(wallet_stub, org, "premium", key="too-poor")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(err.value) == "INSUFFICIENT_FUNDS"
    status = await wallet_stub.GetPlan(pb.GetPlanRequest(organization_id=str(org)), timeout=TIMEOUT)
    assert (status.plan.code, status.available_credits.amount) == ("standard", 0)
    assert [t.kind for t in await transactions(wallet_stub, org)] == [pb.TOPUP]
    # Nothing was remembered for the key: once the wallet can pay, the same call succeeds.
    await top_up(wallet_stub, org, 40 * USD)
    paid = await change(wallet_stub, org, "premium", key="too-poor")
    assert paid.charged.amount == 49 * USD


async def test_a_downgrade_keeps_the_credits_until_they_expire(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    org = await new_org()
    await top_up(wallet_stub, org, 600 * USD)
    await change(wallet_stub, org, "enterprise")
    down = await change(wallet_stub, org, "premium")
    assert (down.plan.code, down.previous_plan_code) == ("premium", "enterprise")
    assert (down.charged.amount, down.available_credits.amount) == (0, 650 * USD)


@pytest.mark.parametrize(
    ("org", "plan", "key", "code", "field"),
    [
        (str(uuid.uuid4()), "premium", "k", grpc.StatusCode.NOT_FOUND, "organization_id"),
        ("not-an-id", "premium", "k", grpc.StatusCode.INVALID_ARGUMENT, "organization_id"),
        ("", "premium", "k", grpc.StatusCode.INVALID_ARGUMENT, "organization_id"),
        (None, "gold", "k", grpc.StatusCode.INVALID_ARGUMENT, "plan_code"),
        (None, "", "k", grpc.StatusCode.INVALID_ARGUMENT, "plan_code"),
        (None, "premium", "", grpc.StatusCode.INVALID_ARGUMENT, "idempotency_key"),
    ],
)
async def test_bad_plan_changes_name_the_field(
    wallet_stub: WalletServiceStub,
    new_org: NewOrg,
    org: str | None,
    plan: str,
    key: str,
    code: grpc.StatusCode,
    field: str,
) -> None:
    org_id = org if org is not None else str(await new_org())
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wallet_stub.ChangePlan(
            pb.ChangePlanRequest(idempotency_key=key, organization_id=org_id, plan_code=plan),
            timeout=TIMEOUT,
        )
    assert err.value.code() == code
    assert error_field(err.value) == field


async def test_get_plan_of_an_unknown_organization_is_not_found(
    wallet_stub: WalletServiceStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wallet_stub.GetPlan(
            pb.GetPlanRequest(organization_id=str(uuid.uuid4())), timeout=TIMEOUT
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


# ---------------------------------------------------------------------- add credits


def add_credits(
    org: uuid.UUID, amount: int, key: str | None = None, **kw: object
) -> pb.AddCreditsRequest:
    currency = str(kw.pop("currency", ""))
    return pb.AddCreditsRequest(
        idempotency_key=key or uuid.uuid4().hex,
        organization_id=str(org),
        amount=Money(amount=amount, currency=currency),
        **kw,  # type: ignore[arg-type]
    )


async def test_added_credits_are_available_and_spent_before_cash(
    wallet_stub: WalletServiceStub, new_org: NewOrg, summary: Summary
) -> None:
    org = await new_org()
    await top_up(wallet_stub, org, 5 * USD)
    added = await wallet_stub.AddCredits(
        add_credits(org, 20 * USD, key="buy-1", reference="pay_123"), timeout=TIMEOUT
    )
    assert added.available_credits.amount == 20 * USD
    assert (added.transaction.kind, added.transaction.amount.amount) == (pb.CREDIT_GRANT, 20 * USD)
    assert added.transaction.balance_after.amount == 25 * USD
    again = await wallet_stub.AddCredits(
        add_credits(org, 20 * USD, key="buy-1", reference="pay_123"), timeout=TIMEOUT
    )
    assert again.transaction == added.transaction
    await post(wallet_stub, org, pb.CHARGE, 8 * USD, resource_type="pod")
    assert await summary(org) == (17 * USD, 12 * USD)


async def test_a_credit_purchase_retried_later_answers_as_the_first_call(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    org = await new_org()
    first = await wallet_stub.AddCredits(add_credits(org, 6 * USD, key="buy"), timeout=TIMEOUT)
    await post(wallet_stub, org, pb.CHARGE, 2 * USD)
    # The wallet currency named or left out: the same purchase, so the same first answer.
    retry = await wallet_stub.AddCredits(
        add_credits(org, 6 * USD, key="buy", currency="USD"), timeout=TIMEOUT
    )
    assert retry == first
    assert first.available_credits.amount == 6 * USD
    status = await wallet_stub.GetPlan(pb.GetPlanRequest(organization_id=str(org)), timeout=TIMEOUT)
    assert status.available_credits.amount == 4 * USD
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wallet_stub.AddCredits(add_credits(org, 7 * USD, key="buy"), timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.ABORTED
    assert "different request" in str(err.value.details())


async def test_added_credits_may_expire(wallet_stub: WalletServiceStub, new_org: NewOrg) -> None:
    org = await new_org()
    soon = Timestamp()
    soon.FromDatetime(datetime.now(UTC) + timedelta(days=30))
    added = await wallet_stub.AddCredits(
        add_credits(org, 3 * USD, expires_at=soon), timeout=TIMEOUT
    )
    assert added.available_credits.amount == 3 * USD


async def test_credits_past_their_expiry_are_not_in_a_purchase_s_answer(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    """Before the sweep moves them out, expired credits count no more in AddCredits' (stored)
    answer, as in GetPlan; they did, and every retry repeated it."""
    org = await new_org()
    store = PlanStore(LedgerStore())
    soon = datetime.now(UTC) + timedelta(days=1)
    buy = TransferRequest("old", org, Kind.CREDIT_GRANT, 50 * USD, credit_expires_at=soon,
                          credit_source=PURCHASE_SOURCE)  # fmt: skip
    async with wallet_pool.connection() as conn, conn.transaction():
        await store.add_credits(conn, buy)
        # Past its expiry now, and not swept (the sweep sees no uncommitted change).
        await conn.execute(
            "UPDATE ledger_accounts SET expires_at = now() - interval '1 second'"
            " WHERE organization_id = %s AND kind = 'credit'",
            (org,),
        )
        more = TransferRequest("new", org, Kind.CREDIT_GRANT, USD, credit_source=PURCHASE_SOURCE)
        _, available = await store.add_credits(conn, more)
    assert available == USD


@pytest.mark.parametrize(
    ("amount", "extra", "code", "field"),
    [
        (0, {}, grpc.StatusCode.INVALID_ARGUMENT, "amount"),
        (-5, {}, grpc.StatusCode.INVALID_ARGUMENT, "amount"),
        (10**18, {}, grpc.StatusCode.INVALID_ARGUMENT, "amount"),
        (USD, {"currency": "INR"}, grpc.StatusCode.INVALID_ARGUMENT, "currency"),
        (USD, {"key": ""}, grpc.StatusCode.INVALID_ARGUMENT, "idempotency_key"),
    ],
)
async def test_bad_credit_purchases_name_the_field(
    wallet_stub: WalletServiceStub,
    new_org: NewOrg,
    amount: int,
    extra: dict[str, object],
    code: grpc.StatusCode,
    field: str,
) -> None:
    org = await new_org()
    request = add_credits(org, amount, **extra)
    if extra.get("key") == "":
        request.idempotency_key = ""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wallet_stub.AddCredits(request, timeout=TIMEOUT)
    assert err.value.code() == code
    assert error_field(err.value) == field


async def test_credits_that_expired_already_are_refused(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    org = await new_org()
    past = Timestamp()
    past.FromDatetime(datetime.now(UTC) - timedelta(minutes=1))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wallet_stub.AddCredits(add_credits(org, USD, expires_at=past), timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_field(err.value) == "expires_at"


async def test_a_purchase_retried_after_its_credits_expired_is_answered_not_refused(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    """The expiry was checked before the key: the retry of a purchase that went through, sent
    after its credits expired, was refused, and the client could not tell it had been taken."""
    org = await new_org()
    soon = Timestamp()
    soon.FromDatetime(datetime.now(UTC) + timedelta(seconds=1))
    first = await wallet_stub.AddCredits(
        add_credits(org, USD, key="brief", expires_at=soon), timeout=TIMEOUT
    )
    await asyncio.sleep(1.2)
    again = await wallet_stub.AddCredits(
        add_credits(org, USD, key="brief", expires_at=soon), timeout=TIMEOUT
    )
    assert again.transaction == first.transaction
    with pytest.raises(grpc.aio.AioRpcError) as err:  # a new purchase with it is refused
        await wallet_stub.AddCredits(add_credits(org, USD, expires_at=soon), timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_field(err.value) == "expires_at"


@pytest.mark.parametrize("seconds", [10**12, -(10**12)])
async def test_an_expiry_no_date_holds_is_refused_naming_it(
    wallet_stub: WalletServiceStub, new_org: NewOrg, seconds: int
) -> None:
    org = await new_org()
    request = add_credits(org, USD, expires_at=Timestamp(seconds=seconds))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wallet_stub.AddCredits(request, timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_field(err.value) == "expires_at"


async def test_large_purchases_need_kyc(
    wallet_stub: WalletServiceStub, new_org: NewOrg, wallet_pool: AsyncConnectionPool
) -> None:
    org = await new_org()
    async with wallet_pool.connection() as conn:
        await conn.execute("UPDATE organizations SET kyc_status = 'pending' WHERE id = %s", (org,))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wallet_stub.AddCredits(add_credits(org, 600 * USD), timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(err.value) == "KYC_REQUIRED"
    small = await wallet_stub.AddCredits(add_credits(org, 100 * USD), timeout=TIMEOUT)
    assert small.available_credits.amount == 100 * USD


async def test_credits_for_an_unknown_organization_are_not_found(
    wallet_stub: WalletServiceStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wallet_stub.AddCredits(add_credits(uuid.uuid4(), USD), timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


# ---------------------------------------------------------------------- events


async def published(
    events_config: EventsConfig, event_type: str, organization_id: uuid.UUID, count: int
) -> list[Event]:
    """Events of `event_type` for the organization in the stream, once `count` are there (5 s
    at most) and no more arrive for a moment."""
    bus = EventBus(events_config, client_name=f"test-{uuid.uuid4().hex[:8]}")
    await bus.start()
    name = f"check-{uuid.uuid4().hex[:12]}"
    sub = await bus.js.pull_subscribe(
        bus.subject_for(event_type),
        durable=name,
        stream=events_config.stream,
        config=ConsumerConfig(ack_policy=AckPolicy.NONE),
    )
    found: list[Event] = []

    async def fetch(wait: float) -> None:
        with contextlib.suppress(TimeoutError):
            for msg in await sub.fetch(100, timeout=wait):
                event = parse_event(msg.data)
                if event.organization_id == str(organization_id):
                    found.append(event)

    try:
        deadline = time.monotonic() + 5
        while len(found) < count and time.monotonic() < deadline:
            await fetch(0.3)
        await fetch(0.3)  # and no more arrive
    finally:
        await sub.unsubscribe()
        await bus.js.delete_consumer(events_config.stream, name)
        await bus.close()
    return found


async def test_a_plan_change_is_announced_once(
    wallet_stub: WalletServiceStub, new_org: NewOrg, events_config: EventsConfig
) -> None:
    org = await new_org()
    await top_up(wallet_stub, org, 100 * USD)
    await change(wallet_stub, org, "premium", key="announced")
    await change(wallet_stub, org, "premium", key="announced")
    await change(wallet_stub, org, "premium")
    [event] = await published(events_config, "wallet.plan.changed", org, 1)
    payload = unpack(event, events_pb2.PlanChanged)
    assert (payload.plan_code, payload.previous_plan_code) == ("premium", "standard")
    assert (payload.charged.amount, payload.credits_granted.amount) == (49 * USD, 60 * USD)
    assert payload.period == datetime.now(UTC).strftime("%Y-%m")


async def test_an_invoice_is_announced_when_issued_and_when_paid(
    wallet_stub: WalletServiceStub,
    new_org: NewOrg,
    events_config: EventsConfig,
    wallet_pool: AsyncConnectionPool,
) -> None:
    org = await new_org()
    async with wallet_pool.connection() as conn:
        await conn.execute(
            "INSERT INTO daily_spend (organization_id, day, resource_type, amount)"
            " VALUES (%s, '2024-08-09', 'pod', %s)",
            (org, 5 * USD),
        )
    request = pb.GenerateInvoicesRequest(period="2024-08", organization_id=str(org))
    [invoice] = (await wallet_stub.GenerateInvoices(request, timeout=TIMEOUT)).invoices
    await wallet_stub.GenerateInvoices(request, timeout=TIMEOUT)
    await wallet_stub.MarkInvoicePaid(
        pb.MarkInvoicePaidRequest(invoice_id=invoice.id), timeout=TIMEOUT
    )
    [issued] = await published(events_config, "wallet.invoice.issued", org, 1)
    [paid] = await published(events_config, "wallet.invoice.paid", org, 1)
    for event, status in ((issued, "open"), (paid, "paid")):
        payload = unpack(event, events_pb2.InvoiceChanged)
        assert (payload.invoice_id, payload.period, payload.status) == (
            invoice.id,
            "2024-08",
            status,
        )
        assert payload.total.amount == 5 * USD
