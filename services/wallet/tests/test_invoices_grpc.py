"""Invoices over gRPC against real PostgreSQL, built from daily_spend rows put in directly."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta

import grpc
import pytest
from psycopg_pool import AsyncConnectionPool

from gpudeck.proto.common.v1.money_pb2 import Money
from gpudeck.proto.wallet.v1 import account_pb2 as apb
from gpudeck.proto.wallet.v1 import wallet_pb2 as pb
from gpudeck.proto.wallet.v1.account_pb2_grpc import AccountServiceStub
from gpudeck.proto.wallet.v1.wallet_pb2_grpc import WalletServiceStub
from gpudeck.wallet.deps import Wallet
from gpudeck.wallet.invoices import Period, next_invoice_date
from gpudeck.wallet.workers import issue_last_month_invoices

NewOrg = Callable[..., Awaitable[uuid.UUID]]
Spend = Callable[..., Awaitable[None]]
USD = 1_000_000
TIMEOUT = 10


@pytest.fixture
def spend(wallet_pool: AsyncConnectionPool) -> Spend:
    """Put a daily_spend row (the rollup invoices read) for an organization, day and type."""

    async def put(org: uuid.UUID, day: date, resource_type: str, amount: int) -> None:
        async with wallet_pool.connection() as conn:
            await conn.execute(
                "INSERT INTO daily_spend (organization_id, day, resource_type, amount)"
                " VALUES (%s, %s, %s, %s) ON CONFLICT (organization_id, day, resource_type)"
                " DO UPDATE SET amount = daily_spend.amount + excluded.amount",
                (org, day, resource_type, amount),
            )

    return put


async def founded(pool: AsyncConnectionPool, org: uuid.UUID, day: date) -> None:
    """Say the organization was created on `day` (invoices are for months it existed in)."""
    async with pool.connection() as conn:
        await conn.execute("UPDATE organizations SET created_at = %s WHERE id = %s", (day, org))


async def generate(
    stub: WalletServiceStub, period: str, org: uuid.UUID | None = None
) -> list[pb.Invoice]:
    response = await stub.GenerateInvoices(
        pb.GenerateInvoicesRequest(period=period, organization_id=str(org or "")), timeout=TIMEOUT
    )
    return list(response.invoices)


def error_field(err: grpc.aio.AioRpcError) -> str:
    return dict(err.trailing_metadata() or ()).get("x-error-field", "")  # type: ignore[no-any-return]


async def test_an_invoice_sums_the_period_by_resource_type(
    wallet_stub: WalletServiceStub, new_org: NewOrg, spend: Spend
) -> None:
    org = await new_org(name="Acme Robotics")
    await spend(org, date(2025, 3, 1), "pod", 10 * USD)
    await spend(org, date(2025, 3, 31), "pod", 2_500_000)
    await spend(org, date(2025, 3, 15), "vm", 4 * USD)
    await spend(org, date(2025, 3, 2), "plan", 49 * USD)
    await spend(org, date(2025, 3, 3), "nfs_volume", 417)
    await spend(org, date(2025, 2, 28), "pod", 1000 * USD)  # before the period
    await spend(org, date(2025, 4, 1), "pod", 1000 * USD)  # after it
    [invoice] = await generate(wallet_stub, "2025-03", org)
    assert (invoice.organization_id, invoice.organization_name) == (str(org), "Acme Robotics")
    assert (invoice.period, invoice.period_start, invoice.period_end) == (
        "2025-03",
        "2025-03-01",
        "2025-03-31",
    )
    assert [(x.resource_type, x.description, x.amount.amount) for x in invoice.lines] == [
        ("plan", "Plan fees", 49 * USD),
        ("pod", "GPU pods", 12_500_000),
        ("vm", "Virtual machines", 4 * USD),
        ("nfs_volume", "NFS volumes", 417),
    ]
    assert (invoice.total.amount, invoice.total.currency) == (65_500_417, "USD")
    assert invoice.status == "open"
    assert invoice.HasField("issued_at") and not invoice.HasField("paid_at")


async def test_generating_twice_makes_one_invoice(
    wallet_stub: WalletServiceStub, new_org: NewOrg, spend: Spend
) -> None:
    org = await new_org()
    await spend(org, date(2025, 1, 10), "pod", 3 * USD)
    [first] = await generate(wallet_stub, "2025-01", org)
    await spend(org, date(2025, 1, 11), "pod", 7 * USD)  # late: the issued invoice stays as it was
    [second] = await generate(wallet_stub, "2025-01", org)
    assert second == first
    listed = await wallet_stub.ListInvoices(
        pb.ListInvoicesRequest(organization_id=str(org)), timeout=TIMEOUT
    )
    assert [i.id for i in listed.invoices] == [first.id]


async def test_generating_for_every_organization_covers_those_that_spent(
    wallet_stub: WalletServiceStub, new_org: NewOrg, spend: Spend
) -> None:
    a, b, idle = await new_org(), await new_org(currency="INR"), await new_org()
    await spend(a, date(2003, 7, 4), "pod", USD)
    await spend(b, date(2003, 7, 5), "vm", 80 * USD)
    invoices = await generate(wallet_stub, "2003-07")
    by_org = {i.organization_id: i for i in invoices}
    assert set(by_org) == {str(a), str(b)}
    assert by_org[str(b)].total.currency == "INR"
    assert str(idle) not in by_org
    again = await generate(wallet_stub, "2003-07")
    assert sorted(i.id for i in again) == sorted(i.id for i in invoices)


async def test_an_organization_that_spent_nothing_gets_an_empty_invoice_on_request(
    wallet_stub: WalletServiceStub, wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    org = await new_org()
    await founded(wallet_pool, org, date(2024, 11, 20))
    [invoice] = await generate(wallet_stub, "2024-11", org)
    assert (list(invoice.lines), invoice.total.amount) == ([], 0)
    # A month that ended before it existed has nothing to bill, not even a zero invoice.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await generate(wallet_stub, "2024-10", org)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_field(err.value) == "period"
    assert "before organization" in (err.value.details() or "")
    listed = await wallet_stub.ListInvoices(
        pb.ListInvoicesRequest(organization_id=str(org)), timeout=TIMEOUT
    )
    assert [i.period for i in listed.invoices] == ["2024-11"]


async def test_past_invoices_newest_first_with_the_next_invoice_date(
    wallet_stub: WalletServiceStub, new_org: NewOrg, spend: Spend
) -> None:
    org = await new_org()
    for month in (1, 3, 2):
        await spend(org, date(2024, month, 5), "pod", month * USD)
        await generate(wallet_stub, f"2024-{month:02d}", org)
    listed = await wallet_stub.ListInvoices(
        pb.ListInvoicesRequest(organization_id=str(org)), timeout=TIMEOUT
    )
    assert [i.period for i in listed.invoices] == ["2024-03", "2024-02", "2024-01"]
    assert [i.total.amount for i in listed.invoices] == [3 * USD, 2 * USD, USD]
    assert listed.next_invoice_date == next_invoice_date(datetime.now(UTC)).isoformat()
    two = await wallet_stub.ListInvoices(
        pb.ListInvoicesRequest(organization_id=str(org), limit=2), timeout=TIMEOUT
    )
    assert len(two.invoices) == 2


async def test_the_invoice_renders_to_a_pdf_with_its_total(
    wallet_stub: WalletServiceStub, new_org: NewOrg, spend: Spend
) -> None:
    org = await new_org(name="Render Labs")
    await spend(org, date(2025, 5, 20), "pod", 1_234_500_000)
    await spend(org, date(2025, 5, 21), "object_storage", 250_000)
    [invoice] = await generate(wallet_stub, "2025-05", org)
    rendered = await wallet_stub.RenderInvoicePdf(
        pb.RenderInvoicePdfRequest(invoice_id=invoice.id), timeout=TIMEOUT
    )
    assert rendered.pdf.startswith(b"%PDF-")
    assert b"USD 1,234.75" in rendered.pdf
    assert b"Render Labs" in rendered.pdf and b"2025-05" in rendered.pdf
    assert rendered.filename == f"invoice-2025-05-{invoice.id[:8]}.pdf"


async def test_an_issued_invoice_keeps_the_name_the_organization_had(
    wallet_stub: WalletServiceStub, account_stub: AccountServiceStub, new_org: NewOrg,
    spend: Spend,
) -> None:  # fmt: skip
    org = await new_org(name="Ledger Co")
    await spend(org, date(2025, 4, 2), "pod", 5 * USD)
    [invoice] = await generate(wallet_stub, "2025-04", org)
    await account_stub.UpdateOrganization(
        apb.UpdateOrganizationRequest(organization_id=str(org), name="Renamed Ltd"),
        timeout=TIMEOUT,
    )
    found = await wallet_stub.GetInvoice(pb.GetInvoiceRequest(invoice_id=invoice.id))
    assert found.organization_name == "Ledger Co"
    rendered = await wallet_stub.RenderInvoicePdf(
        pb.RenderInvoicePdfRequest(invoice_id=invoice.id), timeout=TIMEOUT
    )
    assert b"Ledger Co" in rendered.pdf and b"Renamed" not in rendered.pdf
    await spend(org, date(2025, 5, 2), "pod", 5 * USD)
    [later] = await generate(wallet_stub, "2025-05", org)
    assert later.organization_name == "Renamed Ltd"


async def test_an_invoice_is_marked_paid_once(
    wallet_stub: WalletServiceStub, new_org: NewOrg, spend: Spend
) -> None:
    org = await new_org()
    await spend(org, date(2025, 4, 2), "vm", USD)
    [invoice] = await generate(wallet_stub, "2025-04", org)
    paid = await wallet_stub.MarkInvoicePaid(
        pb.MarkInvoicePaidRequest(invoice_id=invoice.id), timeout=TIMEOUT
    )
    assert paid.status == "paid" and paid.HasField("paid_at")
    got = await wallet_stub.GetInvoice(pb.GetInvoiceRequest(invoice_id=invoice.id), timeout=TIMEOUT)
    assert got == paid
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wallet_stub.MarkInvoicePaid(
            pb.MarkInvoicePaidRequest(invoice_id=invoice.id), timeout=TIMEOUT
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already paid" in (err.value.details() or "")
    rendered = await wallet_stub.RenderInvoicePdf(
        pb.RenderInvoicePdfRequest(invoice_id=invoice.id), timeout=TIMEOUT
    )
    assert b"PAID" in rendered.pdf


async def test_another_organizations_invoice_is_not_found(
    wallet_stub: WalletServiceStub, wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    owner, other = await new_org(), await new_org()
    await founded(wallet_pool, owner, date(2024, 1, 1))
    [invoice] = await generate(wallet_stub, "2024-06", owner)
    scoped = {"invoice_id": invoice.id, "organization_id": str(other)}
    calls = [
        wallet_stub.GetInvoice(pb.GetInvoiceRequest(**scoped), timeout=TIMEOUT),
        wallet_stub.MarkInvoicePaid(pb.MarkInvoicePaidRequest(**scoped), timeout=TIMEOUT),
        wallet_stub.RenderInvoicePdf(pb.RenderInvoicePdfRequest(**scoped), timeout=TIMEOUT),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    mine = await wallet_stub.GetInvoice(
        pb.GetInvoiceRequest(invoice_id=invoice.id, organization_id=str(owner)), timeout=TIMEOUT
    )
    assert mine.status == "open"


async def test_unknown_invoices_and_organizations_are_not_found(
    wallet_stub: WalletServiceStub,
) -> None:
    unknown = str(uuid.uuid4())
    calls = [
        (
            wallet_stub.GetInvoice(pb.GetInvoiceRequest(invoice_id=unknown), timeout=TIMEOUT),
            "invoice_id",
        ),
        (
            wallet_stub.MarkInvoicePaid(
                pb.MarkInvoicePaidRequest(invoice_id=unknown), timeout=TIMEOUT
            ),
            "invoice_id",
        ),
        (
            wallet_stub.RenderInvoicePdf(
                pb.RenderInvoicePdfRequest(invoice_id=unknown), timeout=TIMEOUT
            ),
            "invoice_id",
        ),
        (
            wallet_stub.ListInvoices(
                pb.ListInvoicesRequest(organization_id=unknown), timeout=TIMEOUT
            ),
            "organization_id",
        ),
        (
            wallet_stub.GenerateInvoices(
                pb.GenerateInvoicesRequest(period="2024-01", organization_id=unknown),
                timeout=TIMEOUT,
            ),
            "organization_id",
        ),
    ]
    for call, field in calls:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_field(err.value) == field


@pytest.mark.parametrize("period", ["2025-13", "2025-3", "March 2025", "2025/03", "9999-01"])
async def test_a_bad_period_is_an_invalid_argument_naming_it(
    wallet_stub: WalletServiceStub, new_org: NewOrg, period: str
) -> None:
    org = await new_org()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await generate(wallet_stub, period, org)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_field(err.value) == "period"
    assert "period" in (err.value.details() or "")


async def test_the_current_month_cannot_be_invoiced_yet(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    org = await new_org()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await generate(wallet_stub, str(Period.of(datetime.now(UTC))), org)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_field(err.value) == "period"


@pytest.mark.parametrize("value", ["", "nope"])
async def test_a_bad_invoice_id_is_an_invalid_argument(
    wallet_stub: WalletServiceStub, value: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wallet_stub.GetInvoice(pb.GetInvoiceRequest(invoice_id=value), timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_field(err.value) == "invoice_id"


async def test_a_plan_fee_lands_on_the_plan_line(
    wallet_stub: WalletServiceStub, new_org: NewOrg, wallet_pool: AsyncConnectionPool
) -> None:
    """The plan fee goes through the ledger's rollup like any charge: resource type "plan"."""
    org = await new_org()
    await wallet_stub.Transfer(
        pb.TransferRequest(
            idempotency_key=uuid.uuid4().hex,
            organization_id=str(org),
            kind=pb.TOPUP,
            amount=Money(amount=100 * USD),
        ),
        timeout=TIMEOUT,
    )
    await wallet_stub.ChangePlan(
        pb.ChangePlanRequest(idempotency_key="p", organization_id=str(org), plan_code="premium"),
        timeout=TIMEOUT,
    )
    async with wallet_pool.connection() as conn:
        cur = await conn.execute(
            "SELECT resource_type, sum(amount) FROM daily_spend WHERE organization_id = %s"
            " GROUP BY resource_type",
            (org,),
        )
        assert dict(await cur.fetchall()) == {"plan": 49 * USD}


