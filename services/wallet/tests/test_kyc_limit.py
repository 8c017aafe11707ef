"""The KYC limit (500 USD here) counts all the money an organization not verified adds: top-ups
through each path (single, batch) and purchased credits. Splitting an amount does not get past
it; a retry of an accepted top-up still gets its first answer; top-ups at once are counted one
after the other. Over the real gRPC server and PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import grpc
import pytest

from gpudeck.proto.common.v1.money_pb2 import Money
from gpudeck.proto.wallet.v1 import wallet_pb2 as pb
from gpudeck.proto.wallet.v1.wallet_pb2_grpc import WalletServiceStub

NewOrg = Callable[..., Awaitable[uuid.UUID]]
USD = 1_000_000


def top_up(org: uuid.UUID, amount: int, key: str = "") -> pb.TransferRequest:
    return pb.TransferRequest(
        idempotency_key=key or uuid.uuid4().hex, organization_id=str(org), kind=pb.TOPUP,
        amount=Money(amount=amount),
    )  # fmt: skip


async def refused(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert ("x-error-reason", "KYC_REQUIRED") in list(err.value.trailing_metadata() or ())
    return err.value


async def balance(stub: WalletServiceStub, org: uuid.UUID) -> int:
    summary = await stub.GetWalletSummary(pb.GetWalletSummaryRequest(organization_id=str(org)))
    return int(summary.balance.amount)


async def test_top_ups_in_parts_count_together(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    org = await new_org(kyc="unverified")
    await wallet_stub.Transfer(top_up(org, 300 * USD, key="first"))
    err = await refused(wallet_stub.Transfer(top_up(org, 300 * USD)))
    assert "500.000000 USD in all (300.000000 added so far)" in (err.details() or "")
    await wallet_stub.Transfer(top_up(org, 200 * USD))  # exactly up to the limit
    await refused(wallet_stub.Transfer(top_up(org, 1)))
    again = await wallet_stub.Transfer(top_up(org, 300 * USD, key="first"))
    assert again.amount.amount == 300 * USD, "a retry of an accepted top-up is answered"
    assert await balance(wallet_stub, org) == 500 * USD


async def test_a_batch_counts_what_came_before_and_its_own_items(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    org = await new_org(kyc="unverified")
    await wallet_stub.Transfer(top_up(org, 100 * USD))
    batch = pb.TransferBatchRequest(transfers=[top_up(org, 150 * USD) for _ in range(3)])
    reply = await wallet_stub.TransferBatch(batch)
    assert [r.error_code for r in reply.results] == ["", "", "FAILED_PRECONDITION"]
    assert await balance(wallet_stub, org) == 400 * USD


async def test_purchased_credits_count_too(wallet_stub: WalletServiceStub, new_org: NewOrg) -> None:
    org = await new_org(kyc="unverified")
    await wallet_stub.Transfer(top_up(org, 400 * USD))
    purchase = pb.AddCreditsRequest(
        idempotency_key=uuid.uuid4().hex, organization_id=str(org), amount=Money(amount=200 * USD)
    )
    err = await refused(wallet_stub.AddCredits(purchase))
    assert "kyc_status" not in (err.details() or ""), "service field names never show"
    purchase.amount.amount = 100 * USD
    await wallet_stub.AddCredits(purchase)
    await refused(wallet_stub.Transfer(top_up(org, 1)))


async def test_top_ups_at_once_are_counted_one_after_the_other(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    org = await new_org(kyc="unverified")
    calls = [wallet_stub.Transfer(top_up(org, 100 * USD)) for _ in range(8)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert sum(not isinstance(r, Exception) for r in results) == 5
    assert all(
        isinstance(r, pb.Transaction) or r.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[union-attr]
        for r in results
    )
    assert await balance(wallet_stub, org) == 500 * USD


async def test_a_verified_organization_has_no_limit(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    org = await new_org()
    for _ in range(3):
        await wallet_stub.Transfer(top_up(org, 400 * USD))
    assert await balance(wallet_stub, org) == 1200 * USD


async def test_batches_and_purchases_at_once_are_counted_one_after_the_other(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    """They take the general path, which reads what was added after it holds the wallet: not
    with the snapshot taken before it waited for the lock."""
    batches, purchases = await new_org(kyc="unverified"), await new_org(kyc="unverified")
    calls = [
        *(
            wallet_stub.TransferBatch(
                pb.TransferBatchRequest(transfers=[top_up(batches, 100 * USD)])
            )
            for _ in range(8)
        ),
        *(
            wallet_stub.AddCredits(
                pb.AddCreditsRequest(
                    idempotency_key=uuid.uuid4().hex,
                    organization_id=str(purchases),
                    amount=Money(amount=100 * USD),
                )
            )
            for _ in range(8)
        ),
    ]
    await asyncio.gather(*calls, return_exceptions=True)
    assert await balance(wallet_stub, batches) == 500 * USD
    assert await balance(wallet_stub, purchases) == 500 * USD


async def test_an_automatic_top_up_is_asked_for_only_with_room_and_credited_once_paid(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    org = await new_org(kyc="unverified")
    await wallet_stub.Transfer(top_up(org, 300 * USD))
    rule = pb.SetAutoTopUpRequest(organization_id=str(org), enabled=True, below=100 * USD)
    rule.amount = 300 * USD  # 600 in all: it could never be paid in
    await refused(wallet_stub.SetAutoTopUp(rule))
    rule.amount = 200 * USD
    await wallet_stub.SetAutoTopUp(rule)
    charge = pb.TransferRequest(
        idempotency_key=uuid.uuid4().hex, organization_id=str(org), kind=pb.CHARGE,
        amount=Money(amount=250 * USD),
    )  # fmt: skip
    await wallet_stub.Transfer(charge)  # 50 left: below the rule's 100, it asks for 200
    asked = await wallet_stub.GetAutoTopUp(pb.GetAutoTopUpRequest(organization_id=str(org)))
    assert asked.pending.status == "pending"
    # The payment is taken, and meanwhile the organization topped up by hand: no room is left,
    # yet money already paid is credited.
    await wallet_stub.Transfer(top_up(org, 100 * USD))
    done = await wallet_stub.CompleteTopUp(
        pb.CompleteTopUpRequest(pending_top_up_id=asked.pending.id, succeeded=True)
    )
    assert done.status == "completed"
    assert await balance(wallet_stub, org) == 350 * USD
    charge.idempotency_key, charge.amount.amount = uuid.uuid4().hex, 300 * USD
    await wallet_stub.Transfer(charge)  # 50 left again, but no room: nothing is asked for
    after = await wallet_stub.GetAutoTopUp(pb.GetAutoTopUpRequest(organization_id=str(org)))
    assert not after.HasField("pending") or after.pending.status != "pending"


async def test_each_wallet_currency_has_its_own_limit(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    """By default 500 USD and 40,000 INR: an INR wallet's limit is not 500 rupees."""
    rupee = 1_000_000
    org = await new_org(currency="INR", kyc="unverified")
    rule = pb.SetAutoTopUpRequest(organization_id=str(org), enabled=True, below=100 * rupee)
    rule.amount = 10_000 * rupee
    await wallet_stub.SetAutoTopUp(rule)  # room for it under 40,000
    await wallet_stub.Transfer(top_up(org, 30_000 * rupee))
    batch = pb.TransferBatchRequest(transfers=[top_up(org, 6_000 * rupee) for _ in range(2)])
    reply = await wallet_stub.TransferBatch(batch)
    assert [r.error_code for r in reply.results] == ["", "FAILED_PRECONDITION"]
    purchase = pb.AddCreditsRequest(
        idempotency_key=uuid.uuid4().hex,
        organization_id=str(org),
        amount=Money(amount=4_001 * rupee),
    )
    err = await refused(wallet_stub.AddCredits(purchase))
    assert "40000.000000 INR in all (36000.000000 added so far)" in (err.details() or "")
    purchase.idempotency_key, purchase.amount.amount = uuid.uuid4().hex, 4_000 * rupee
    await wallet_stub.AddCredits(purchase)
    await refused(wallet_stub.Transfer(top_up(org, 1)))
    await refused(wallet_stub.SetAutoTopUp(rule))
    assert await balance(wallet_stub, org) == 40_000 * rupee
