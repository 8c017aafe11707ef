"""Refusals name what the client sent, as the client spelled it: the GraphQL argument (in
`extensions.field` and in the message), never the service's snake_case field; one error for one
bad argument; amounts with their currency."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest

ORGANIZATION = """query($id: ID!, $display: String) {
  organization(id: $id, displayCurrency: $display) {
    name
    wallet { balance { amount } heldBalance { amount } spendable { amount } }
    expenditure { currentPeriod { amount } last30Days { amount } }
    billing { currentMonthTotal { amount } }
  }
}"""
PREFERENCES = """mutation($org: ID!, $display: String, $theme: String) {
  updatePreferences(organizationId: $org, displayCurrency: $display, theme: $theme) {
    displayCurrency theme
  }
}"""


def assert_names(error: dict[str, Any], code: str, field: str, *words: str) -> None:
    assert error["extensions"]["code"] == code, error
    assert error["extensions"].get("field") == field, error
    assert "_" not in error["message"].split(":")[0], error  # no snake_case field names
    for word in words:
        assert word in error["message"], (word, error)


async def test_an_unknown_display_currency_is_one_error_at_the_organization(gql, new_org) -> None:
    org = await new_org()
    for bad in ("XYZ", "", "usd1"):
        error = await gql.error(ORGANIZATION, {"id": org.id, "display": bad}, token=org.token)
        assert error["path"] == ["organization"], error
        assert_names(error, "BAD_USER_INPUT", "displayCurrency", "displayCurrency", "INR, USD")
    # Only plain fields asked: still refused, not silently ignored.
    error = await gql.error(
        'query($id: ID!) { organization(id: $id, displayCurrency: "EUR") { name } }',
        {"id": org.id},
        token=org.token,
    )
    assert_names(error, "BAD_USER_INPUT", "displayCurrency", "EUR")
    # Lower case is a currency too; null is no choice at all.
    for display in ("usd", None):
        shown = await gql.data(ORGANIZATION, {"id": org.id, "display": display}, token=org.token)
        assert shown["organization"]["wallet"]["balance"]["amount"] == "0.000000"


async def test_preferences_refuse_empty_values_instead_of_ignoring_them(gql, new_org) -> None:
    org = await new_org()
    for variables, field in (({"display": ""}, "displayCurrency"), ({"theme": ""}, "theme")):
        error = await gql.error(PREFERENCES, {"org": org.id, **variables}, token=org.token)
        assert_names(error, "BAD_USER_INPUT", field, field)
    error = await gql.error(PREFERENCES, {"org": org.id, "display": "EUR"}, token=org.token)
    assert_names(error, "BAD_USER_INPUT", "displayCurrency", "INR, USD")
    saved = await gql.data(PREFERENCES, {"org": org.id, "theme": "dark"}, token=org.token)
    assert saved["updatePreferences"]["theme"] == "dark"
    # null keeps the value, like leaving the argument out.
    kept = await gql.data(PREFERENCES, {"org": org.id, "theme": None}, token=org.token)
    assert kept["updatePreferences"]["theme"] == "dark"


async def test_service_refusals_name_the_graphql_argument(gql, new_org) -> None:
    org = await new_org()
    # The wallet's `expires_at` is the mutation's `expiresAt`.
    error = await gql.error(
        'mutation($org: ID!) { createApiToken(organizationId: $org, name: "old", role: MEMBER,'
        ' expiresAt: "2001-01-01T00:00:00Z") { token } }',
        {"org": org.id},
        token=org.token,
    )
    assert_names(error, "BAD_USER_INPUT", "expiresAt", "expiresAt")
    # The wallet's `before_id` is the field's `before`.
    error = await gql.error(
        'query($id: ID!) { organization(id: $id) { transactions(before: "junk") { id } } }',
        {"id": org.id},
        token=org.token,
    )
    assert_names(error, "BAD_USER_INPUT", "before", "before")
    # A cursor of another organization (or none ever given) is bad input too, not NOT_FOUND.
    error = await gql.error(
        "query($id: ID!, $before: ID!) { organization(id: $id) { transactions(before: $before)"
        " { id } } }",
        {"id": org.id, "before": str(uuid.uuid4())},
        token=org.token,
    )
    assert_names(error, "BAD_USER_INPUT", "before", "before")
    # The wallet's `project_id` is the mutation's `id`.
    for mutation in ("renameProject", "deleteProject"):
        extra = ', name: "x"' if mutation == "renameProject" else ""
        error = await gql.error(
            f'mutation($org: ID!) {{ {mutation}(organizationId: $org, id: "junk"{extra})'
            " { id } }",
            {"org": org.id},
            token=org.token,
        )
        assert_names(error, "BAD_USER_INPUT", "id", "id is not a valid id")


async def test_a_malformed_organization_id_is_bad_input_and_another_one_not_found(
    gql, new_org
) -> None:
    org, other = await new_org(), await new_org()
    query = "query($id: ID!) { organization(id: $id) { name } }"
    error = await gql.error(query, {"id": "junk"}, token=org.token)
    assert_names(error, "BAD_USER_INPUT", "id", "id is not a valid id")
    error = await gql.error(query, {"id": other.id}, token=org.token)
    assert_names(error, "NOT_FOUND", "id", other.id)
    error = await gql.error(
        'mutation($org: ID!) { createProject(organizationId: $org, name: "p") { id } }',
        {"org": other.id},
        token=org.token,
    )
    assert_names(error, "NOT_FOUND", "organizationId", other.id)


async def test_insufficient_funds_for_a_plan_says_both_amounts_with_their_currency(
    gql, new_org
) -> None:
    org = await new_org()
    plans = await gql.data(
        "query($id: ID!) { organization(id: $id) { availablePlans { code monthlyFee { amount } } }"
        " }",
        {"id": org.id},
        token=org.token,
    )
    paid = [
        p
        for p in plans["organization"]["availablePlans"]
        if p["monthlyFee"]["amount"] != "0.000000"
    ]
    assert paid, plans
    error = await gql.error(
        "mutation($org: ID!, $plan: String!) { changePlan(organizationId: $org, planCode: $plan)"
        " { plan { name } } }",
        {"org": org.id, "plan": paid[0]["code"]},
        token=org.token,
    )
    assert error["extensions"]["code"] == "INSUFFICIENT_FUNDS", error
    assert "field" not in error["extensions"], error  # no argument of changePlan is at fault
    fee = paid[0]["monthlyFee"]["amount"]
    assert error["message"].endswith(f"< amount {fee} USD"), error
    assert "spendable 0.000000 USD" in error["message"], error


async def test_refusals_read_as_english(gql, new_org) -> None:
    org = await new_org()
    made = await gql.data(
        'mutation($org: ID!) { a: createApiToken(organizationId: $org, name: "a", role: ADMIN)'
        " { token } }",
        {"org": org.id},
        token=org.token,
    )
    tokens = await gql.data(
        "query($id: ID!) { organization(id: $id) { apiTokens { id role } } }",
        {"id": org.id},
        token=org.token,
    )
    owner = next(t["id"] for t in tokens["organization"]["apiTokens"] if t["role"] == "owner")
    error = await gql.error(
        "mutation($id: ID!) { revokeApiToken(id: $id) { id } }",
        {"id": owner},
        token=made["a"]["token"],
    )
    assert error["extensions"]["code"] == "FORBIDDEN", error
    assert error["message"] == "an admin token may not revoke an owner token", error
    error = await gql.error(
        'mutation($id: ID!) { renameApiToken(id: $id, name: "x") { id } }',
        {"id": owner},
        token=made["a"]["token"],
    )
    assert error["message"] == "an admin token may not rename an owner token", error


async def test_a_refusal_naming_two_arguments_names_both_as_sent(gql, new_org) -> None:
    org = await new_org()
    error = await gql.error(
        'mutation($org: ID!) { setLowBalanceThresholds(organizationId: $org, warningAmount: "5",'
        ' criticalAmount: "10") { warningAmount { amount } } }',
        {"org": org.id},
        token=org.token,
    )
    assert_names(error, "BAD_USER_INPUT", "criticalAmount")
    assert error["message"] == "criticalAmount must not exceed warningAmount", error


async def test_a_display_currency_without_a_rate_is_one_error(gql, new_org, database_url) -> None:
    org = await new_org()
    with psycopg.connect(database_url) as conn:  # every test that converts sets its own rate
        conn.execute("DELETE FROM wallet.exchange_rates")
    body = await gql(ORGANIZATION, {"id": org.id, "display": "INR"}, token=org.token)
    assert body["data"] == {"organization": None}, body
    [error] = body["errors"]
    assert error["path"] == ["organization"], error
    assert error["extensions"]["code"] == "FAILED_PRECONDITION", error
    assert error["extensions"]["reason"] == "EXCHANGE_RATE_MISSING", error
    assert error["extensions"]["field"] == "displayCurrency", error
    assert error["message"] == "no exchange rate between USD and INR is set", error


async def test_token_ids_and_keys_are_checked_like_every_other(gql, new_org) -> None:
    org = await new_org()
    revoke = "mutation($id: ID!) { revokeApiToken(id: $id) { id } }"
    error = await gql.error(revoke, {"id": "nope"}, token=org.token)
    assert_names(error, "BAD_USER_INPUT", "id", "id is not a valid id")
    missing = "00000000-0000-7000-8000-000000000000"
    error = await gql.error(revoke, {"id": missing}, token=org.token)
    assert_names(error, "NOT_FOUND", "id", missing)
    # One limit for every idempotency key: 200 characters.
    top_up = (
        'mutation($org: ID!, $key: String!) { topUpWallet(organizationId: $org, amount: "1",'
        ' currency: "USD", idempotencyKey: $key) { transaction { id } } }'
    )
    error = await gql.error(top_up, {"org": org.id, "key": "k" * 201}, token=org.token)
    assert_names(error, "BAD_USER_INPUT", "idempotencyKey", "longer than 200")
    assert await gql.data(top_up, {"org": org.id, "key": "k" * 200}, token=org.token)


async def test_a_refused_role_is_told_what_it_asked_for(gql, new_org) -> None:
    org = await new_org()
    made = await gql.data(
        'mutation($org: ID!) { createApiToken(organizationId: $org, name: "b", role: BILLING)'
        " { token } }",
        {"org": org.id},
        token=org.token,
    )
    billing = made["createApiToken"]["token"]
    error = await gql.error(
        'mutation($id: ID!) { renameOrganization(id: $id, name: "New") { id } }',
        {"id": org.id},
        token=billing,
    )
    assert error["extensions"]["code"] == "FORBIDDEN", error
    assert error["message"] == "only an owner or admin may renameOrganization", error
    error = await gql.error(
        'mutation($id: ID!) { deleteOrganization(id: $id, confirmName: "Acme") }',
        {"id": org.id},
        token=billing,
    )
    assert error["message"] == "only an owner may deleteOrganization", error


async def test_a_value_of_the_wrong_type_names_its_argument(gql, new_org) -> None:
    org = await new_org()
    cases = [
        ('{ organization(id: "%s") { transactions(kinds: [NOPE]) { id } } }', {}, "kinds"),
        ('{ organization(id: "%s") { spendingTrend(days: "7") { date } } }', {}, "days"),
        (
            'query($k: [TransactionKind!]) { organization(id: "%s") '
            "{ transactions(kinds: $k) { id } } }",
            {"k": ["TOPUP", "SUPERUSER"]},
            "kinds",
        ),
        # A DateTime written in the query (Strawberry's refusal had no place: nothing named).
        (
            'mutation { createApiToken(organizationId: "%s", name: "x", role: ADMIN,'
            ' expiresAt: "yesterday") { token } }',
            {},
            "expiresAt",
        ),
        (
            'mutation { createApiToken(organizationId: "%s", name: "x", role: ADMIN,'
            " expiresAt: 5) { token } }",
            {},
            "expiresAt",
        ),
        (
            'mutation { createApiToken(organizationId: "%s", name: "x", role: ADMIN,'
            " expiresAt: $e) { token } }".replace("mutation", "mutation($e: DateTime)"),
            {"e": "tomorrow"},
            "expiresAt",
        ),
    ]
    for query, variables, argument in cases:
        for _ in range(2):  # the second answer comes from the validation cache: named once
            error = await gql.error(query % org.id, variables, token=org.token)
            assert_names(error, "GRAPHQL_VALIDATION_FAILED", argument)
            assert error["message"].startswith(f"{argument}: "), error
            assert not error["message"].startswith(f"{argument}: {argument}"), error
    # An error that is about no argument names none.
    error = await gql.error("{ health { nope } }", token=org.token)
    assert "field" not in error["extensions"], error


async def test_a_huge_bad_id_is_named_without_being_sent_back_whole(gql, new_org) -> None:
    org = await new_org()
    error = await gql.error(
        "query($id: ID!) { organization(id: $id) { name } }", {"id": "x" * 100_000}, token=org.token
    )
    assert error["extensions"] == {"code": "BAD_USER_INPUT", "field": "id"}
    assert "100000 characters" in error["message"] and len(error["message"]) < 200


@pytest.mark.parametrize(
    ("mutation", "field"),
    [
        (
            'mutation($v: String!) { topUpWallet(organizationId: "%s", amount: "1",'
            ' currency: $v, idempotencyKey: "k") { wallet { currency } } }',
            "currency",
        ),
        (
            'mutation($v: String!) { topUpWallet(organizationId: "%s", amount: $v,'
            ' currency: "USD", idempotencyKey: "k") { wallet { currency } } }',
            "amount",
        ),
    ],
)
async def test_a_huge_bad_value_is_named_without_being_sent_back_whole(
    gql, new_org, mutation: str, field: str
) -> None:
    org = await new_org()
    error = await gql.error(mutation % org.id, {"v": "U" * 20_000}, token=org.token)
    assert error["extensions"].get("field") == field, error
    assert "20000 characters" in error["message"] and len(error["message"]) < 300, error


async def test_text_that_is_no_text_is_bad_input_naming_its_argument(gql, new_org) -> None:
    """A lone UTF-16 surrogate (a string cut inside an emoji, as JSON.stringify sends it) cannot
    be encoded for the services, and a NUL cannot be stored or compared by PostgreSQL: both
    failed as INTERNAL."""
    org = await new_org()
    top_up = """mutation($org: ID!, $key: String!) {
      topUpWallet(organizationId: $org, amount: "1", currency: "USD", idempotencyKey: $key) {
        wallet { balance { amount } }
      }
    }"""
    error = await gql.error(top_up, {"org": org.id, "key": "half \ud83d"}, token=org.token)
    assert_names(error, "BAD_USER_INPUT", "idempotencyKey", "idempotencyKey", "surrogate")
    error = await gql.error(PREFERENCES, {"org": org.id, "theme": "\udfff"}, token=org.token)
    assert_names(error, "BAD_USER_INPUT", "theme", "theme")
    read = "query($id: ID!, $s: String!) { organization(id: $id) { %s } }"
    for body, field in (
        ("usage(meter: $s) { todayQuantity }", "meter"),
        ("resourceCosts(resourceIds: [$s]) { resources { resourceId } }", "resourceIds"),
    ):
        for bad in ("a\x00b", "a\ud800b"):
            error = await gql.error(read % body, {"id": org.id, "s": bad}, token=org.token)
            assert_names(error, "BAD_USER_INPUT", field, field)
    wallet = await gql.data(
        "query($id: ID!) { organization(id: $id) { wallet { balance { amount } } } }",
        {"id": org.id},
        token=org.token,
    )
    assert wallet["organization"]["wallet"]["balance"]["amount"] == "0.000000"  # nothing moved
