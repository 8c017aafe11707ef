"""Refunds give back where the latest spending came from: credits come back as credits (with their
expiry), cash as cash, so no refund (a caller's, or a meter's correction) turns credits into cash."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from psycopg_pool import AsyncConnectionPool

from gpudeck.proto.common.v1.money_pb2 import Money
from gpudeck.proto.wallet.v1 import wallet_pb2 as pb
from gpudeck.proto.wallet.v1.wallet_pb2_grpc import WalletServiceStub
from gpudeck.wallet import audit
from gpudeck.wallet.ledger import Account, Book, Kind, TransferRequest, Wallet
from gpudeck.wallet.ledger_store import LedgerStore
from gpudeck.wallet.refunds import unspend

NewOrg = Callable[..., Awaitable[uuid.UUID]]
CASH, PROMO, PLAN = 1, 2, 3


def test_a_refund_undoes_the_latest_spending_first() -> None:
    # Oldest to newest: a charge of 30 from the promotion; usage of 40: promotion 20, cash 20.
    history = [(PROMO, -30), (PROMO, -20), (CASH, -20)]
    assert unspend(30, reversed(history)) == ([(CASH, 20), (PROMO, 10)], 0)
    assert unspend(5, reversed(history)) == ([(CASH, 5)], 0)
    # More than was ever spent: the rest is left for cash.
    assert unspend(100, reversed(history)) == ([(CASH, 20), (PROMO, 50)], 30)


def test_a_refund_skips_what_earlier_refunds_gave_back() -> None:
    # Spent 10 from the plan grant, then 10 from cash; a refund of 5 gave cash back already.
    history = [(PLAN, -10), (CASH, -10), (CASH, 5)]
    assert unspend(8, reversed(history)) == ([(CASH, 5), (PLAN, 3)], 0)
    # Two refunds that together undo everything leave nothing more to undo.
    assert unspend(1, reversed([*history, (CASH, 5), (PLAN, 10)])) == ([], 1)


def _book(credits: list[Account], spending: list[tuple[int, int]] | None) -> tuple[Book, Wallet]:
    org = uuid.uuid4()
    balance = 100 + sum(c.balance for c in credits)
    wallet = Wallet(org, "USD", Account(CASH, 100), credits, balance, balance - 100, 0)
    book = Book(wallets={org: wallet}, platform={"revenue:USD": Account(9, 0, "platform")})
    if spending is not None:
        book.spending[org] = spending
    return book, wallet


def _refund(org: uuid.UUID, amount: int) -> TransferRequest:
    return TransferRequest(
        key=uuid.uuid4().hex, organization_id=org, kind=Kind.REFUND, amount=amount
    )


def test_the_book_gives_a_spent_grant_its_money_back_and_may_spend_it_again() -> None:
    expires = datetime(2030, 1, 1, tzinfo=UTC)
    spent_grant = Account(PLAN, 0, "credit", expires, "plan")
    book, wallet = _book([], [(PLAN, -60), (CASH, -20)])
    book.spent_credits[PLAN] = spent_grant
    planned = book.apply(_refund(wallet.organization_id, 50), uuid.uuid4())
    assert [(p.account_id, p.amount) for p in planned.postings] == [
        (CASH, 20),
        (PLAN, 30),
        (9, -50),
    ]
    assert (wallet.cash.balance, spent_grant.balance) == (120, 30)
    assert wallet.credits == [spent_grant]
    assert (wallet.balance, wallet.credit_total) == (150, 30)
    # The next charge spends the grant again (credits first), and is part of the history now.
    charge = TransferRequest(
        key=uuid.uuid4().hex, organization_id=wallet.organization_id, kind=Kind.CHARGE, amount=10
    )
    book.apply(charge, uuid.uuid4())
    assert spent_grant.balance == 20
    assert book.spending[wallet.organization_id][-1] == (PLAN, -10)


def test_without_a_history_a_refund_goes_to_cash() -> None:
    book, wallet = _book([], None)
    planned = book.apply(_refund(wallet.organization_id, 7), uuid.uuid4())
    assert [(p.account_id, p.amount) for p in planned.postings] == [(CASH, 7), (9, -7)]


# Through the service: meters' corrections and callers' refunds.


class Service(NamedTuple):
    stub: WalletServiceStub
    pool: AsyncConnectionPool
    new_org: NewOrg


@pytest.fixture
def service(
    wallet_service: Any, wallet_stub: WalletServiceStub, wallet_pool: AsyncConnectionPool,
    new_org: NewOrg,
) -> Service:  # fmt: skip
    """The wallet running (billing every 0.2 s), its stub, its database and new organizations."""
    return Service(wallet_stub, wallet_pool, new_org)


def ts(value: datetime) -> Timestamp:
    t = Timestamp()
    t.FromDatetime(value)
    return t


async def transfer(stub: WalletServiceStub, org: uuid.UUID, kind: Any, amount: int, **extra: Any):
    return await stub.Transfer(
        pb.TransferRequest(
            idempotency_key=uuid.uuid4().hex, organization_id=str(org), kind=kind,
            amount=Money(amount=amount), **extra,
        )
    )  # fmt: skip


async def accounts(pool: AsyncConnectionPool, org: uuid.UUID) -> dict[str, int]:
    """cash and credit balances (credits summed)."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT kind, sum(balance)::bigint FROM ledger_accounts WHERE organization_id = %s"
            " GROUP BY kind",
            (org,),
        )
        return dict(await cur.fetchall())


