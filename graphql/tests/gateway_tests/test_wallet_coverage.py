"""Gaps the other wallet tests leave, against the real wallet, NATS and PostgreSQL: what a viewer
and a member may not do (and that nothing changes when refused), live pushes for holds and
meters, the run rate and hours remaining of a running meter, createOrganization's retries and
refusals, expiring tokens behind the gateway's identity cache, and a token's lastUsedAt."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType

from gpudeck.proto.wallet.v1 import wallet_pb2

MAKE_TOKEN = """mutation($org: ID!, $name: String!, $role: Role!, $at: DateTime) {
  createApiToken(organizationId: $org, name: $name, role: $role, expiresAt: $at) {
    token apiToken { id name role expiresAt lastUsedAt }
  }
}"""
VIEWER = "{ viewer { id organizationId tokenId tokenExpiresAt } }"
TOKENS = """query($id: ID!) { organization(id: $id) {
  apiTokens { id name createdAt revokedAt lastUsedAt }
} }"""
TOP_UP = """mutation($org: ID!, $amount: String!, $key: String!) {
  topUpWallet(organizationId: $org, amount: $amount, currency: "USD", idempotencyKey: $key) {
    wallet { balance { amount } }
  }
}"""
CREATE_ORG = """mutation($name: String!, $currency: String!, $key: String) {
  createOrganization(name: $name, currency: $currency, idempotencyKey: $key) {
    organization { id name currency } ownerToken
  }
}"""
SET_THRESHOLDS = """mutation($org: ID!, $warning: String) {
  setLowBalanceThresholds(organizationId: $org, warningAmount: $warning) {
    warningAmount { amount }
  }
}"""
INVITE = """mutation($org: ID!, $email: String!) {
  inviteMember(organizationId: $org, email: $email, role: MEMBER) { user { id } role }
}"""

# The mutations moving money, each with the variables it needs besides $org.
MONEY_MUTATIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "changePlan": (
        'mutation($org: ID!) { changePlan(organizationId: $org, planCode: "premium")'
        " { previousPlanCode } }",
        {},
    ),
    "addCredits": (
        'mutation($org: ID!) { addCredits(organizationId: $org, amount: "5",'
        ' idempotencyKey: "coverage-credits") { availableCredits { amount } } }',
        {},
    ),
    "setLowBalanceThresholds": (SET_THRESHOLDS, {"warning": "1"}),
    "setAutoTopUp": (
        'mutation($org: ID!) { setAutoTopUp(organizationId: $org, enabled: true, below: "20",'
        ' amount: "50") { enabled } }',
        {},
    ),
}

# What money mutations could have changed, read with the owner's token.
MONEY_STATE = """query($id: ID!) { organization(id: $id) {
  planCode plan { code availableCredits { amount } }
  wallet { balance { amount } credits { amount } }
  thresholds { warningAmount { amount } }
  autoTopUp { enabled pendingAmount { amount } }
  transactions(first: 50) { id }
} }"""


def micro(amount: str) -> int:
    """A decimal string of the API ("12.500000") in micro-units."""
    return int(Decimal(amount) * 1_000_000)


def decimal_string(value: int) -> str:
    return f"{value // 1_000_000}.{value % 1_000_000:06d}"


async def token_for(gql, org, role: str, *, name: str | None = None) -> dict[str, Any]:
    """An API token of `role` made by the owner through createApiToken."""
    made = await gql.data(
        MAKE_TOKEN, {"org": org.id, "name": name or f"{role} token", "role": role}, token=org.token
    )
    token: dict[str, Any] = made["createApiToken"]
    assert token["apiToken"]["role"] == role.lower()
    return token


async def invite(gql, org, email: str) -> str:
    """Invite `email` as a member (by the owner); their user id."""
    invited = await gql.data(INVITE, {"org": org.id, "email": email}, token=org.token)
    user_id: str = invited["inviteMember"]["user"]["id"]
    return user_id


# ---------------------------------------------------------------------- viewers change nothing


async def test_a_viewer_may_not_change_the_organization_and_nothing_changes(gql, new_org) -> None:
    org = await new_org()
    await gql.data(TOP_UP, {"org": org.id, "amount": "10", "key": "viewer-money"}, token=org.token)
    await gql.data(SET_THRESHOLDS, {"org": org.id, "warning": "7"}, token=org.token)
    member_id = await invite(gql, org, f"m-{uuid.uuid4().hex[:8]}@example.com")
    viewer = await token_for(gql, org, "VIEWER")
    other = await token_for(gql, org, "VIEWER", name="another viewer")
    token = viewer["token"]

    members_query = "query($id: ID!) { organization(id: $id) { members { user { id } role } } }"
    prefs_query = "query($id: ID!) { organization(id: $id) { preferences { theme compactMode } } }"
    members_before = await gql.data(members_query, {"id": org.id}, token=org.token)
    money_before = await gql.data(MONEY_STATE, {"id": org.id}, token=org.token)
    prefs_before = await gql.data(prefs_query, {"id": org.id}, token=token)
    theme = prefs_before["organization"]["preferences"]["theme"]
    new_theme = "dark" if theme != "dark" else "light"
    org_key = f"viewer-org-{uuid.uuid4().hex}"

    refused: list[tuple[str, str, dict[str, Any]]] = [
        (
            "createOrganization",
            CREATE_ORG,
            {"name": "Viewer Made", "currency": "USD", "key": org_key},
        ),
        (
            "updatePreferences",
            "mutation($org: ID!, $theme: String) { updatePreferences(organizationId: $org,"
            " theme: $theme, compactMode: true) { theme } }",
            {"org": org.id, "theme": new_theme},
        ),
        (
            "revokeApiToken",
            "mutation($id: ID!) { revokeApiToken(id: $id) { revokedAt } }",
            {"id": viewer["apiToken"]["id"]},
        ),
        (
            "revokeApiToken",
            "mutation($id: ID!) { revokeApiToken(id: $id) { revokedAt } }",
            {"id": other["apiToken"]["id"]},
        ),
        (
            "setMemberRole",
            "mutation($org: ID!, $user: ID!) { setMemberRole(organizationId: $org,"
            " userId: $user, role: VIEWER) { role } }",
            {"org": org.id, "user": member_id},
        ),
        (
            "removeMember",
            "mutation($org: ID!, $user: ID!) { removeMember(organizationId: $org, userId: $user) }",
            {"org": org.id, "user": member_id},
        ),
    ]
    refused += [
        (name, query, {"org": org.id, **variables})
        for name, (query, variables) in MONEY_MUTATIONS.items()
    ]
    for name, mutation, variables in refused:
        error = await gql.error(mutation, variables, token=token)
        assert error["extensions"]["code"] == "FORBIDDEN", (name, error)
        assert error["path"] == [name], (name, error)

    # Nothing changed: members, money, plan, thresholds, auto top-up, preferences, tokens.
    assert await gql.data(members_query, {"id": org.id}, token=org.token) == members_before
    assert await gql.data(MONEY_STATE, {"id": org.id}, token=org.token) == money_before
    assert money_before["organization"]["planCode"] == "standard"
    assert money_before["organization"]["autoTopUp"]["enabled"] is False
    assert await gql.data(prefs_query, {"id": org.id}, token=token) == prefs_before
    listed = await gql.data(TOKENS, {"id": org.id}, token=org.token)
    revoked = {t["id"]: t["revokedAt"] for t in listed["organization"]["apiTokens"]}
    assert revoked[viewer["apiToken"]["id"]] is None
    assert revoked[other["apiToken"]["id"]] is None
    assert (await gql.data(VIEWER, token=token))["viewer"]["tokenId"] == viewer["apiToken"]["id"]
    # No organization was made with the viewer's key: the owner's call with it is the first.
    first = await gql.data(
        CREATE_ORG, {"name": "Viewer Made", "currency": "USD", "key": org_key}, token=org.token
    )
    assert first["createOrganization"]["ownerToken"], "the viewer's refused call made one"


# ---------------------------------------------------------------------- members and money


@pytest.mark.parametrize("name", list(MONEY_MUTATIONS))
async def test_a_member_may_not_move_money(gql, new_org, name: str) -> None:
    org = await new_org()
    member = (await token_for(gql, org, "MEMBER"))["token"]
    before = await gql.data(MONEY_STATE, {"id": org.id}, token=org.token)
    query, variables = MONEY_MUTATIONS[name]
    error = await gql.error(query, {"org": org.id, **variables}, token=member)
    assert error["extensions"]["code"] == "FORBIDDEN", error
    assert error["path"] == [name]
    assert await gql.data(MONEY_STATE, {"id": org.id}, token=org.token) == before


BILLING_FIELDS = {
    "expenditure": "expenditure { currentPeriod { amount } }",
    "spendingTrend": "spendingTrend(days: 7) { date }",
    "plan": "plan { code }",
    "usage": "usage { calls24h }",
    "transactions": "transactions(first: 5) { id }",
    "holds": "holds { id }",
}


@pytest.mark.parametrize("field", list(BILLING_FIELDS))
async def test_a_member_may_not_read_billing_fields(gql, new_org, field: str) -> None:
    org = await new_org(name="Members Co")
    member = (await token_for(gql, org, "MEMBER"))["token"]
    query = "query($id: ID!) { organization(id: $id) { name " + BILLING_FIELDS[field] + " } }"
    body = await gql(query, {"id": org.id}, token=member)
    [error] = body["errors"]
    assert error["extensions"]["code"] == "FORBIDDEN", error
    assert error["path"] == ["organization", field]
    assert body["data"] == {"organization": {"name": "Members Co", field: None}}
    # The owner reads the same query.
    assert (await gql.data(query, {"id": org.id}, token=org.token))["organization"][
        field
    ] is not None


# ---------------------------------------------------------------------- live pushes

TRANSPORT_WS = "graphql-transport-ws"
WATCH = """subscription($org: ID!) {
  walletUpdated(organizationId: $org) {
    balance { amount } heldBalance { amount } spendable { amount }
    runRate { perHour { amount } byResourceType { resourceType perHour { amount } } }
  }
}"""


async def receive(ws: aiohttp.ClientWebSocketResponse, timeout: float = 10) -> Any:
    """The next JSON message that is not a ping or pong."""
    deadline = time.monotonic() + timeout
    while True:
        msg = await asyncio.wait_for(ws.receive(), timeout=max(deadline - time.monotonic(), 0.01))
        assert msg.type == WSMsgType.TEXT, msg
        data = msg.json()
        if data["type"] not in ("ping", "pong"):
            return data


async def watch(client, org) -> tuple[aiohttp.ClientWebSocketResponse, dict[str, Any]]:
    """A walletUpdated subscription of `org` with its owner's token, and its first summary."""
    ws = await client.ws_connect("/graphql", protocols=[TRANSPORT_WS])
    await ws.send_json(
        {"type": "connection_init", "payload": {"Authorization": f"Bearer {org.token}"}}
    )
    assert (await receive(ws))["type"] == "connection_ack"
    await ws.send_json(
        {"id": "1", "type": "subscribe", "payload": {"query": WATCH, "variables": {"org": org.id}}}
    )
    first = await receive(ws)
    assert first["type"] == "next", first
    return ws, first["payload"]["data"]["walletUpdated"]


