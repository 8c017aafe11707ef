from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import grpc
import pytest
from psycopg_pool import AsyncConnectionPool

from gpudeck.proto.common.v1.money_pb2 import Money
from gpudeck.proto.wallet.v1 import account_pb2 as apb
from gpudeck.proto.wallet.v1 import wallet_pb2 as pb
from gpudeck.proto.wallet.v1.account_pb2_grpc import AccountServiceStub
from gpudeck.proto.wallet.v1.wallet_pb2_grpc import WalletServiceStub

NewOrg = Callable[..., Awaitable[uuid.UUID]]
USD = 1_000_000


def transfer(
    org: uuid.UUID, kind: int, amount: int, key: str | None = None, **kw: object
) -> pb.TransferRequest:
    return pb.TransferRequest(
        idempotency_key=key or uuid.uuid4().hex,
        organization_id=str(org),
        kind=kind,  # type: ignore[arg-type]
        amount=Money(amount=amount, currency=str(kw.pop("currency", ""))),
        **kw,  # type: ignore[arg-type]
    )


async def test_top_up_and_charge(wallet_stub: WalletServiceStub, new_org: NewOrg) -> None:
    org = await new_org()
    top = await wallet_stub.Transfer(transfer(org, pb.TOPUP, 50 * USD))
    assert top.balance_after.amount == 50 * USD
    charge = await wallet_stub.Transfer(transfer(org, pb.CHARGE, 20 * USD, resource_type="pod"))
    assert charge.balance_after.amount == 30 * USD
    assert sum(p.amount for p in charge.postings) == 0
    assert all(p.balance_after == p.balance_before + p.amount for p in charge.postings)