async def open_meter(stub: WalletServiceStub, org: uuid.UUID, rate: int, at: datetime) -> Any:
    return await stub.OpenMeter(
        pb.OpenMeterRequest(
            meter_id=f"m:{uuid.uuid4()}", organization_id=str(org), resource_id="pod-1",
            resource_type="pod", hourly_rate=rate, at=ts(at),
        )
    )  # fmt: skip


async def books_balance(pool: AsyncConnectionPool) -> bool:
    async with pool.connection() as conn:
        return await audit.check(conn) == []


async def credits_expired(pool: AsyncConnectionPool, org: uuid.UUID) -> None:
    """Wait for the wallet's housekeeping (every second) to expire what the grants hold."""
    for _ in range(100):
        if (await accounts(pool, org)).get("credit") == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the credits of {org} did not expire")


async def billed(pool: AsyncConnectionPool, meter_id: str, at_least: int) -> None:
    """Wait for the billing loop to have charged the meter `at_least`."""
    for _ in range(200):
        async with pool.connection() as conn:
            cur = await conn.execute("SELECT total_charged FROM meters WHERE id = %s", (meter_id,))
            row = await cur.fetchone()
        if row and row[0] >= at_least:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"meter {meter_id} was not billed {at_least}")


async def test_a_late_close_gives_credits_back_to_credits(service: Service) -> None:
    wallet_stub, wallet_pool, new_org = service
    org = await new_org()
    await transfer(wallet_stub, org, pb.TOPUP, 10_000_000)
    await transfer(wallet_stub, org, pb.CREDIT_GRANT, 1_000_000, credit_source="promotion")
    start = datetime.now(UTC) - timedelta(seconds=60)
    meter = await open_meter(wallet_stub, org, 36_000_000, start)  # 10_000 a second
    await billed(wallet_pool, meter.id, 500_000)  # ~60 s billed, out of the promotion
    closed = await wallet_stub.CloseMeter(
        pb.CloseMeterRequest(meter_id=meter.id, at=ts(start + timedelta(seconds=1)))
    )
    assert closed.total_charged == 10_000
    assert await accounts(wallet_pool, org) == {"cash": 10_000_000, "credit": 990_000}
    assert await books_balance(wallet_pool)