async def pushed(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    message = await receive(ws, timeout=8)
    assert message["type"] == "next", message
    assert "errors" not in message["payload"], message
    wallet: dict[str, Any] = message["payload"]["data"]["walletUpdated"]
    return wallet


async def test_wallet_updated_pushes_when_a_hold_is_created(
    gql, new_org, wallet_gateway, wallet_stubs
) -> None:
    org = await new_org()
    await gql.data(TOP_UP, {"org": org.id, "amount": "10", "key": "hold-money"}, token=org.token)
    ws, first = await watch(wallet_gateway, org)
    hold_id = ""
    try:
        assert first["heldBalance"]["amount"] == "0.000000"
        started = time.monotonic()
        hold = await wallet_stubs.wallet.CreateHold(
            wallet_pb2.CreateHoldRequest(
                idempotency_key=f"hold-{org.id}",
                organization_id=org.id,
                amount=2_500_000,
                timeout_seconds=60,
                description="coverage hold",
            )
        )
        assert hold.status == "open"
        hold_id = hold.id
        wallet = await pushed(ws)
        elapsed = time.monotonic() - started
        assert wallet["heldBalance"]["amount"] == "2.500000"
        assert wallet["spendable"]["amount"] == "7.500000"
        assert wallet["balance"]["amount"] == "10.000000"
        assert elapsed < 5, f"the push took {elapsed:.1f} s"
    finally:
        await ws.close()
        if hold_id:
            await wallet_stubs.wallet.VoidHold(
                wallet_pb2.VoidHoldRequest(idempotency_key=f"void-{hold_id}", hold_id=hold_id)
            )


async def test_wallet_updated_pushes_when_a_meter_is_opened(
    gql, new_org, wallet_gateway, wallet_stubs
) -> None:
    org = await new_org()
    await gql.data(TOP_UP, {"org": org.id, "amount": "100", "key": "meter-money"}, token=org.token)
    ws, first = await watch(wallet_gateway, org)
    meter_id = f"pod:{org.id}"
    try:
        assert first["runRate"]["perHour"]["amount"] == "0.000000"
        started = time.monotonic()
        await wallet_stubs.wallet.OpenMeter(
            wallet_pb2.OpenMeterRequest(
                meter_id=meter_id,
                organization_id=org.id,
                resource_id="pod-live",
                resource_type="pod",
                hourly_rate=3_600_000,
            )
        )
        # Nothing else changes this wallet: the first push is the meter's.
        wallet = await pushed(ws)
        elapsed = time.monotonic() - started
        assert wallet["runRate"]["perHour"]["amount"] == "3.600000"
        rates = {
            t["resourceType"]: t["perHour"]["amount"] for t in wallet["runRate"]["byResourceType"]
        }
        assert rates.get("pod") == "3.600000", rates
        assert elapsed < 5, f"the push took {elapsed:.1f} s"
    finally:
        await ws.close()
        await wallet_stubs.wallet.CloseMeter(wallet_pb2.CloseMeterRequest(meter_id=meter_id))


# ---------------------------------------------------------------------- a running meter

WALLET = """query($id: ID!) { organization(id: $id) { wallet {
  balance { amount currency } serviceStatus hoursRemaining
  runRate { perHour { amount currency } perDay { amount } perMonth { amount }
            byResourceType { resourceType perHour { amount } } }
} } }"""


async def test_the_wallet_of_an_organization_with_a_running_meter(
    gql, new_org, wallet_stubs
) -> None:
    org = await new_org()
    await gql.data(TOP_UP, {"org": org.id, "amount": "100", "key": "rate-money"}, token=org.token)
    rate = 1_234_567  # micro-units per hour
    meter_id = f"vm:{org.id}"
    await wallet_stubs.wallet.OpenMeter(
        wallet_pb2.OpenMeterRequest(
            meter_id=meter_id,
            organization_id=org.id,
            resource_id="vm-1",
            resource_type="vm",
            hourly_rate=rate,
        )
    )
    try:
        wallet = (await gql.data(WALLET, {"id": org.id}, token=org.token))["organization"]["wallet"]
    finally:
        await wallet_stubs.wallet.CloseMeter(wallet_pb2.CloseMeterRequest(meter_id=meter_id))
    run_rate = wallet["runRate"]
    assert run_rate["perHour"] == {"amount": "1.234567", "currency": "USD"}
    per_hour = micro(run_rate["perHour"]["amount"])
    assert micro(run_rate["perDay"]["amount"]) == 24 * per_hour
    # perMonth is 30 days (wallet.proto RunRate.per_month).
    assert micro(run_rate["perMonth"]["amount"]) == 30 * 24 * per_hour
    assert run_rate["perDay"]["amount"] == decimal_string(24 * rate)
    assert run_rate["perMonth"]["amount"] == decimal_string(720 * rate)
    by_type = {t["resourceType"]: t["perHour"]["amount"] for t in run_rate["byResourceType"]}
    assert by_type.get("vm") == "1.234567", by_type
    # hoursRemaining is balance / perHour (unrounded) of the same summary.
    hours = wallet["hoursRemaining"]
    assert isinstance(hours, float)
    balance = micro(wallet["balance"]["amount"])
    assert 0 < balance <= 100_000_000
    assert hours == pytest.approx(balance / per_hour, rel=1e-12)
    assert wallet["serviceStatus"] == "available"


# ---------------------------------------------------------------------- createOrganization


async def test_create_organization_retries_and_refusals(gql, new_org) -> None:
    org = await new_org()
    key = f"org-{uuid.uuid4().hex}"
    variables = {"name": "Retry Co", "currency": "USD", "key": key}
    first = (await gql.data(CREATE_ORG, variables, token=org.token))["createOrganization"]
    assert first["organization"]["name"] == "Retry Co"
    assert first["ownerToken"]
    again = (await gql.data(CREATE_ORG, variables, token=org.token))["createOrganization"]
    assert again["organization"]["id"] == first["organization"]["id"]
    assert again["ownerToken"] is None
    viewer = await gql.data(VIEWER, token=first["ownerToken"])
    assert viewer["viewer"]["organizationId"] == first["organization"]["id"]
    # The same key with another payload is refused, not a new organization.
    error = await gql.error(
        CREATE_ORG, {"name": "Other Co", "currency": "USD", "key": key}, token=org.token
    )
    assert error["extensions"]["code"] == "CONFLICT", error

    for bad, field in (
        ({"name": "Euro Co", "currency": "EUR"}, "currency"),
        ({"name": "", "currency": "USD"}, "name"),
        ({"name": "   ", "currency": "USD"}, "name"),
    ):
        error = await gql.error(CREATE_ORG, bad, token=org.token)
        assert error["extensions"]["code"] == "BAD_USER_INPUT", (bad, error)
        assert error["extensions"].get("field") == field, (bad, error)


CREATE_ORG_FULL = """mutation($name: String!) {
  createOrganization(name: $name, currency: "INR") {
    organization {
      id name
      wallet { currency balance { amount currency } serviceStatus }
      plan { name }
      projects { name }
      members { role user { email } }
      apiTokens { name role }
      billing { currentMonthTotal { amount } }
    }
    ownerToken
  }
}"""


async def test_the_new_organization_can_be_read_in_its_payload_only(gql, new_org) -> None:
    org = await new_org()
    created = (await gql.data(CREATE_ORG_FULL, {"name": "Payload Co"}, token=org.token))[
        "createOrganization"
    ]
    new = created["organization"]
    assert new["wallet"] == {
        "currency": "INR",
        "balance": {"amount": "0.000000", "currency": "INR"},
        "serviceStatus": new["wallet"]["serviceStatus"],
    }
    assert [p["name"] for p in new["projects"]] == ["default"]
    assert [m["role"] for m in new["members"]] == ["owner"]
    assert new["billing"]["currentMonthTotal"]["amount"] == "0.000000"
    assert new["plan"]["name"]
    assert [t["role"] for t in new["apiTokens"]] == ["owner"]
    # The next operation with the caller's token is back in its own organization only.
    query = "query($id: ID!) { organization(id: $id) { name } }"
    error = await gql.error(query, {"id": new["id"]}, token=org.token)
    assert error["extensions"]["code"] == "NOT_FOUND", error
    mine = await gql.data(query, {"id": new["id"]}, token=created["ownerToken"])
    assert mine["organization"]["name"] == "Payload Co"


# ---------------------------------------------------------------------- expiring tokens


async def test_an_expiry_in_the_past_is_bad_user_input(gql, new_org) -> None:
    org = await new_org()
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    variables = {"org": org.id, "name": "stale", "role": "MEMBER", "at": past}
    error = await gql.error(MAKE_TOKEN, variables, token=org.token)
    assert error["extensions"]["code"] == "BAD_USER_INPUT", error
    assert error["extensions"].get("field") == "expiresAt", error
    listed = await gql.data(TOKENS, {"id": org.id}, token=org.token)
    assert "stale" not in {t["name"] for t in listed["organization"]["apiTokens"]}


async def test_an_expired_token_is_refused_despite_the_identity_cache(gql, new_org) -> None:
    """The gateway keeps identities TTL_SECONDS (4 s), never past the token's own expiry."""
    org = await new_org()
    expires = datetime.now(UTC) + timedelta(seconds=2.5)
    made = await gql.data(
        MAKE_TOKEN,
        {"org": org.id, "name": "short", "role": "MEMBER", "at": expires.isoformat()},
        token=org.token,
    )
    token = made["createApiToken"]["token"]
    viewer = (await gql.data(VIEWER, token=token))["viewer"]  # now cached
    assert viewer["tokenId"] == made["createApiToken"]["apiToken"]["id"]
    assert datetime.fromisoformat(viewer["tokenExpiresAt"]) == expires
    left = (expires - datetime.now(UTC)).total_seconds()
    assert left > 0, "the test was too slow to use the token before it expired"
    await asyncio.sleep(left + 0.3)
    error = await gql.error(VIEWER, token=token)
    assert error["extensions"]["code"] == "UNAUTHENTICATED", error
    assert error["message"] == "token has expired"


# ---------------------------------------------------------------------- lastUsedAt


async def test_last_used_at_is_set_once_the_token_is_used(gql, new_org) -> None:
    org = await new_org()
    made = await token_for(gql, org, "MEMBER", name="used")
    assert made["apiToken"]["lastUsedAt"] is None

    async def listed() -> dict[str, Any]:
        listing = await gql.data(TOKENS, {"id": org.id}, token=org.token)
        [found] = [
            t for t in listing["organization"]["apiTokens"] if t["id"] == made["apiToken"]["id"]
        ]
        return found

    assert (await listed())["lastUsedAt"] is None
    started = datetime.now(UTC)
    await gql.data(VIEWER, token=made["token"])
    seen = await listed()
    assert seen["lastUsedAt"] is not None, seen
    used_at = datetime.fromisoformat(seen["lastUsedAt"])
    assert used_at >= datetime.fromisoformat(seen["createdAt"])
    assert abs((used_at - started).total_seconds()) < 5, (used_at, started)


async def test_a_saved_display_currency_with_no_rate_streams_the_wallets_own(
    gql, new_org, wallet_gateway, no_rate_in_effect
) -> None:
    """As `organization` does, walletUpdated shows the wallet's currency when the caller's saved
    preference has no rate (it failed with FAILED_PRECONDITION, the query worked)."""
    org = await new_org()
    await gql.data(TOP_UP, {"org": org.id, "amount": "3", "key": "pref-money"}, token=org.token)
    await gql.data(
        'mutation($org: ID!) { updatePreferences(organizationId: $org, displayCurrency: "INR")'
        " { displayCurrency } }",
        {"org": org.id},
        token=org.token,
    )
    with no_rate_in_effect():
        ws, first = await watch(wallet_gateway, org)
        await ws.close()
    assert first["balance"]["amount"] == "3.000000"  # USD: 3 USD in INR would be ~250