async def test_a_charge_beyond_spendable_is_refused_and_changes_nothing(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    org = await new_org()
    await wallet_stub.Transfer(transfer(org, pb.TOPUP, 5 * USD))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wallet_stub.Transfer(transfer(org, pb.CHARGE, 6 * USD))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "insufficient funds" in (err.value.details() or "")
    assert ("x-error-reason", "INSUFFICIENT_FUNDS") in list(err.value.trailing_metadata() or ())
    again = await wallet_stub.Transfer(transfer(org, pb.CHARGE, 5 * USD))
    assert again.balance_after.amount == 0


async def test_a_retry_with_the_same_key_returns_the_first_result(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    org = await new_org()
    first = await wallet_stub.Transfer(transfer(org, pb.TOPUP, 7 * USD, key="k1"))
    second = await wallet_stub.Transfer(transfer(org, pb.TOPUP, 7 * USD, key="k1"))
    assert second == first
    listed = await wallet_stub.ListTransactions(
        pb.ListTransactionsRequest(organization_id=str(org))
    )
    assert [t.id for t in listed.transactions] == [first.id]


async def test_the_same_key_with_another_payload_is_refused(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    org = await new_org()
    await wallet_stub.Transfer(transfer(org, pb.TOPUP, 7 * USD, key="k2"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wallet_stub.Transfer(transfer(org, pb.TOPUP, 8 * USD, key="k2"))
    assert err.value.code() == grpc.StatusCode.ABORTED
    assert "idempotency_key" in (err.value.details() or "")


@pytest.mark.parametrize(
    ("amount", "field"),
    [(0, "amount"), (-5, "amount"), (10**18, "amount")],
)
async def test_bad_amounts_are_invalid_arguments_naming_the_field(
    wallet_stub: WalletServiceStub, new_org: NewOrg, amount: int, field: str
) -> None:
    org = await new_org()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wallet_stub.Transfer(transfer(org, pb.TOPUP, amount))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (err.value.details() or "")


async def test_unknown_currency_and_organization(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    org = await new_org()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wallet_stub.Transfer(transfer(org, pb.TOPUP, USD, currency="EUR"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "currency" in (err.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wallet_stub.Transfer(transfer(uuid.uuid4(), pb.TOPUP, USD))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_currency_is_read_as_every_currency_input_is(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    """Blanks around the code and lower case are the code (they were used as sent: the wallet's
    own currency was refused for want of a rate from "USD " to USD); blanks alone are no code."""
    org = await new_org("USD")
    top = await wallet_stub.Transfer(transfer(org, pb.TOPUP, 5 * USD, currency=" usd "))
    assert top.balance_after.amount == 5 * USD
    charge = await wallet_stub.Transfer(transfer(org, pb.CHARGE, USD, currency="USD "))
    assert charge.balance_after.amount == 4 * USD
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wallet_stub.Transfer(transfer(org, pb.TOPUP, USD, currency="  "))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "currency" in (err.value.details() or "")


async def test_credits_are_spent_before_cash(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    org = await new_org()
    await wallet_stub.Transfer(transfer(org, pb.TOPUP, 10 * USD))
    await wallet_stub.Transfer(transfer(org, pb.CREDIT_GRANT, 3 * USD, credit_source="promotion"))
    charge = await wallet_stub.Transfer(transfer(org, pb.CHARGE, 4 * USD))
    assert charge.balance_after.amount == 9 * USD
    debits = sorted((p.account.split(":")[2], p.amount) for p in charge.postings if p.amount < 0)
    assert debits == [("cash", -1 * USD), ("credit", -3 * USD)]


async def test_batch_gives_a_result_per_item(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    org = await new_org()
    batch = pb.TransferBatchRequest(
        transfers=[
            transfer(org, pb.TOPUP, 10 * USD),
            transfer(org, pb.CHARGE, 4 * USD),
            transfer(org, pb.CHARGE, 7 * USD),  # only 6 left
            transfer(org, pb.CHARGE, 0),
            transfer(org, pb.CHARGE, 6 * USD),
        ]
    )
    results = (await wallet_stub.TransferBatch(batch)).results
    assert [r.error_code for r in results] == [
        "",
        "",
        "FAILED_PRECONDITION",
        "INVALID_ARGUMENT",
        "",
    ]
    assert results[4].transaction.balance_after.amount == 0


async def test_hold_capture_releases_the_rest(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    org = await new_org()
    await wallet_stub.Transfer(transfer(org, pb.TOPUP, 10 * USD))
    hold = await wallet_stub.CreateHold(
        pb.CreateHoldRequest(
            idempotency_key="h", organization_id=str(org), amount=8 * USD, timeout_seconds=60
        )
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wallet_stub.Transfer(transfer(org, pb.CHARGE, 3 * USD))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    captured = await wallet_stub.CaptureHold(
        pb.CaptureHoldRequest(idempotency_key="c", hold_id=hold.id, amount=5 * USD)
    )
    assert captured.hold.status == "captured"
    assert captured.transaction.balance_after.amount == 5 * USD
    charge = await wallet_stub.Transfer(transfer(org, pb.CHARGE, 5 * USD))
    assert charge.balance_after.amount == 0


async def test_capture_above_the_hold_and_second_capture_are_refused(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    org = await new_org()
    await wallet_stub.Transfer(transfer(org, pb.TOPUP, 10 * USD))
    hold = await wallet_stub.CreateHold(
        pb.CreateHoldRequest(idempotency_key="h", organization_id=str(org), amount=2 * USD)
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wallet_stub.CaptureHold(
            pb.CaptureHoldRequest(idempotency_key="c1", hold_id=hold.id, amount=3 * USD)
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    first = await wallet_stub.CaptureHold(
        pb.CaptureHoldRequest(idempotency_key="c2", hold_id=hold.id)
    )
    retried = await wallet_stub.CaptureHold(
        pb.CaptureHoldRequest(idempotency_key="c2", hold_id=hold.id)
    )
    assert retried == first
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wallet_stub.CaptureHold(pb.CaptureHoldRequest(idempotency_key="c3", hold_id=hold.id))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already captured" in (err.value.details() or "")


async def test_top_ups_above_the_kyc_limit_need_a_verified_organization(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    org = await new_org(kyc="unverified")
    small = await wallet_stub.Transfer(transfer(org, pb.TOPUP, 500 * USD))
    assert small.balance_after.amount == 500 * USD
    for call in (
        wallet_stub.Transfer(transfer(org, pb.TOPUP, 501 * USD)),
        wallet_stub.TransferBatch(
            pb.TransferBatchRequest(transfers=[transfer(org, pb.TOPUP, 501 * USD)])
        ),
    ):
        try:
            reply = await call
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert ("x-error-reason", "KYC_REQUIRED") in list(exc.trailing_metadata() or ())
            assert "KYC" in (exc.details() or "")
        else:
            assert isinstance(reply, pb.TransferBatchResponse)
            assert reply.results[0].error_code == "FAILED_PRECONDITION"
            assert "KYC" in reply.results[0].error_message


async def test_the_open_holds_are_listed_newest_first(
    wallet_stub: WalletServiceStub, new_org: NewOrg, wallet_pool: AsyncConnectionPool
) -> None:
    org = await new_org()
    await wallet_stub.Transfer(transfer(org, pb.TOPUP, 50 * USD))
    made = [
        await wallet_stub.CreateHold(
            pb.CreateHoldRequest(
                idempotency_key=f"h{i}",
                organization_id=str(org),
                amount=(i + 1) * USD,
                timeout_seconds=60,
                resource_type="pod",
                resource_id=f"pod-{i}",
            )
        )
        for i in range(3)
    ]
    await wallet_stub.CaptureHold(
        pb.CaptureHoldRequest(idempotency_key="c0", hold_id=made[0].id, amount=USD)
    )
    listed = await wallet_stub.ListHolds(pb.ListHoldsRequest(organization_id=str(org)))
    assert [h.id for h in listed.holds] == [made[2].id, made[1].id]
    assert (listed.holds[0].resource_type, listed.holds[0].resource_id) == ("pod", "pod-2")
    summary = await wallet_stub.GetWalletSummary(
        pb.GetWalletSummaryRequest(organization_id=str(org))
    )
    assert sum(h.amount.amount for h in listed.holds) == summary.held_balance.amount
    async with wallet_pool.connection() as conn:  # past its expiry, not yet swept
        await conn.execute(
            "UPDATE holds SET expires_at = now() - interval '1 second' WHERE id = %s",
            (made[1].id,),
        )
    listed = await wallet_stub.ListHolds(pb.ListHoldsRequest(organization_id=str(org)))
    assert [h.id for h in listed.holds] == [made[2].id]
    one = await wallet_stub.ListHolds(pb.ListHoldsRequest(organization_id=str(org), limit=1))
    assert [h.id for h in one.holds] == [made[2].id]
    for request, code in (
        (pb.ListHoldsRequest(organization_id=str(uuid.uuid4())), grpc.StatusCode.NOT_FOUND),
        (
            pb.ListHoldsRequest(organization_id=str(org), limit=501),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await wallet_stub.ListHolds(request)
        assert err.value.code() == code


async def test_batches_splitting_organizations_the_other_way_round_do_not_deadlock(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    """A batch's fast path locked its organizations, the general path the others after it: two
    batches split the other way round locked in opposite orders, and deadlocked (failing as
    UNAVAILABLE, with the single calls waiting on those wallets)."""
    a, b = await new_org(), await new_org()

    def batch(top_up: uuid.UUID, grant: uuid.UUID) -> pb.TransferBatchRequest:
        return pb.TransferBatchRequest(
            transfers=[
                transfer(top_up, pb.TOPUP, USD),
                transfer(grant, pb.CREDIT_GRANT, USD, credit_source="promotion"),
            ]
        )

    replies = await asyncio.gather(
        *(wallet_stub.TransferBatch(batch(*pair), timeout=30)
          for _ in range(25) for pair in ((a, b), (b, a))),
        return_exceptions=True,
    )  # fmt: skip
    failed = [r for r in replies if isinstance(r, BaseException)]
    assert not failed, failed[0]
    assert all(not r.error_code for reply in replies for r in reply.results)  # type: ignore[union-attr]


async def test_a_retry_answers_as_the_first_call_once_its_project_is_deleted(
    wallet_stub: WalletServiceStub, account_stub: AccountServiceStub, new_org: NewOrg
) -> None:
    """A caller whose first call timed out was told NOT_FOUND, as if nothing had been posted."""
    org = await new_org()
    for name in ("kept", "gone"):  # an organization keeps one project at least
        project = await account_stub.CreateProject(
            apb.CreateProjectRequest(organization_id=str(org), name=name)
        )
    in_gone = {"project_id": project.id, "resource_type": "pod"}
    top = await wallet_stub.Transfer(transfer(org, pb.TOPUP, 10 * USD, key="top", **in_gone))
    batched = transfer(org, pb.CHARGE, 3 * USD, key="batched", **in_gone)
    [first] = (
        await wallet_stub.TransferBatch(pb.TransferBatchRequest(transfers=[batched]))
    ).results
    await account_stub.DeleteProject(apb.DeleteProjectRequest(project_id=project.id))

    assert (
        await wallet_stub.Transfer(transfer(org, pb.TOPUP, 10 * USD, key="top", **in_gone)) == top
    )
    again = (await wallet_stub.TransferBatch(pb.TransferBatchRequest(transfers=[batched]))).results
    assert [r.transaction.id for r in again] == [first.transaction.id]
    with pytest.raises(grpc.aio.AioRpcError) as err:  # another payload: the key's reuse
        await wallet_stub.Transfer(transfer(org, pb.TOPUP, 11 * USD, key="top", **in_gone))
    assert err.value.code() == grpc.StatusCode.ABORTED
    with pytest.raises(grpc.aio.AioRpcError) as err:  # a new transfer there is still refused
        await wallet_stub.Transfer(transfer(org, pb.CHARGE, USD, key="new", **in_gone))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    new = transfer(org, pb.CHARGE, USD, key="new-batched", **in_gone)
    [refused] = (await wallet_stub.TransferBatch(pb.TransferBatchRequest(transfers=[new]))).results
    assert refused.error_code == "NOT_FOUND"
    summary = await wallet_stub.GetWalletSummary(
        pb.GetWalletSummaryRequest(organization_id=str(org))
    )
    assert summary.balance.amount == 7 * USD