async def test_a_backdated_rate_change_gives_expiring_plan_credits_back(service: Service) -> None:
    wallet_stub, wallet_pool, new_org = service
    org = await new_org()
    expires = datetime.now(UTC) + timedelta(days=30)
    await transfer(
        wallet_stub, org, pb.CREDIT_GRANT, 60_000_000, credit_source="plan",
        credit_expires_at=ts(expires),
    )  # fmt: skip
    start = datetime.now(UTC) - timedelta(seconds=5)
    meter = await open_meter(wallet_stub, org, 3_600_000_000, start)  # 1.0 a second
    await billed(wallet_pool, meter.id, 5_000_000)
    await wallet_stub.UpdateMeterRate(
        pb.UpdateMeterRateRequest(
            meter_id=meter.id, hourly_rate=0, at=ts(start), idempotency_key="rate-1"
        )
    )
    await wallet_stub.CloseMeter(pb.CloseMeterRequest(meter_id=meter.id))
    assert await accounts(wallet_pool, org) == {"cash": 0, "credit": 60_000_000}
    async with wallet_pool.connection() as conn:
        cur = await conn.execute(
            "SELECT expires_at FROM ledger_accounts WHERE organization_id = %s AND kind = 'credit'",
            (org,),
        )
        assert await cur.fetchall() == [(expires,)]
    assert await books_balance(wallet_pool)


async def test_a_callers_refund_of_a_charge_paid_by_credits_restores_them(service: Service) -> None:
    wallet_stub, wallet_pool, new_org = service
    org = await new_org()
    await transfer(wallet_stub, org, pb.TOPUP, 100_000_000)
    await transfer(wallet_stub, org, pb.CREDIT_GRANT, 50_000_000, credit_source="promotion")
    await transfer(wallet_stub, org, pb.CHARGE, 30_000_000)  # all from the promotion
    await transfer(wallet_stub, org, pb.CHARGE, 40_000_000)  # promotion 20, cash 20
    await transfer(wallet_stub, org, pb.REFUND, 30_000_000)
    # As if the 30 had never been spent: 40 spent in all, credits first.
    assert await accounts(wallet_pool, org) == {"cash": 100_000_000, "credit": 10_000_000}
    # A refund of an organization that never had credits is cash, as ever.
    plain = await new_org()
    await transfer(wallet_stub, plain, pb.TOPUP, 5_000_000)
    await transfer(wallet_stub, plain, pb.REFUND, 2_000_000)
    assert await accounts(wallet_pool, plain) == {"cash": 7_000_000}


async def test_an_expired_grant_given_money_back_expires_it_again(service: Service) -> None:
    wallet_stub, wallet_pool, new_org = service
    org = await new_org()
    await transfer(wallet_stub, org, pb.TOPUP, 10_000_000)
    expires = datetime.now(UTC) + timedelta(seconds=1)
    await transfer(
        wallet_stub, org, pb.CREDIT_GRANT, 4_000_000, credit_source="promotion",
        credit_expires_at=ts(expires),
    )  # fmt: skip
    await transfer(wallet_stub, org, pb.CHARGE, 3_000_000)  # from the promotion
    await asyncio.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()))
    await credits_expired(wallet_pool, org)  # the last 1 of the grant
    refund = await transfer(wallet_stub, org, pb.REFUND, 3_000_000)  # back to the expired grant
    legs = {
        p.account.split(":")[2]: p.amount for p in refund.postings if p.account.startswith("org:")
    }
    assert legs == {"credit": 3_000_000}
    await credits_expired(wallet_pool, org)  # and it expires again
    assert await accounts(wallet_pool, org) == {"cash": 10_000_000, "credit": 0}
    assert await books_balance(wallet_pool)