async def test_the_invoicing_loop_issues_last_months_invoices_once(
    wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    org = await new_org()
    first_of_month = datetime.now(UTC).date().replace(day=1)
    last_month_day = first_of_month - timedelta(days=3)
    async with wallet_pool.connection() as conn:
        await conn.execute(
            "INSERT INTO daily_spend (organization_id, day, resource_type, amount)"
            " VALUES (%s, %s, 'pod', 7000000)",
            (org, last_month_day),
        )
    wallet = Wallet(wallet_pool)
    assert await issue_last_month_invoices(wallet) >= 1
    await issue_last_month_invoices(wallet)
    async with wallet_pool.connection() as conn:
        cur = await conn.execute(
            "SELECT period, total FROM invoices WHERE organization_id = %s", (org,)
        )
        assert await cur.fetchall() == [(last_month_day.strftime("%Y-%m"), 7000000)]


async def test_a_deleted_organizations_last_month_is_invoiced_and_settled(
    wallet_stub: WalletServiceStub, account_stub: AccountServiceStub, new_org: NewOrg,
    wallet_pool: AsyncConnectionPool, spend: Spend,
) -> None:  # fmt: skip
    """Its wallet row goes with it: invoices joined it, so the month it was deleted in was
    never invoiced, and its open invoices stayed open for good."""
    from gpudeck.wallet.workers import settle_invoices

    org = await new_org(name="Gone Co", currency="INR")
    await spend(org, date(2004, 4, 20), "pod", 3 * USD)
    [april] = await generate(wallet_stub, "2004-04", org)
    assert april.status == "open"
    await account_stub.DeleteOrganization(
        apb.DeleteOrganizationRequest(organization_id=str(org), confirm_name="Gone Co")
    )
    async with wallet_pool.connection() as conn:  # as if it was deleted on 2004-05-09
        await conn.execute(
            "UPDATE organizations SET deleted_at = '2004-05-09' WHERE id = %s", (org,)
        )
    await spend(org, date(2004, 5, 8), "vm", 2 * USD)  # spent before it was deleted
    by_org = {i.organization_id: i for i in await generate(wallet_stub, "2004-05")}
    assert (by_org[str(org)].total.amount, by_org[str(org)].total.currency) == (2 * USD, "INR")
    with pytest.raises(grpc.aio.AioRpcError) as err:  # a month after it: nothing to bill
        await generate(wallet_stub, "2004-06", org)
    assert (
        err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and error_field(err.value) == "period"
    )
    await settle_invoices(Wallet(wallet_pool))  # deleted with its cash at 0: all paid
    async with wallet_pool.connection() as conn:
        cur = await conn.execute(
            "SELECT period, status FROM invoices WHERE organization_id = %s ORDER BY period", (org,)
        )
        assert await cur.fetchall() == [("2004-04", "paid"), ("2004-05", "paid")]
