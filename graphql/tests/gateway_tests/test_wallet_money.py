"""Money through the gateway, against the real wallet: top-ups, exact decimal strings, bad
amounts, insufficient funds, idempotency, spending, billing, plans, credits, thresholds,
display currencies, invoices as PDF."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import ROUND_HALF_UP, Decimal

import psycopg
import pytest

from gpudeck.proto.common.v1 import money_pb2
from gpudeck.proto.wallet.v1 import wallet_pb2

TOP_UP = """mutation($org: ID!, $amount: String!, $currency: String!, $key: String!) {
  topUpWallet(organizationId: $org, amount: $amount, currency: $currency, idempotencyKey: $key) {
    transaction { id kind amount { amount currency } paymentAmount { amount currency } }
    wallet { balance { amount currency } spendable { amount } }
  }
}"""

WALLET = """query($id: ID!, $display: String) {
  organization(id: $id, displayCurrency: $display) {
    wallet {
      currency balance { amount currency } heldBalance { amount currency }
      spendable { amount currency } credits { amount }
      runRate { perHour { amount currency } perDay { amount } perMonth { amount }
                byResourceType { resourceType perHour { amount } } }
      hoursRemaining serviceStatus
      conversion { base quote rate asOf }
    }
  }
}"""


async def top_up(gql, org, amount: str, key: str, currency: str = "USD") -> dict:
    variables = {"org": org.id, "amount": amount, "currency": currency, "key": key}
    return (await gql.data(TOP_UP, variables, token=org.token))["topUpWallet"]


async def charge(wallet_stubs, org, micro: int, *, resource_type: str = "pod") -> None:
    await wallet_stubs.wallet.Transfer(
        wallet_pb2.TransferRequest(
            idempotency_key=f"charge-{org.id}-{micro}-{resource_type}",
            organization_id=org.id,
            kind=wallet_pb2.CHARGE,
            amount=money_pb2.Money(amount=micro, currency=""),
            resource_type=resource_type,
            resource_id=f"{resource_type}-1",
            description="test charge",
        )
    )


async def test_the_wallet_after_a_top_up_in_exact_decimal_strings(gql, new_org) -> None:
    org = await new_org()
    topped = await top_up(gql, org, "12.5", "first")
    assert topped["transaction"]["kind"] == "TOPUP"
    assert topped["transaction"]["amount"] == {"amount": "12.500000", "currency": "USD"}
    assert topped["wallet"]["balance"] == {"amount": "12.500000", "currency": "USD"}
    await top_up(gql, org, "0.000001", "second")
    wallet = (await gql.data(WALLET, {"id": org.id}, token=org.token))["organization"]["wallet"]
    by_type = wallet["runRate"].pop("byResourceType")
    assert {t["perHour"]["amount"] for t in by_type} <= {"0.000000"}
    assert wallet == {
        "currency": "USD",
        "balance": {"amount": "12.500001", "currency": "USD"},
        "heldBalance": {"amount": "0.000000", "currency": "USD"},
        "spendable": {"amount": "12.500001", "currency": "USD"},
        "credits": {"amount": "0.000000"},
        "runRate": {
            "perHour": {"amount": "0.000000", "currency": "USD"},
            "perDay": {"amount": "0.000000"},
            "perMonth": {"amount": "0.000000"},
        },
        "hoursRemaining": None,
        "serviceStatus": "available",
        "conversion": None,
    }


async def test_a_retried_top_up_is_applied_once_and_a_reused_key_conflicts(gql, new_org) -> None:
    org = await new_org()
    first = await top_up(gql, org, "5", "pay-1")
    again = await top_up(gql, org, "5", "pay-1")
    assert again["transaction"]["id"] == first["transaction"]["id"]
    assert again["wallet"]["balance"]["amount"] == "5.000000"
    variables = {"org": org.id, "amount": "6", "currency": "USD", "key": "pay-1"}
    error = await gql.error(TOP_UP, variables, token=org.token)
    assert error["extensions"]["code"] == "CONFLICT"
    assert error["extensions"]["reason"] == "IDEMPOTENCY_KEY_REUSED"


@pytest.mark.parametrize(
    "amount",
    [
        "-5",
        "0",
        "0.000000",
        "1.1234567",
        "1e3",
        "12,5",
        "abc",
        "",
        "NaN",
        "1000000001",
        "99999999999999999999999",
    ],
)
async def test_a_bad_amount_is_bad_user_input_naming_the_field(gql, new_org, amount: str) -> None:
    org = await new_org()
    variables = {"org": org.id, "amount": amount, "currency": "USD", "key": "bad"}
    error = await gql.error(TOP_UP, variables, token=org.token)
    assert error["extensions"] == {"code": "BAD_USER_INPUT", "field": "amount"}
    assert error["message"].startswith("amount ")


async def test_an_unknown_currency_is_bad_user_input(gql, new_org) -> None:
    org = await new_org()
    variables = {"org": org.id, "amount": "1", "currency": "EUR", "key": "eur"}
    error = await gql.error(TOP_UP, variables, token=org.token)
    assert error["extensions"]["code"] == "BAD_USER_INPUT"
    assert "currency" in error["message"]


CHANGE_PLAN = """mutation($org: ID!, $plan: String!) {
  changePlan(organizationId: $org, planCode: $plan) {
    plan { code name monthlyFee { amount } includedCredits { amount } availableCredits { amount } }
    previousPlanCode charged { amount } creditsGranted { amount }
  }
}"""


async def test_an_upgrade_with_an_empty_wallet_is_insufficient_funds(gql, new_org) -> None:
    org = await new_org()
    error = await gql.error(CHANGE_PLAN, {"org": org.id, "plan": "premium"}, token=org.token)
    assert error["extensions"]["code"] == "INSUFFICIENT_FUNDS"
    assert error["extensions"]["reason"] == "INSUFFICIENT_FUNDS"
    plan = await gql.data(
        "query($id: ID!) { organization(id: $id) { plan { code name } } }",
        {"id": org.id},
        token=org.token,
    )
    assert plan["organization"]["plan"] == {"code": "standard", "name": "Standard"}


async def test_an_upgrade_charges_the_fee_and_grants_the_credits(gql, new_org) -> None:
    org = await new_org()
    await top_up(gql, org, "1000", "plan-money")
    changed = (await gql.data(CHANGE_PLAN, {"org": org.id, "plan": "premium"}, token=org.token))[
        "changePlan"
    ]
    assert changed["plan"]["name"] == "Premium"
    assert changed["previousPlanCode"] == "standard"
    assert changed["charged"] == changed["plan"]["monthlyFee"]
    assert changed["creditsGranted"] == changed["plan"]["includedCredits"]
    card = await gql.data(
        "query($id: ID!) { organization(id: $id) { plan { name availableCredits { amount } }"
        " availablePlans { code } } }",
        {"id": org.id},
        token=org.token,
    )
    assert card["organization"]["plan"]["name"] == "Premium"
    assert card["organization"]["plan"]["availableCredits"] == changed["plan"]["includedCredits"]
    codes = [p["code"] for p in card["organization"]["availablePlans"]]
    assert codes == ["standard", "premium", "enterprise"]


async def test_the_plan_card_lists_each_grant_of_credits_and_when_the_plan_renews(
    gql, new_org
) -> None:
    org = await new_org()
    await top_up(gql, org, "1000", "grants-money")
    changed = await gql.data(
        """mutation($org: ID!) { changePlan(organizationId: $org, planCode: "premium") {
          plan { renewsOn creditGrants { source } } } }""",
        {"org": org.id},
        token=org.token,
    )
    today = datetime.now(UTC).date()
    next_month = date(today.year + today.month // 12, today.month % 12 + 1, 1)
    assert changed["changePlan"]["plan"] == {
        "renewsOn": next_month.isoformat(), "creditGrants": [{"source": "plan"}],
    }  # fmt: skip
    await gql.data(
        'mutation($org: ID!) { addCredits(organizationId: $org, amount: "5", '
        'idempotencyKey: "grants-1", expiresAt: "2099-01-01T00:00:00Z") { availableCredits '
        "{ amount } } }",
        {"org": org.id},
        token=org.token,
    )
    card = await gql.data(
        "query($id: ID!) { organization(id: $id) { plan { creditGrants { available { amount }"
        " source expiresAt grantedAt } } } }",
        {"id": org.id},
        token=org.token,
    )
    grants = card["organization"]["plan"]["creditGrants"]
    assert [g["source"] for g in grants] == ["plan", "purchase"]  # the first to expire first
    assert grants[0]["expiresAt"].startswith(next_month.isoformat())
    assert grants[1] == {
        "available": {"amount": "5.000000"}, "source": "purchase",
        "expiresAt": "2099-01-01T00:00:00+00:00", "grantedAt": grants[1]["grantedAt"],
    }  # fmt: skip
    assert grants[1]["grantedAt"] is not None


async def test_a_charge_above_the_balance_is_insufficient_funds(gql, new_org, wallet_stubs) -> None:
    """The same code from a charge through gRPC, as a service would make it."""
    import grpc

    org = await new_org()
    await top_up(gql, org, "1", "small")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await charge(wallet_stubs, org, 2_000_000)
    from gpudeck.gateway.errors import rpc_code

    assert rpc_code(raised.value) == "INSUFFICIENT_FUNDS"


async def test_credits_bought_show_on_the_plan_card(gql, new_org) -> None:
    org = await new_org()
    bought = await gql.data(
        'mutation($org: ID!) { addCredits(organizationId: $org, amount: "3.25", '
        'idempotencyKey: "credits-1") { transaction { kind amount { amount } } '
        "availableCredits { amount currency } } }",
        {"org": org.id},
        token=org.token,
    )
    assert bought["addCredits"]["transaction"]["kind"] == "CREDIT_GRANT"
    assert bought["addCredits"]["availableCredits"] == {"amount": "3.250000", "currency": "USD"}
    card = await gql.data(
        "query($id: ID!) { organization(id: $id) { plan { availableCredits { amount } } "
        "wallet { balance { amount } credits { amount } } } }",
        {"id": org.id},
        token=org.token,
    )
    assert card["organization"]["plan"]["availableCredits"]["amount"] == "3.250000"
    assert card["organization"]["wallet"]["balance"]["amount"] == "3.250000"


async def test_spending_billing_and_transactions_after_charges(gql, new_org, wallet_stubs) -> None:
    org = await new_org()
    await top_up(gql, org, "100", "spend")
    await charge(wallet_stubs, org, 2_500_000, resource_type="pod")
    await charge(wallet_stubs, org, 1_000_000, resource_type="vm")
    query = """query($id: ID!) { organization(id: $id) {
          expenditure { currentPeriod { amount } last7Days { total { amount } changePercent }
                        last30Days { amount } lastMonth { total { amount } changePercent } }
          spendingTrend(days: 7) { date total { amount } byResourceType { resourceType amount { amount } } }
          billing { currentMonthTotal { amount currency } lastMonthTotal { amount }
                    trendPercent nextInvoiceDate invoices { id } }
          transactions(first: 10) { kind amount { amount } balanceChange { amount } resourceType
                                     balanceAfter { amount } }
          charges: transactions(first: 10, kinds: [CHARGE]) { amount { amount } }
        } }"""
    data = (await gql.data(query, {"id": org.id}, token=org.token))["organization"]
    spent = data["expenditure"]
    assert spent["currentPeriod"]["amount"] == "3.500000"
    assert spent["last7Days"] == {"total": {"amount": "3.500000"}, "changePercent": None}
    assert spent["last30Days"]["amount"] == "3.500000"
    assert spent["lastMonth"] == {"total": {"amount": "0.000000"}, "changePercent": None}
    trend = data["spendingTrend"]
    assert len(trend) == 7
    assert trend[-1]["total"]["amount"] == "3.500000"
    today = {t["resourceType"]: t["amount"]["amount"] for t in trend[-1]["byResourceType"]}
    assert {k: v for k, v in today.items() if v != "0.000000"} == {
        "pod": "2.500000",
        "vm": "1.000000",
    }
    billing = data["billing"]
    assert billing["currentMonthTotal"] == {"amount": "3.500000", "currency": "USD"}
    assert billing["lastMonthTotal"]["amount"] == "0.000000"
    assert billing["trendPercent"] is None
    assert billing["nextInvoiceDate"].endswith("-01")
    assert [t["kind"] for t in data["transactions"]] == ["CHARGE", "CHARGE", "TOPUP"]
    assert data["transactions"][0]["balanceAfter"]["amount"] == "96.500000"
    changes = [t["balanceChange"]["amount"] for t in data["transactions"]]
    assert changes == ["-1.000000", "-2.500000", "100.000000"]  # each after the one below it
    assert [c["amount"]["amount"] for c in data["charges"]] == ["1.000000", "2.500000"]


async def test_one_transaction_says_what_it_took_from_credits_and_from_cash(
    gql, new_org, wallet_stubs
) -> None:
    org, other = await new_org(), await new_org()
    paid = await wallet_stubs.wallet.Transfer(
        wallet_pb2.TransferRequest(
            idempotency_key="paid-1", organization_id=org.id, kind=wallet_pb2.TOPUP,
            amount=money_pb2.Money(amount=10_000_000), reference="pay_123",
        )
    )  # fmt: skip
    await wallet_stubs.wallet.Transfer(
        wallet_pb2.TransferRequest(
            idempotency_key="promo-1", organization_id=org.id, kind=wallet_pb2.CREDIT_GRANT,
            amount=money_pb2.Money(amount=3_000_000), credit_source="promotion",
        )
    )  # fmt: skip
    charged = await wallet_stubs.wallet.Transfer(
        wallet_pb2.TransferRequest(
            idempotency_key="charge-1", organization_id=org.id, kind=wallet_pb2.CHARGE,
            amount=money_pb2.Money(amount=5_000_000), resource_type="pod",
        )
    )  # fmt: skip
    query = """query($org: ID!, $tx: ID!) { organization(id: $org) { transaction(id: $tx) {
      kind reference balanceChange { amount } creditsChange { amount } cashChange { amount } } } }"""
    one = await gql.data(query, {"org": org.id, "tx": charged.id}, token=org.token)
    assert one["organization"]["transaction"] == {
        "kind": "CHARGE", "reference": "", "balanceChange": {"amount": "-5.000000"},
        "creditsChange": {"amount": "-3.000000"}, "cashChange": {"amount": "-2.000000"},
    }  # fmt: skip
    topped = await gql.data(query, {"org": org.id, "tx": paid.id}, token=org.token)
    assert topped["organization"]["transaction"]["reference"] == "pay_123"
    assert topped["organization"]["transaction"]["cashChange"] == {"amount": "10.000000"}
    error = await gql.error(query, {"org": other.id, "tx": charged.id}, token=other.token)
    assert error["extensions"] == {"code": "NOT_FOUND", "field": "id"}


async def test_the_held_balance_is_listed_hold_by_hold(gql, new_org, wallet_stubs) -> None:
    org = await new_org()
    await top_up(gql, org, "100", "holds-money")
    made = []
    for amount, resource in ((7_000_000, "pod-a"), (5_500_000, "pod-b"), (1_000_000, "pod-c")):
        made.append(
            await wallet_stubs.wallet.CreateHold(
                wallet_pb2.CreateHoldRequest(
                    idempotency_key=f"hold-{org.id}-{resource}", organization_id=org.id,
                    amount=amount, timeout_seconds=600, description="Pod start",
                    resource_type="pod", resource_id=resource,
                )
            )
        )  # fmt: skip
    await wallet_stubs.wallet.VoidHold(
        wallet_pb2.VoidHoldRequest(idempotency_key="void-c", hold_id=made[2].id)
    )
    data = await gql.data(
        "query($id: ID!) { organization(id: $id) { wallet { heldBalance { amount } }"
        " holds { id amount { amount currency } resourceType resourceId description expiresAt } } }",
        {"id": org.id},
        token=org.token,
    )
    holds = data["organization"]["holds"]
    assert [h["resourceId"] for h in holds] == ["pod-b", "pod-a"]  # open ones, newest first
    assert holds[0]["amount"] == {"amount": "5.500000", "currency": "USD"}
    assert holds[0]["resourceType"] == "pod" and holds[0]["description"] == "Pod start"
    assert holds[0]["expiresAt"] is not None
    assert data["organization"]["wallet"]["heldBalance"]["amount"] == "12.500000"
    error = await gql.error(
        "query($id: ID!) { organization(id: $id) { holds(first: 0) { id } } }",
        {"id": org.id},
        token=org.token,
    )
    assert (
        error["extensions"]["code"] == "BAD_USER_INPUT" and error["extensions"]["field"] == "first"
    )


async def test_cost_per_resource_since_it_was_created(gql, new_org, wallet_stubs) -> None:
    org = await new_org()
    await top_up(gql, org, "100", "costs")
    await charge(wallet_stubs, org, 2_500_000, resource_type="pod")
    await charge(wallet_stubs, org, 1_500_000, resource_type="pod")
    await charge(wallet_stubs, org, 1_000_000, resource_type="vm")
    query = """query($id: ID!, $ids: [String!]) { organization(id: $id) {
          resourceCosts(resourceIds: $ids) { resources { resourceId resourceType
            total { amount currency } firstChargedAt lastChargedAt } conversion { rate } } } }"""
    data = await gql.data(query, {"id": org.id}, token=org.token)
    costs = data["organization"]["resourceCosts"]
    by_id = {r["resourceId"]: r for r in costs["resources"]}
    assert {k: (r["resourceType"], r["total"]["amount"]) for k, r in by_id.items()} == {
        "pod-1": ("pod", "4.000000"),
        "vm-1": ("vm", "1.000000"),
    }
    assert by_id["pod-1"]["firstChargedAt"] <= by_id["pod-1"]["lastChargedAt"]
    assert costs["conversion"] is None
    only = await gql.data(query, {"id": org.id, "ids": ["vm-1"]}, token=org.token)
    assert [r["resourceId"] for r in only["organization"]["resourceCosts"]["resources"]] == ["vm-1"]


async def test_a_trend_of_zero_days_is_bad_user_input(gql, new_org) -> None:
    org = await new_org()
    error = await gql.error(
        "query($id: ID!) { organization(id: $id) { spendingTrend(days: 0) { date } } }",
        {"id": org.id},
        token=org.token,
    )
    assert error["extensions"] == {"code": "BAD_USER_INPUT", "field": "days"}


def _converted(amount: str, rate: str, *, divide: bool = False) -> str:
    micro = Decimal(amount) * 1_000_000
    value = micro / Decimal(rate) if divide else micro * Decimal(rate)
    whole = int(value.quantize(Decimal(1), rounding=ROUND_HALF_UP))
    return f"{whole // 1_000_000}.{whole % 1_000_000:06d}"


async def test_amounts_in_a_display_currency_say_which_rate(gql, new_org, wallet_stubs) -> None:
    rate = await wallet_stubs.wallet.SetExchangeRate(
        wallet_pb2.SetExchangeRateRequest(base="USD", quote="INR", rate="83.25", source="test")
    )
    usd, inr = await new_org("USD"), await new_org("INR")
    await top_up(gql, usd, "10.5", "usd-money")
    await top_up(gql, inr, "1000", "inr-money", currency="INR")

    shown = await gql.data(WALLET, {"id": usd.id, "display": "INR"}, token=usd.token)
    wallet = shown["organization"]["wallet"]
    assert wallet["currency"] == "INR"
    assert wallet["balance"] == {"amount": _converted("10.5", "83.25"), "currency": "INR"}
    assert wallet["balance"]["amount"] == "874.125000"
    assert wallet["conversion"]["base"] == "USD" and wallet["conversion"]["quote"] == "INR"
    assert wallet["conversion"]["rate"] == rate.rate == "83.25"
    assert wallet["conversion"]["asOf"]

    query = """query($id: ID!) { organization(id: $id, displayCurrency: "usd") {
        conversion { base quote rate }
        wallet { balance { amount currency } }
        expenditure { currentPeriod { currency } conversion { rate } }
        plan { monthlyFee { currency } availableCredits { amount currency } }
        billing { currentMonthTotal { currency } conversion { rate } }
        availablePlans { code monthlyFee { currency } conversion { rate } }
    } }"""
    shown = (await gql.data(query, {"id": inr.id}, token=inr.token))["organization"]
    for option in shown["availablePlans"]:  # the catalog's fees, converted, say at what rate
        assert option["monthlyFee"]["currency"] == "USD", option
        assert option["conversion"] == {"rate": "83.25"}, option
    assert shown["conversion"] == {"base": "USD", "quote": "INR", "rate": "83.25"}
    expected = _converted("1000", "83.25", divide=True)
    assert shown["wallet"]["balance"] == {"amount": expected, "currency": "USD"}
    assert shown["expenditure"] == {
        "currentPeriod": {"currency": "USD"},
        "conversion": {"rate": "83.25"},
    }
    assert shown["plan"]["monthlyFee"]["currency"] == "USD"
    assert shown["plan"]["availableCredits"] == {"amount": "0.000000", "currency": "USD"}
    assert shown["billing"]["currentMonthTotal"]["currency"] == "USD"

    same = await gql.data(WALLET, {"id": usd.id, "display": "USD"}, token=usd.token)
    assert same["organization"]["wallet"]["conversion"] is None
    plans = await gql.data(
        "query($id: ID!) { organization(id: $id) { availablePlans { conversion { rate } } } }",
        {"id": usd.id},
        token=usd.token,
    )
    assert {p["conversion"] is None for p in plans["organization"]["availablePlans"]} == {True}


async def test_a_converted_trend_and_breakdown_say_which_rate(gql, new_org, wallet_stubs) -> None:
    """Each day and month shown in a display currency names the rate it was converted with, as
    every other converted amount does; none without a display currency."""
    rate = await wallet_stubs.wallet.SetExchangeRate(
        wallet_pb2.SetExchangeRateRequest(base="USD", quote="INR", rate="83.25", source="test")
    )
    org = await new_org("USD")
    await top_up(gql, org, "10", "trend-money")
    await charge(wallet_stubs, org, 2_000_000)
    query = """query($id: ID!, $display: String) {
      organization(id: $id, displayCurrency: $display) {
        spendingTrend(days: 2) { total { amount currency } conversion { base quote rate rateId } }
        monthlyBreakdown(months: 1) { total { currency } conversion { base quote rate rateId } }
    } }"""
    shown = (await gql.data(query, {"id": org.id, "display": "INR"}, token=org.token))[
        "organization"
    ]
    used = {"base": "USD", "quote": "INR", "rate": "83.25", "rateId": str(rate.id)}
    assert [day["conversion"] for day in shown["spendingTrend"]] == [used, used]
    assert shown["spendingTrend"][-1]["total"] == {"amount": "166.500000", "currency": "INR"}
    assert shown["monthlyBreakdown"] == [{"total": {"currency": "INR"}, "conversion": used}]

    plain = (await gql.data(query, {"id": org.id}, token=org.token))["organization"]
    assert [day["conversion"] for day in plain["spendingTrend"]] == [None, None]
    assert plain["monthlyBreakdown"][0]["conversion"] is None


async def test_a_malformed_display_currency_is_bad_user_input(gql, new_org) -> None:
    org = await new_org()
    error = await gql.error(WALLET, {"id": org.id, "display": "dollars"}, token=org.token)
    assert error["extensions"] == {"code": "BAD_USER_INPUT", "field": "displayCurrency"}


async def test_an_amount_too_large_for_the_display_currency_is_a_failed_precondition(
    gql, new_org, wallet_stubs, database_url
) -> None:
    """Plans are converted by the gateway itself: at a rate far off, a fee that no Money can
    hold is refused as the wallet refuses its own amounts, not an INTERNAL error."""
    org = await new_org("USD")
    source = f"overflow-test-{org.id[:8]}"  # removed after: the table is shared
    await wallet_stubs.wallet.SetExchangeRate(
        wallet_pb2.SetExchangeRateRequest(
            base="USD", quote="INR", rate="900000000000", source=source
        )
    )
    query = """query($id: ID!) { organization(id: $id, displayCurrency: "INR") {
        availablePlans { code monthlyFee { amount } } } }"""
    try:
        error = await gql.error(query, {"id": org.id}, token=org.token)
    finally:
        with psycopg.connect(database_url) as conn:
            conn.execute("DELETE FROM wallet.exchange_rates WHERE source = %s", (source,))
    assert error["path"] == ["organization", "availablePlans"]
    assert error["extensions"] == {
        "code": "FAILED_PRECONDITION",
        "reason": "AMOUNT_TOO_LARGE",
        "field": "displayCurrency",
    }
    assert "displayCurrency" in error["message"]


async def test_thresholds_keep_what_is_not_given(gql, new_org) -> None:
    org = await new_org()
    mutation = """mutation($org: ID!, $warning: String, $critical: String, $hours: Float) {
      setLowBalanceThresholds(organizationId: $org, warningAmount: $warning,
                              criticalAmount: $critical, criticalHours: $hours) {
        warningAmount { amount currency } criticalAmount { amount } warningHours criticalHours level
      }
    }"""
    first = await gql.data(
        mutation, {"org": org.id, "warning": "50", "critical": "10", "hours": 2.5}, token=org.token
    )
    assert first["setLowBalanceThresholds"] == {
        "warningAmount": {"amount": "50.000000", "currency": "USD"},
        "criticalAmount": {"amount": "10.000000"},
        "warningHours": None,
        "criticalHours": 2.5,
        "level": first["setLowBalanceThresholds"]["level"],
    }
    only_critical = await gql.data(
        'mutation($org: ID!) { setLowBalanceThresholds(organizationId: $org, criticalAmount: "5")'
        " { warningAmount { amount } criticalAmount { amount } criticalHours } }",
        {"org": org.id},
        token=org.token,
    )
    assert only_critical["setLowBalanceThresholds"] == {
        "warningAmount": {"amount": "50.000000"},
        "criticalAmount": {"amount": "5.000000"},
        "criticalHours": 2.5,
    }
    error = await gql.error(
        'mutation($org: ID!) { setLowBalanceThresholds(organizationId: $org, warningAmount: "-1")'
        " { level } }",
        {"org": org.id},
        token=org.token,
    )
    assert error["extensions"] == {"code": "BAD_USER_INPUT", "field": "warningAmount"}


async def test_usage_analytics(gql, new_org, wallet_stubs) -> None:
    org = await new_org()
    await top_up(gql, org, "10", "usage-money")
    for i, (model, ok) in enumerate([("llama", True), ("llama", True), ("mistral", False)]):
        await wallet_stubs.wallet.RecordUsage(
            wallet_pb2.RecordUsageRequest(
                event_id=f"{org.id}-{i}",
                organization_id=org.id,
                meter="tokens",
                quantity=1000,
                unit_price=2_000_000,
                dimensions={"model": model},
                success=ok,
                latency_ms=100 * (i + 1),
            )
        )
    usage = (
        await gql.data(
            """query($id: ID!) { organization(id: $id) { usage(top: 3, recent: 2) {
              todayQuantity todayCost { amount } todayByModel { value quantity calls errors }
              todayByMeter { dimension value quantity calls } topModels { value } calls24h successRate24h averageLatencyMs24h
              hourly48h { hour success errors } recent { eventId meter dimensions { name value } }
            } } }""",
            {"id": org.id},
            token=org.token,
        )
    )["organization"]["usage"]
    assert usage["todayQuantity"] == 3000
    assert usage["todayCost"]["amount"] == "0.006000"
    assert usage["todayByModel"][0] == {"value": "llama", "quantity": 2000, "calls": 2, "errors": 0}
    assert usage["todayByMeter"] == [
        {"dimension": "meter", "value": "tokens", "quantity": 3000, "calls": 3}
    ]
    assert usage["calls24h"] == 3
    assert usage["successRate24h"] == pytest.approx(2 / 3)
    assert usage["averageLatencyMs24h"] == pytest.approx(200)
    assert len(usage["hourly48h"]) == 48
    assert usage["hourly48h"][-1]["success"] == 2 and usage["hourly48h"][-1]["errors"] == 1
    assert len(usage["recent"]) == 2


async def test_usage_counts_past_32_bits_are_read_back_exactly(
    gql, new_org, wallet_stubs, database_url
) -> None:
    """The wallet counts calls in int64: a count above GraphQL's 32-bit Int is a Long, read back
    exactly (as Int it made the whole usage card INTERNAL)."""
    org = await new_org()
    await wallet_stubs.wallet.RecordUsage(
        wallet_pb2.RecordUsageRequest(
            event_id=f"{org.id}-many",
            organization_id=org.id,
            meter="tokens",
            quantity=1,
            unit_price=0,
            dimensions={"model": "busy"},
            success=True,
        )
    )
    calls, errors = 5_000_000_000, 2_500_000_001  # the rollups follow by trigger
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SET search_path TO wallet")  # as the wallet's trigger expects
        conn.execute(
            "UPDATE usage_hourly SET calls = %s, errors = %s WHERE organization_id = %s",
            (calls, errors, org.id),
        )
    usage = (
        await gql.data(
            """query($id: ID!) { organization(id: $id) { usage {
              calls24h todayByModel { calls errors } topModels { calls errors }
              hourly48h { success errors } allTime { dimension calls errors }
            } } }""",
            {"id": org.id},
            token=org.token,
        )
    )["organization"]["usage"]
    both = {"calls": calls, "errors": errors}
    assert usage["calls24h"] == calls
    assert usage["todayByModel"] == [both]
    assert usage["topModels"] == [both]
    assert usage["hourly48h"][-1] == {"success": calls - errors, "errors": errors}
    assert usage["allTime"] == [{"dimension": "model", **both}]


async def test_an_invoice_as_a_pdf_with_the_same_authorization(
    gql, new_org, wallet_gateway, wallet_stubs, database_url
) -> None:
    org, other = await new_org(), await new_org()
    with psycopg.connect(database_url) as conn:  # it existed last month, the month invoiced
        conn.execute(
            "UPDATE wallet.organizations SET created_at = now() - interval '40 days' WHERE id = %s",
            (org.id,),
        )
    await wallet_stubs.wallet.GenerateInvoices(
        wallet_pb2.GenerateInvoicesRequest(organization_id=org.id)
    )
    billing = await gql.data(
        "query($id: ID!) { organization(id: $id) { billing { invoices { id period total "
        "{ amount } status pdfUrl } } } }",
        {"id": org.id},
        token=org.token,
    )
    [invoice] = billing["organization"]["billing"]["invoices"]
    assert invoice["status"] == "open" and invoice["total"]["amount"] == "0.000000"
    url = invoice["pdfUrl"]
    assert url == f"/invoices/{invoice['id']}.pdf"

    resp = await wallet_gateway.get(url, headers={"Authorization": f"Bearer {org.token}"})
    assert resp.status == 200
    assert resp.content_type == "application/pdf"
    assert (await resp.read()).startswith(b"%PDF")
    assert "attachment" in resp.headers["Content-Disposition"]

    anonymous = await wallet_gateway.get(url)
    assert anonymous.status == 401
    assert anonymous.headers["Cache-Control"] == "private, no-store"  # never a shared answer
    assert (await anonymous.json())["error"]["code"] == "UNAUTHENTICATED"
    elsewhere = await wallet_gateway.get(url, headers={"Authorization": f"Bearer {other.token}"})
    assert elsewhere.status == 404
    junk = await wallet_gateway.get(
        "/invoices/nope.pdf", headers={"Authorization": f"Bearer {org.token}"}
    )
    assert junk.status == 400
    assert (await junk.json())["error"]["message"] == "id is not a valid id: 'nope'"


async def test_an_invoice_stays_in_its_own_currency_whatever_the_display(
    gql, new_org, wallet_stubs, database_url
) -> None:
    """Converted line by line at today's rate, an issued invoice would change with the rate and
    its lines would not add up to its total (50 + 50 micro-INR)."""
    org = await new_org("INR")
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "UPDATE wallet.organizations SET created_at = '2025-01-01' WHERE id = %s", (org.id,)
        )
        for resource_type in ("pod", "vm"):
            conn.execute(
                "INSERT INTO wallet.daily_spend (organization_id, day, resource_type, amount)"
                " VALUES (%s, '2025-03-10', %s, 50)",
                (org.id, resource_type),
            )
    await wallet_stubs.wallet.GenerateInvoices(
        wallet_pb2.GenerateInvoicesRequest(organization_id=org.id, period="2025-03")
    )
    source = f"invoice-test-{org.id[:8]}"  # dated long ago: only used while no other rate is
    rate = wallet_pb2.SetExchangeRateRequest(base="USD", quote="INR", rate="0.5", source=source)
    rate.as_of.FromDatetime(datetime(2001, 1, 1, tzinfo=UTC))
    await wallet_stubs.wallet.SetExchangeRate(rate)
    query = """query($id: ID!, $display: String) {
      organization(id: $id, displayCurrency: $display) {
        billing { invoices { total { amount currency } lines { amount { amount currency } } } }
      }
    }"""
    for display in (None, "USD"):
        data = await gql.data(query, {"id": org.id, "display": display}, token=org.token)
        [invoice] = data["organization"]["billing"]["invoices"]
        assert invoice["total"] == {"amount": "0.000100", "currency": "INR"}, display
        assert [line["amount"]["amount"] for line in invoice["lines"]] == ["0.000050"] * 2
    with psycopg.connect(database_url) as conn:
        conn.execute("DELETE FROM wallet.exchange_rates WHERE source = %s", (source,))


def wallet_calls(method: str) -> float:
    """How many calls of `method` the in-process wallet has answered OK (its own metrics)."""
    from prometheus_client import REGISTRY

    labels = {"method": f"/gpudeck.wallet.v1.WalletService/{method}", "code": "OK"}
    return REGISTRY.get_sample_value("gpudeck_grpc_requests_total", labels) or 0.0


async def test_one_query_reads_each_thing_once(gql, new_org, wallet_stubs) -> None:
    """DataLoaders: expenditure and billing share GetExpenditure; wallet, plan and conversion
    share GetWalletSummary; a second query reads again."""
    org = await new_org()
    query = """query($id: ID!) { organization(id: $id, displayCurrency: "INR") {
        wallet { balance { amount } } again: wallet { spendable { amount } }
        conversion { rate } plan { availableCredits { amount } }
        expenditure { currentPeriod { amount } } billing { currentMonthTotal { amount } }
    } }"""
    await wallet_stubs.wallet.SetExchangeRate(
        wallet_pb2.SetExchangeRateRequest(base="USD", quote="INR", rate="83.25", source="test")
    )
    summaries, spending = wallet_calls("GetWalletSummary"), wallet_calls("GetExpenditure")
    await gql.data(query, {"id": org.id}, token=org.token)
    assert wallet_calls("GetWalletSummary") == summaries + 1
    assert wallet_calls("GetExpenditure") == spending + 1


async def test_an_unverified_organization_may_not_top_up_above_the_kyc_limit(gql, new_org) -> None:
    org = await new_org(verified=False)
    await top_up(gql, org, "10", "small-enough")
    variables = {"org": org.id, "amount": "600", "currency": "USD", "key": "too-much"}
    error = await gql.error(TOP_UP, variables, token=org.token)
    assert error["extensions"] == {
        "code": "FAILED_PRECONDITION",
        "reason": "KYC_REQUIRED",
        "field": "amount",
    }
    assert "KYC" in error["message"]


async def test_an_auto_top_up_rule_that_keeps_failing_says_why_it_turned_off(
    gql, new_org, wallet_stubs
) -> None:
    org = await new_org()
    await top_up(gql, org, "10", "declined-0")
    save = """mutation($org: ID!) {
      setAutoTopUp(organizationId: $org, enabled: true, below: "20", amount: "50") {
        enabled disabledReason
      }
    }"""
    assert (await gql.data(save, {"org": org.id}, token=org.token))["setAutoTopUp"] == {
        "enabled": True,
        "disabledReason": None,
    }
    for n in range(1, 4):  # the payment provider declines each request; a top-up fires anew
        rule = await wallet_stubs.wallet.GetAutoTopUp(
            wallet_pb2.GetAutoTopUpRequest(organization_id=org.id)
        )
        await wallet_stubs.wallet.CompleteTopUp(
            wallet_pb2.CompleteTopUpRequest(pending_top_up_id=rule.pending.id, succeeded=False)
        )
        if n < 3:
            await top_up(gql, org, "1", f"declined-{n}")
    seen = await gql.data(
        "query($id: ID!) { organization(id: $id) { autoTopUp { enabled disabledReason"
        " pendingAmount { amount } } } }",
        {"id": org.id},
        token=org.token,
    )
    rule = seen["organization"]["autoTopUp"]
    assert rule["enabled"] is False and rule["pendingAmount"] is None
    assert "3 automatic top-ups in a row failed" in rule["disabledReason"]
    again = await gql.data(save, {"org": org.id}, token=org.token)
    assert again["setAutoTopUp"] == {"enabled": True, "disabledReason": None}


async def test_the_auto_top_up_rule_is_set_and_its_pending_request_shown(gql, new_org) -> None:
    org = await new_org()
    await top_up(gql, org, "10", "auto-1")
    rule = await gql.data(
        """mutation($org: ID!) {
          setAutoTopUp(organizationId: $org, enabled: true, below: "20", amount: "50") {
            enabled below { amount currency } amount { amount } pendingAmount { amount }
          }
        }""",
        {"org": org.id},
        token=org.token,
    )
    # The balance (10) is already below 20: the rule fires at once and waits for its payment.
    assert rule["setAutoTopUp"] == {
        "enabled": True,
        "below": {"amount": "20.000000", "currency": "USD"},
        "amount": {"amount": "50.000000"},
        "pendingAmount": {"amount": "50.000000"},
    }
    seen = await gql.data(
        "query($id: ID!) { organization(id: $id) { autoTopUp { enabled pendingSince } } }",
        {"id": org.id},
        token=org.token,
    )
    assert seen["organization"]["autoTopUp"]["enabled"] is True
    assert seen["organization"]["autoTopUp"]["pendingSince"] is not None
    error = await gql.error(
        'mutation($org: ID!) { setAutoTopUp(organizationId: $org, enabled: true, below: "0",'
        ' amount: "5") { enabled } }',
        {"org": org.id},
        token=org.token,
    )
    assert error["extensions"] == {"code": "BAD_USER_INPUT", "field": "below"}


async def test_a_saved_display_currency_with_no_rate_shows_the_wallets_own(
    gql, new_org, no_rate_in_effect
) -> None:
    """A saved preference for a currency no rate converts to hid the whole organization (a
    member's card too) behind FAILED_PRECONDITION; it falls back to the wallet's currency. An
    asked displayCurrency still says the rate is missing."""
    org = await new_org()
    await gql.data(
        "mutation($org: ID!) { updatePreferences(organizationId: $org,"
        ' displayCurrency: "INR") { displayCurrency } }',
        {"org": org.id},
        token=org.token,
    )
    with no_rate_in_effect():
        shown = await gql.data(
            "query($id: ID!) { organization(id: $id) { name wallet { balance { currency } } } }",
            {"id": org.id},
            token=org.token,
        )
        asked = await gql.error(
            'query($id: ID!) { organization(id: $id, displayCurrency: "INR") { name } }',
            {"id": org.id},
            token=org.token,
        )
    assert shown["organization"]["wallet"]["balance"]["currency"] == "USD"
    assert asked["extensions"]["code"] == "FAILED_PRECONDITION"


def test_converted_parts_add_up_to_their_converted_total() -> None:
    """The plan card's grants were converted each on its own: three ₹100 grants shown in USD
    made 1.204819 × 3 = 3.614457 against credits available of 3.614458."""
    from gpudeck.gateway.money import convert, convert_parts

    rate = money_pb2.Conversion(base="USD", quote="INR", rate="83")
    grant = money_pb2.Money(amount=100_000_000, currency="INR")
    total = money_pb2.Money(amount=300_000_000, currency="INR")
    shown_total, shown = convert_parts(total, [grant] * 3, rate)
    assert shown_total == convert(total, rate)
    assert sum(m.amount for m in shown) == shown_total.amount == 3_614_458
    assert sorted(m.amount for m in shown) == [1_204_819, 1_204_819, 1_204_820]
    # Parts that are not all of it are each converted alone; no conversion changes nothing.
    _, alone = convert_parts(total, [grant], rate)
    assert alone == [convert(grant, rate)]
    assert convert_parts(total, [grant] * 3, None) == (total, [grant] * 3)


def test_the_plan_cards_grants_add_up_in_a_display_currency() -> None:
    from gpudeck.gateway.types.billing import Plan

    rate = money_pb2.Conversion(base="USD", quote="INR", rate="83")
    grant = money_pb2.Money(amount=100_000_000, currency="INR")
    status = wallet_pb2.PlanStatus(
        available_credits=money_pb2.Money(amount=300_000_000, currency="INR"),
        credit_grants=[wallet_pb2.CreditGrant(available=grant, source="purchase")] * 3,
    )
    plan = Plan.from_pb(status, rate)
    total = Decimal(plan.available_credits.amount)
    assert sum(Decimal(g.available.amount) for g in plan.credit_grants) == total
    assert plan.available_credits.currency == "USD"