def test_a_grant_emptied_earlier_in_the_batch_gets_its_money_back() -> None:
    grant = Account(PROMO, 10, "credit")
    book, wallet = _book([grant], [])
    org = wallet.organization_id
    charge = TransferRequest(key=uuid.uuid4().hex, organization_id=org, kind=Kind.CHARGE, amount=10)
    book.apply(charge, uuid.uuid4())
    assert wallet.credits == []
    planned = book.apply(_refund(org, 10), uuid.uuid4())
    assert [(p.account_id, p.amount) for p in planned.postings] == [(PROMO, 10), (9, -10)]
    assert wallet.credits == [grant] and grant.balance == 10
    # And again: spent, refunded, spent, refunded.
    book.apply(charge, uuid.uuid4())
    book.apply(_refund(org, 10), uuid.uuid4())
    assert grant.balance == 10 and wallet.cash.balance == 100


async def test_a_refund_follows_commit_order_not_id_order(service: Service) -> None:
    """A charge takes its id before it waits for the wallet lock, so one that commits later may
    have the smaller id; the refund must undo the one committed last."""
    wallet_stub, wallet_pool, new_org = service
    org = await new_org()
    await transfer(wallet_stub, org, pb.TOPUP, 100)
    await transfer(wallet_stub, org, pb.CREDIT_GRANT, 10, credit_source="promotion")
    store = LedgerStore("wallet")

    def charge() -> TransferRequest:
        return TransferRequest(
            key=uuid.uuid4().hex, organization_id=org, kind=Kind.CHARGE, amount=10
        )

    async with wallet_pool.connection() as holder, wallet_pool.connection() as waiter:
        async with holder.transaction():
            await holder.execute(
                "SELECT 1 FROM wallets WHERE organization_id = %s FOR UPDATE", (org,)
            )
            late = asyncio.create_task(store.post_one(waiter, charge()))  # takes its id, waits
            await asyncio.sleep(0.3)
            [first] = await store.post_transfers(holder, [charge()], fast_path=False)
        later = await late
    assert first.transaction is not None and later.id < first.transaction.id  # ids inverted
    # The later charge drew cash (the first took the grant): the refund gives cash back.
    await transfer(wallet_stub, org, pb.REFUND, 10)
    assert await accounts(wallet_pool, org) == {"cash": 100, "credit": 0}
    assert await books_balance(wallet_pool)


async def test_a_refund_naming_its_charge_lowers_that_resources_spending(service: Service) -> None:
    """The proto's `reference` may name the refunded transaction; such a refund with no resource
    of its own lowered "other" (spending by type: pod 10, other −4) and no resource's cost."""
    wallet_stub, wallet_pool, new_org = service
    org = await new_org()
    await transfer(wallet_stub, org, pb.TOPUP, 100_000_000)
    charge = await transfer(
        wallet_stub, org, pb.CHARGE, 10_000_000, resource_type="pod", resource_id="pod-1"
    )
    key = uuid.uuid4().hex
    refund = pb.TransferRequest(
        idempotency_key=key, organization_id=str(org), kind=pb.REFUND,
        amount=Money(amount=4_000_000), reference=charge.id,
    )  # fmt: skip
    first = await wallet_stub.Transfer(refund)
    assert await wallet_stub.Transfer(refund) == first  # the same request: its first answer
    # One that names no charge of this organization (another's, or none) counts as before.
    other = await new_org()
    await transfer(wallet_stub, other, pb.TOPUP, 100_000_000)
    await transfer(wallet_stub, other, pb.REFUND, 1_000_000, reference=charge.id)
    async with wallet_pool.connection() as conn:
        cur = await conn.execute(
            "SELECT organization_id, resource_type, sum(amount)::bigint FROM daily_spend"
            " WHERE organization_id = ANY(%s) GROUP BY 1, 2",
            ([org, other],),
        )
        spending = {(o, t): a for o, t, a in await cur.fetchall()}
        cur = await conn.execute(
            "SELECT total FROM resource_costs WHERE organization_id = %s AND resource_id = 'pod-1'",
            (org,),
        )
        cost = await cur.fetchone()
    assert spending == {(org, "pod"): 6_000_000, (other, "other"): -1_000_000}
    assert cost == (6_000_000,)


