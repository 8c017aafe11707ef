"""Exchange rates and conversions: rounding, the inverse direction, the missing rate, history; and
over gRPC, amounts shown in INR or USD with the rate that converted them."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from psycopg_pool import AsyncConnectionPool
from test_edges_grpc import usage_request

from gpudeck.kit.errors import FailedPrecondition, InvalidArgument
from gpudeck.proto.common.v1.money_pb2 import Money
from gpudeck.proto.wallet.v1 import wallet_pb2 as pb
from gpudeck.proto.wallet.v1.wallet_pb2_grpc import WalletServiceStub
from gpudeck.wallet import readmodels_store
from gpudeck.wallet.rates import (
    Conversion,
    ExchangeRate,
    NewRate,
    Pair,
    conversion,
    format_rate,
    parse_rate,
)

NewOrg = Callable[..., Awaitable[uuid.UUID]]
UNIT = 1_000_000
NOW = datetime(2026, 3, 1, tzinfo=UTC)


def stored(base: str, quote: str, rate: str, rate_id: int = 1) -> ExchangeRate:
    return ExchangeRate(rate_id, base, quote, Decimal(rate), NOW)


def test_the_direct_rate_multiplies_and_rounds_half_up() -> None:
    c = conversion("USD", "INR", {("USD", "INR"): stored("USD", "INR", "83.25")})
    assert not c.inverse
    assert c.apply(12_500_000) == 1_040_625_000
    # 0.000001 USD * 83.25 = 83.25 micro-INR → 83; 0.000002 USD → 166.5 → 167 (half up).
    assert c.apply(1) == 83
    assert c.apply(2) == 167
    assert c.apply(-2) == -167  # half away from zero


def test_only_the_other_direction_stored_divides_and_says_so() -> None:
    c = conversion("INR", "USD", {("USD", "INR"): stored("USD", "INR", "83.25")})
    assert c.inverse and c.rate is not None and c.rate.base == "USD"
    assert c.apply(1000 * UNIT) == 12_012_012  # 1000 / 83.25 = 12.012012012…
    assert c.apply(4_162_500) == 50_000  # exact
    assert c.factor == Decimal("0.012012012012")


def test_at_the_same_time_the_rate_stored_last_wins() -> None:
    latest = {
        ("INR", "USD"): stored("INR", "USD", "0.0125", 2),
        ("USD", "INR"): stored("USD", "INR", "83.25", 1),
    }
    c = conversion("INR", "USD", latest)
    assert not c.inverse and c.rate is not None and c.rate.id == 2
    assert c.apply(80 * UNIT) == 1 * UNIT


def test_a_newer_rate_of_the_other_direction_wins_over_an_old_direct_one() -> None:
    old = ExchangeRate(1, "INR", "USD", Decimal("0.01"), NOW - timedelta(days=365))
    latest = {("INR", "USD"): old, ("USD", "INR"): stored("USD", "INR", "83", 2)}
    c = conversion("INR", "USD", latest)
    assert c.inverse and c.rate is not None and c.rate.id == 2
    assert c.apply(8300 * UNIT) == 100 * UNIT


def test_a_top_up_amount_is_the_payment_times_the_rate_it_records() -> None:
    """Displays divide exactly by an inverse rate; a top-up multiplies by the factor its
    transaction records, so the record reproduces the amount."""
    inverse = conversion("INR", "USD", {("USD", "INR"): stored("USD", "INR", "83", 1)})
    paid = 100_000_000 * UNIT
    assert inverse.factor == Decimal("0.012048192771")
    assert inverse.apply(paid) == 1_204_819_277_108  # 1e14 / 83, to the micro-unit
    assert inverse.apply_factor(paid) == 1_204_819_277_100 == paid * inverse.factor
    direct = conversion("USD", "INR", {("USD", "INR"): stored("USD", "INR", "83.25", 1)})
    assert direct.apply_factor(12_500_000) == direct.apply(12_500_000) == 1_040_625_000


def test_the_same_currency_converts_nothing() -> None:
    c = conversion("USD", "USD", {})
    assert c == Conversion("USD", "USD") and not c.converts
    assert c.apply(123) == 123


def test_a_missing_rate_names_the_pair() -> None:
    with pytest.raises(FailedPrecondition) as err:
        conversion("USD", "INR", {})
    assert "USD and INR" in err.value.message


@pytest.mark.parametrize(
    "text", ["0", "-1", "abc", "NaN", "1e12", "1.0000000000001", "1_000", "\uff18\uff13", ""]
)
def test_bad_rates_are_refused(text: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_rate(text)
    assert err.value.field == "rate"


def test_rates_print_without_trailing_zeros() -> None:
    assert format_rate(Decimal("83.250000000000")) == "83.25"
    assert format_rate(Decimal("83.000000000000")) == "83"
    assert format_rate(Decimal("0.012000000000")) == "0.012"


class StaticRates:
    """A RateProvider for tests: quotes fixed rates."""

    name = "static-feed"

    def __init__(self, rates: dict[Pair, str]) -> None:
        self.rates = rates

    async def fetch(self, pairs: Sequence[Pair]) -> Sequence[NewRate]:
        return [NewRate(b, q, Decimal(self.rates[(b, q)])) for b, q in pairs]

    def stored(self) -> None:
        pass


async def test_a_provider_s_rates_are_stored_with_its_name(
    wallet_pool: AsyncConnectionPool,
) -> None:
    async with wallet_pool.connection() as conn, conn.transaction():
        [rate] = await readmodels_store.import_rates(
            conn, StaticRates({("USD", "INR"): "84.5"}), [("USD", "INR")]
        )
        assert rate.source == "static-feed" and rate.rate == Decimal("84.5")
        await conn.execute("DELETE FROM exchange_rates WHERE id = %s", (rate.id,))


# ------------------------------------------------------------------ over gRPC


def ts(value: datetime) -> Timestamp:
    t = Timestamp()
    t.FromDatetime(value)
    return t


async def set_rate(
    stub: WalletServiceStub, base: str, quote: str, rate: str, as_of: datetime | None = None
) -> pb.ExchangeRate:
    request = pb.SetExchangeRateRequest(base=base, quote=quote, rate=rate)
    if as_of is not None:
        request.as_of.CopyFrom(ts(as_of))
    return await stub.SetExchangeRate(request, timeout=5)


async def clear_rates(pool: AsyncConnectionPool) -> None:
    async with pool.connection() as conn:
        await conn.execute("DELETE FROM exchange_rates")


async def top_up(stub: WalletServiceStub, org: uuid.UUID, amount: int) -> None:
    await stub.Transfer(
        pb.TransferRequest(
            idempotency_key=uuid.uuid4().hex,
            organization_id=str(org),
            kind=pb.TOPUP,
            amount=Money(amount=amount),
        ),
        timeout=5,
    )


async def test_the_summary_in_inr_says_which_rate_converted_it(
    wallet_stub: WalletServiceStub, wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    await clear_rates(wallet_pool)
    org = await new_org("USD")
    await top_up(wallet_stub, org, 82_500_000)
    rate = await set_rate(wallet_stub, "USD", "INR", "83.25")
    assert (rate.base, rate.quote, rate.rate, rate.source) == ("USD", "INR", "83.25", "admin")
    s = await wallet_stub.GetWalletSummary(
        pb.GetWalletSummaryRequest(organization_id=str(org), display_currency="inr"), timeout=5
    )
    assert (s.currency, s.wallet_currency) == ("INR", "USD")
    assert s.balance == Money(amount=6_868_125_000, currency="INR")  # 82.5 * 83.25
    assert s.spendable.amount == 6_868_125_000 and s.held_balance.amount == 0
    assert (s.conversion.base, s.conversion.quote, s.conversion.rate) == ("USD", "INR", "83.25")
    assert s.conversion.rate_id == rate.id
    plain = await wallet_stub.GetWalletSummary(
        pb.GetWalletSummaryRequest(organization_id=str(org)), timeout=5
    )
    assert plain.balance == Money(amount=82_500_000, currency="USD")
    assert not plain.HasField("conversion")


async def test_an_inr_wallet_shown_in_usd_uses_the_inverse_rate(
    wallet_stub: WalletServiceStub, wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    await clear_rates(wallet_pool)
    org = await new_org("INR")
    await top_up(wallet_stub, org, 1000 * UNIT)
    rate = await set_rate(wallet_stub, "USD", "INR", "83.25")
    e = await wallet_stub.GetWalletSummary(
        pb.GetWalletSummaryRequest(organization_id=str(org), display_currency="USD"), timeout=5
    )
    assert e.balance == Money(amount=12_012_012, currency="USD")
    # The stored USD→INR rate was used backwards: its base is the display currency.
    assert (e.conversion.base, e.conversion.quote, e.conversion.rate_id) == ("USD", "INR", rate.id)


async def test_the_newest_rate_wins_and_history_is_kept(
    wallet_stub: WalletServiceStub, wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    await clear_rates(wallet_pool)
    org = await new_org("USD")
    await top_up(wallet_stub, org, 2 * UNIT)
    now = datetime.now(UTC)
    newest = await set_rate(wallet_stub, "USD", "INR", "84", now - timedelta(hours=1))
    await set_rate(wallet_stub, "USD", "INR", "80", now - timedelta(days=2))  # late, but older
    s = await wallet_stub.GetWalletSummary(
        pb.GetWalletSummaryRequest(organization_id=str(org), display_currency="INR"), timeout=5
    )
    assert s.balance.amount == 168 * UNIT and s.conversion.rate_id == newest.id
    listed = await wallet_stub.ListExchangeRates(
        pb.ListExchangeRatesRequest(base="USD", quote="INR"), timeout=5
    )
    assert [r.rate for r in listed.rates] == ["84", "80"]


async def test_no_rate_for_the_pair_is_a_failed_precondition_naming_it(
    wallet_stub: WalletServiceStub, wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    await clear_rates(wallet_pool)
    org = await new_org("USD")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wallet_stub.GetExpenditure(
            pb.GetExpenditureRequest(organization_id=str(org), display_currency="INR"), timeout=5
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "USD and INR" in (err.value.details() or "")


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.SetExchangeRateRequest(base="USD", quote="INR", rate="-1"), "rate"),
        (pb.SetExchangeRateRequest(base="EUR", quote="INR", rate="90"), "base"),
        (pb.SetExchangeRateRequest(base="USD", quote="USD", rate="1"), "quote"),
    ],
)
async def test_bad_exchange_rates_name_the_field(
    wallet_stub: WalletServiceStub, request_: pb.SetExchangeRateRequest, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wallet_stub.SetExchangeRate(request_, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ("x-error-field", field) in list(err.value.trailing_metadata() or ())


async def test_an_unknown_display_currency_is_invalid(
    wallet_stub: WalletServiceStub, new_org: NewOrg
) -> None:
    org = await new_org("USD")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wallet_stub.GetWalletSummary(
            pb.GetWalletSummaryRequest(organization_id=str(org), display_currency="EUR"),
            timeout=5,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "display_currency" in (err.value.details() or "")


async def test_a_top_up_too_large_once_converted_says_so_in_both_currencies(
    wallet_stub: WalletServiceStub, wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    await clear_rates(wallet_pool)
    org = await new_org("INR")
    await set_rate(wallet_stub, "USD", "INR", "83.25")
    paid = 100_000_000 * UNIT  # 1e8 USD: within the limit, but 8.325e9 INR is not
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wallet_stub.Transfer(
            pb.TransferRequest(
                idempotency_key=uuid.uuid4().hex,
                organization_id=str(org),
                kind=pb.TOPUP,
                amount=Money(amount=paid, currency="USD"),
            ),
            timeout=5,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    message = err.value.details() or ""
    assert "100000000.000000 USD is 8325000000.000000 INR" in message, message
    assert "at most 1000000000.000000 INR" in message, message
    s = await wallet_stub.GetWalletSummary(
        pb.GetWalletSummaryRequest(organization_id=str(org)), timeout=5
    )
    assert s.balance.amount == 0


async def test_a_rate_dated_in_the_future_waits_for_its_time(
    wallet_stub: WalletServiceStub, wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    await clear_rates(wallet_pool)
    now = datetime.now(UTC)
    scheduled = await set_rate(wallet_stub, "USD", "INR", "90", now + timedelta(days=30))
    current = await set_rate(wallet_stub, "USD", "INR", "83")
    org = await new_org("INR")
    topped = await wallet_stub.Transfer(
        pb.TransferRequest(
            idempotency_key=uuid.uuid4().hex,
            organization_id=str(org),
            kind=pb.TOPUP,
            amount=Money(amount=1 * UNIT, currency="USD"),
        ),
        timeout=5,
    )
    assert topped.exchange_rate.rstrip("0").rstrip(".") == "83", topped.exchange_rate
    s = await wallet_stub.GetWalletSummary(
        pb.GetWalletSummaryRequest(organization_id=str(org), display_currency="USD"), timeout=5
    )
    assert s.conversion.rate_id == current.id
    listed = await wallet_stub.ListExchangeRates(
        pb.ListExchangeRatesRequest(base="USD", quote="INR"), timeout=5
    )
    assert [r.id for r in listed.rates] == [scheduled.id, current.id]  # history shows both


async def test_a_top_up_converts_at_the_newest_rate_of_either_direction(
    wallet_stub: WalletServiceStub, wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    """A year-old INR → USD rate does not beat today's USD → INR one; the transaction records the
    rate it used (the inverse, to 12 places), and payment × that rate is its amount."""
    await clear_rates(wallet_pool)
    await set_rate(wallet_stub, "INR", "USD", "0.01", datetime.now(UTC) - timedelta(days=365))
    await set_rate(wallet_stub, "USD", "INR", "83")
    org = await new_org("USD")
    paid = Money(amount=100_000_000 * UNIT, currency="INR")
    topped = await wallet_stub.Transfer(
        pb.TransferRequest(
            idempotency_key=uuid.uuid4().hex, organization_id=str(org), kind=pb.TOPUP, amount=paid
        ),
        timeout=5,
    )
    # 1 / 83 = 0.012048192771 08…, recorded to 12 places; the amount is payment × that.
    assert topped.exchange_rate == "0.012048192771"
    assert topped.amount.amount == 1_204_819_277_100
    shown = await wallet_stub.GetWalletSummary(
        pb.GetWalletSummaryRequest(organization_id=str(org), display_currency="INR"), timeout=5
    )
    assert shown.conversion.rate == "83"
    await clear_rates(wallet_pool)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wallet_stub.Transfer(
            pb.TransferRequest(
                idempotency_key=uuid.uuid4().hex, organization_id=str(org), kind=pb.TOPUP,
                amount=paid,
            ),
            timeout=5,
        )  # fmt: skip
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    metadata = dict(err.value.trailing_metadata() or ())
    assert metadata.get("x-error-reason") == "EXCHANGE_RATE_MISSING"
    assert metadata.get("x-error-field") == "currency"


async def test_usage_records_in_another_currency_convert_their_unit_price_too(
    wallet_stub: WalletServiceStub, wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    await clear_rates(wallet_pool)
    org = await new_org("USD")
    await set_rate(wallet_stub, "USD", "INR", "83.25")
    await wallet_stub.RecordUsage(
        usage_request(org, quantity=1_000_000.0, unit_price=2 * UNIT), timeout=5
    )
    shown = await wallet_stub.GetUsageAnalytics(
        pb.GetUsageAnalyticsRequest(organization_id=str(org), display_currency="INR"), timeout=5
    )
    [record] = shown.recent
    assert record.cost == Money(amount=166_500_000, currency="INR")
    assert record.unit_price == 166_500_000  # 2 USD per million, in INR like the cost


async def test_a_converted_card_adds_up_and_an_amount_too_large_to_show_is_named(
    wallet_stub: WalletServiceStub, wallet_pool: AsyncConnectionPool, new_org: NewOrg
) -> None:
    await clear_rates(wallet_pool)
    await set_rate(wallet_stub, "USD", "INR", "83")
    org = await new_org("INR")
    await top_up(wallet_stub, org, 100)  # 100 micro-INR
    await wallet_stub.CreateHold(
        pb.CreateHoldRequest(
            idempotency_key=uuid.uuid4().hex, organization_id=str(org), amount=50,
            timeout_seconds=60,
        ),
        timeout=5,
    )  # fmt: skip
    request = pb.GetWalletSummaryRequest(organization_id=str(org), display_currency="USD")
    s = await wallet_stub.GetWalletSummary(request, timeout=5)
    # 100 / 83 → 1 and 50 / 83 → 1 micro-USD: spendable is what the card shows less what it holds
    assert (s.balance.amount, s.held_balance.amount, s.spendable.amount) == (1, 1, 0)

    await clear_rates(wallet_pool)
    await set_rate(wallet_stub, "USD", "INR", "0.000000000001")  # 1 INR = 1e12 USD
    await top_up(wallet_stub, org, 10_000 * UNIT)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wallet_stub.GetWalletSummary(request, timeout=5)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    metadata = dict(err.value.trailing_metadata() or ())
    assert metadata.get("x-error-field") == "display_currency"
    assert metadata.get("x-error-reason") == "AMOUNT_TOO_LARGE"
    await clear_rates(wallet_pool)