async def test_a_refund_gives_a_resource_back_at_most_what_its_charge_cost(
    service: Service,
) -> None:
    """Past what its charge has left (after earlier refunds naming it, in this batch or before),
    a refund is counted as one naming nothing: the resource's cost went below zero."""
    wallet_stub, wallet_pool, new_org = service
    org = await new_org()
    await transfer(wallet_stub, org, pb.TOPUP, 100_000_000)
    charge = await transfer(
        wallet_stub, org, pb.CHARGE, 10_000_000, resource_type="pod", resource_id="pod-1"
    )
    await transfer(wallet_stub, org, pb.REFUND, 4_000_000, reference=charge.id)

    def refund(amount: int) -> pb.TransferRequest:
        return pb.TransferRequest(
            idempotency_key=uuid.uuid4().hex, organization_id=str(org), kind=pb.REFUND,
            amount=Money(amount=amount), reference=charge.id,
        )  # fmt: skip

    batch = await wallet_stub.TransferBatch(
        pb.TransferBatchRequest(transfers=[refund(5_000_000), refund(3_000_000)])
    )
    assert not any(r.error_code for r in batch.results)
    async with wallet_pool.connection() as conn:
        cur = await conn.execute(
            "SELECT total FROM resource_costs WHERE organization_id = %s AND resource_id = 'pod-1'",
            (org,),
        )
        cost = await cur.fetchone()
    # 10 charged; 4, then 5 and 1 of the 3 given back to the pod; 2 more to nothing in particular
    assert await spending(wallet_pool, org) == {"pod": 0, "other": -2_000_000}
    assert cost == (0,)
    # The id spelled otherwise names nothing: earlier refunds are found by the reference as
    # stored, so such a one was capped by nothing (the cost went below zero again).
    other = await transfer(
        wallet_stub, org, pb.CHARGE, 10_000_000, resource_type="pod", resource_id="pod-2"
    )
    for _ in range(2):
        await transfer(wallet_stub, org, pb.REFUND, 10_000_000, reference=other.id.upper())
    async with wallet_pool.connection() as conn:
        cur = await conn.execute(
            "SELECT total FROM resource_costs WHERE organization_id = %s AND resource_id = 'pod-2'",
            (org,),
        )
        assert await cur.fetchone() == (10_000_000,)
    assert await books_balance(wallet_pool)


async def test_refunds_of_one_charge_at_once_give_its_resource_back_once(
    service: Service,
) -> None:
    """What the charge had left was read before the wallet was locked: two refunds sent at once
    each gave the resource back all of it, and its cost went below zero."""
    wallet_stub, wallet_pool, new_org = service
    org = await new_org()
    await transfer(wallet_stub, org, pb.TOPUP, 100_000_000)
    charge = await transfer(
        wallet_stub, org, pb.CHARGE, 10_000_000, resource_type="pod", resource_id="pod-1"
    )
    refund = [
        pb.TransferRequest(
            idempotency_key=uuid.uuid4().hex, organization_id=str(org), kind=pb.REFUND,
            amount=Money(amount=10_000_000), reference=charge.id,
        )
        for _ in range(2)
    ]  # fmt: skip
    async with wallet_pool.connection() as holder, holder.transaction():  # both wait here
        await holder.execute("SELECT 1 FROM wallets WHERE organization_id = %s FOR UPDATE", (org,))
        sent = [
            asyncio.ensure_future(wallet_stub.TransferBatch(pb.TransferBatchRequest(transfers=[r])))
            for r in refund
        ]
        await asyncio.sleep(0.5)
    for reply in await asyncio.gather(*sent):
        assert not reply.results[0].error_code
    assert await spending(wallet_pool, org) == {"pod": 0, "other": -10_000_000}


async def test_a_refund_past_its_charge_in_a_batch_with_a_charge_posts(service: Service) -> None:
    """What the charge had left came back from SQL as a Decimal: beside another spending item,
    the batch's rollups mixed it with integers and the whole batch failed as INTERNAL."""
    wallet_stub, _, new_org = service
    org = await new_org()
    await transfer(wallet_stub, org, pb.TOPUP, 100_000_000)
    charge = await transfer(
        wallet_stub, org, pb.CHARGE, 10_000_000, resource_type="pod", resource_id="pod-1"
    )
    reply = await wallet_stub.TransferBatch(
        pb.TransferBatchRequest(
            transfers=[
                pb.TransferRequest(
                    idempotency_key=uuid.uuid4().hex, organization_id=str(org), kind=pb.REFUND,
                    amount=Money(amount=15_000_000), reference=charge.id,
                ),
                pb.TransferRequest(
                    idempotency_key=uuid.uuid4().hex, organization_id=str(org), kind=pb.CHARGE,
                    amount=Money(amount=1_000_000), resource_type="vm", resource_id="vm-1",
                ),
            ]
        )
    )  # fmt: skip
    assert [r.error_code for r in reply.results] == ["", ""]


async def test_a_replayed_refund_takes_no_share_of_its_charge(service: Service) -> None:
    """A retry of a refund already posted (or one repeated in the batch) posts nothing, but it
    took its share of what the charge had left: the next refund's went to "other"."""
    wallet_stub, wallet_pool, new_org = service
    org = await new_org()
    await transfer(wallet_stub, org, pb.TOPUP, 100_000_000)
    charge = await transfer(
        wallet_stub, org, pb.CHARGE, 10_000_000, resource_type="pod", resource_id="pod-1"
    )

    def refund(amount: int, key: str) -> pb.TransferRequest:
        return pb.TransferRequest(
            idempotency_key=key, organization_id=str(org), kind=pb.REFUND,
            amount=Money(amount=amount), reference=charge.id,
        )  # fmt: skip

    first = refund(4_000_000, "r1")
    await wallet_stub.Transfer(first)
    second = refund(6_000_000, "r2")
    reply = await wallet_stub.TransferBatch(
        pb.TransferBatchRequest(transfers=[first, second, second])
    )
    assert [r.error_code for r in reply.results] == ["", "", ""]
    assert await spending(wallet_pool, org) == {"pod": 0}


async def test_a_refused_refund_takes_no_share_of_its_charge(service: Service) -> None:
    """A refund refused in the batch (a currency not the wallet's) took its share all the same:
    the next one, posted, went to "other"."""
    wallet_stub, wallet_pool, new_org = service
    org = await new_org("USD")
    await transfer(wallet_stub, org, pb.TOPUP, 100_000_000)
    charge = await transfer(
        wallet_stub, org, pb.CHARGE, 10_000_000, resource_type="pod", resource_id="pod-1"
    )

    def refund(currency: str) -> pb.TransferRequest:
        return pb.TransferRequest(
            idempotency_key=uuid.uuid4().hex, organization_id=str(org), kind=pb.REFUND,
            amount=Money(amount=10_000_000, currency=currency), reference=charge.id,
        )  # fmt: skip

    reply = await wallet_stub.TransferBatch(
        pb.TransferBatchRequest(transfers=[refund("INR"), refund("USD")])
    )
    assert [bool(r.error_code) for r in reply.results] == [True, False]
    assert await spending(wallet_pool, org) == {"pod": 0}


async def spending(pool: AsyncConnectionPool, org: uuid.UUID) -> dict[str, int]:
    """The organization's spending by resource type, all days together (the rollup)."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT resource_type, sum(amount)::bigint FROM daily_spend"
            " WHERE organization_id = %s GROUP BY 1",
            (org,),
        )
        return dict(await cur.fetchall())
