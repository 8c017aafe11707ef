"""`walletUpdated` over real websockets (graphql-transport-ws), fed by the wallet's
`wallet.balance.changed` events on this run's NATS."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
from aiohttp import WSMsgType

from gpudeck.proto.wallet.v1 import account_pb2

TRANSPORT_WS = "graphql-transport-ws"
WATCH = """subscription($org: ID!, $display: String) {
  walletUpdated(organizationId: $org, displayCurrency: $display) {
    currency balance { amount currency } heldBalance { amount } spendable { amount }
    runRate { perHour { amount } } serviceStatus
  }
}"""
TOP_UP = """mutation($org: ID!, $amount: String!, $key: String!) {
  topUpWallet(organizationId: $org, amount: $amount, currency: "USD", idempotencyKey: $key) {
    transaction { id }
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


async def connect(client, payload: dict[str, Any] | None) -> aiohttp.ClientWebSocketResponse:
    ws = await client.ws_connect("/graphql", protocols=[TRANSPORT_WS])
    init: dict[str, Any] = {"type": "connection_init"}
    if payload is not None:
        init["payload"] = payload
    await ws.send_json(init)
    assert (await receive(ws))["type"] == "connection_ack"
    return ws


async def subscribe(ws, org_id: str, display: str | None = None, op: str = "1") -> None:
    variables = {"org": org_id, "display": display}
    await ws.send_json(
        {"id": op, "type": "subscribe", "payload": {"query": WATCH, "variables": variables}}
    )


async def test_wallet_updated_pushes_the_new_balance_after_a_top_up(
    gql, new_org, wallet_gateway
) -> None:
    org = await new_org()
    await gql.data(TOP_UP, {"org": org.id, "amount": "1", "key": "before"}, token=org.token)
    ws = await connect(wallet_gateway, {"Authorization": f"Bearer {org.token}"})
    try:
        await subscribe(ws, org.id)
        first = await receive(ws)
        assert first["type"] == "next", first
        wallet = first["payload"]["data"]["walletUpdated"]
        assert wallet["balance"] == {"amount": "1.000000", "currency": "USD"}
        assert wallet["serviceStatus"] == "available"

        started = time.monotonic()
        await gql.data(TOP_UP, {"org": org.id, "amount": "2.25", "key": "live"}, token=org.token)
        pushed = await receive(ws, timeout=8)
        elapsed = time.monotonic() - started
        assert pushed["type"] == "next", pushed
        assert pushed["id"] == "1"
        updated = pushed["payload"]["data"]["walletUpdated"]
        assert updated["balance"]["amount"] == "3.250000"
        assert updated["spendable"]["amount"] == "3.250000"
        assert elapsed < 5, f"the push took {elapsed:.1f} s"

        await ws.send_json({"id": "1", "type": "complete"})
        await ws.send_json({"type": "ping"})
        assert (await asyncio.wait_for(ws.receive_json(), 5))["type"] == "pong"
    finally:
        await ws.close()


async def test_other_organizations_changes_are_not_pushed(gql, new_org, wallet_gateway) -> None:
    """Nor do they wake this subscription (a woken one re-reads its own wallet and, finding it
    unchanged, pushes nothing: so the wakes themselves are counted)."""
    from gpudeck.gateway.app import LIVE

    live = wallet_gateway.server.app[LIVE]
    mine, theirs = await new_org(), await new_org()
    ws = await connect(wallet_gateway, {"authorization": f"Bearer {mine.token}"})
    try:
        await subscribe(ws, mine.id)
        assert (await receive(ws))["payload"]["data"]["walletUpdated"]["balance"]["amount"] == (
            "0.000000"
        )
        woken = live.generation(mine.id)
        await gql.data(TOP_UP, {"org": theirs.id, "amount": "5", "key": "x"}, token=theirs.token)
        try:
            extra = await receive(ws, timeout=2.5)
        except TimeoutError:
            extra = None
        assert extra is None, extra
        # Their wallet.balance.changed woke no one but their watchers: not every watcher (the
        # wakes of all), whatever mine's own announcements did meanwhile (its new wallet's).
        assert live.generation(mine.id)[0] == woken[0]
        await gql.data(TOP_UP, {"org": mine.id, "amount": "1", "key": "y"}, token=mine.token)
        await receive(ws)  # while mine does, as its own
        assert live.generation(mine.id)[1] != woken[1]
    finally:
        await ws.close()


async def test_a_subscription_without_a_token_is_unauthenticated(new_org, wallet_gateway) -> None:
    org = await new_org()
    ws = await connect(wallet_gateway, None)
    try:
        await subscribe(ws, org.id)
        reply = await receive(ws)
        errors = reply["payload"]["errors"] if reply["type"] == "next" else reply["payload"]
        assert errors[0]["extensions"]["code"] == "UNAUTHENTICATED"
    finally:
        await ws.close()


async def test_a_connection_with_a_token_that_is_not_valid_is_refused(wallet_gateway) -> None:
    ws = await wallet_gateway.ws_connect("/graphql", protocols=[TRANSPORT_WS])
    try:
        await ws.send_json({"type": "connection_init", "payload": {"Authorization": "Bearer x"}})
        msg = await asyncio.wait_for(ws.receive(), timeout=10)
        assert msg.type == WSMsgType.CLOSE and msg.data == 4403, msg
    finally:
        await ws.close()


async def test_a_subscription_follows_the_roles(gql, new_org, wallet_gateway) -> None:
    org, other = await new_org(), await new_org()
    made = await gql.data(
        'mutation($org: ID!) { createApiToken(organizationId: $org, name: "v", role: VIEWER)'
        " { token } }",
        {"org": org.id},
        token=org.token,
    )
    viewer = made["createApiToken"]["token"]
    ws = await connect(wallet_gateway, {"Authorization": f"Bearer {viewer}"})
    try:
        await subscribe(ws, org.id)
        reply = await receive(ws)
        errors = reply["payload"]["errors"] if reply["type"] == "next" else reply["payload"]
        assert errors[0]["extensions"]["code"] == "FORBIDDEN"
    finally:
        await ws.close()
    ws = await connect(wallet_gateway, {"Authorization": f"Bearer {org.token}"})
    try:
        await subscribe(ws, other.id)
        reply = await receive(ws)
        errors = reply["payload"]["errors"] if reply["type"] == "next" else reply["payload"]
        assert errors[0]["extensions"]["code"] == "NOT_FOUND"
    finally:
        await ws.close()


async def test_a_revoked_token_ends_its_subscription(
    gql, new_org, wallet_gateway, wallet_stubs
) -> None:
    org = await new_org()
    made = await gql.data(
        'mutation($org: ID!) { createApiToken(organizationId: $org, name: "b", role: BILLING)'
        " { token apiToken { id } } }",
        {"org": org.id},
        token=org.token,
    )
    token = made["createApiToken"]["token"]
    ws = await connect(wallet_gateway, {"Authorization": f"Bearer {token}"})
    try:
        await subscribe(ws, org.id)
        assert (await receive(ws))["type"] == "next"
        await wallet_stubs.accounts.RevokeApiToken(
            account_pb2.RevokeApiTokenRequest(
                organization_id=org.id, api_token_id=made["createApiToken"]["apiToken"]["id"]
            )
        )
        reply = await receive(ws, timeout=15)
        assert reply["type"] == "next"
        assert reply["payload"]["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
        assert (await receive(ws))["type"] == "complete"
    finally:
        await ws.close()


async def test_a_token_revoked_through_the_gateway_ends_its_subscription_at_once(
    gql, new_org, wallet_gateway
) -> None:
    """Not after the few seconds the token's answer is cached, and the next check: at once."""
    org = await new_org()
    made = await gql.data(
        'mutation($org: ID!) { createApiToken(organizationId: $org, name: "b", role: BILLING)'
        " { token apiToken { id } } }",
        {"org": org.id},
        token=org.token,
    )
    ws = await connect(
        wallet_gateway, {"Authorization": f"Bearer {made['createApiToken']['token']}"}
    )
    try:
        await subscribe(ws, org.id)
        assert (await receive(ws))["type"] == "next"
        await gql.data(
            "mutation($id: ID!) { revokeApiToken(id: $id) { id } }",
            {"id": made["createApiToken"]["apiToken"]["id"]},
            token=org.token,
        )
        reply = await receive(ws, timeout=2)
        assert reply["payload"]["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
    finally:
        await ws.close()


async def test_a_member_removed_or_demoted_through_the_gateway_is_unsubscribed_at_once(
    gql, new_org, wallet_gateway, wallet_stubs
) -> None:
    """removeMember and setMemberRole revoke the member's tokens, but left their subscriptions
    watching until the next check (4.5 s here); revokeApiToken ends them at once."""
    import uuid

    org = await new_org()
    for change in ("remove", "demote"):
        invited = await gql.data(
            "mutation($org: ID!, $email: String!) { inviteMember(organizationId: $org,"
            " email: $email, role: BILLING) { user { id } } }",
            {"org": org.id, "email": f"{uuid.uuid4().hex[:10]}@example.com"},
            token=org.token,
        )
        user = invited["inviteMember"]["user"]["id"]
        made = await wallet_stubs.accounts.CreateApiToken(
            account_pb2.CreateApiTokenRequest(
                organization_id=org.id, name="theirs", role="billing", created_by=user
            )
        )
        ws = await connect(wallet_gateway, {"Authorization": f"Bearer {made.token}"})
        try:
            await subscribe(ws, org.id)
            assert (await receive(ws))["type"] == "next"
            if change == "remove":
                mutation = "removeMember(organizationId: $org, userId: $user)"
            else:
                mutation = (
                    "setMemberRole(organizationId: $org, userId: $user, role: MEMBER) { role }"
                )
            await gql.data(
                f"mutation($org: ID!, $user: ID!) {{ {mutation} }}",
                {"org": org.id, "user": user},
                token=org.token,
            )
            reply = await receive(ws, timeout=2)
            assert reply["payload"]["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED", change
        finally:
            await ws.close()


async def test_the_live_summary_in_a_display_currency(
    gql, new_org, wallet_gateway, wallet_stubs
) -> None:
    from gpudeck.proto.wallet.v1 import wallet_pb2

    await wallet_stubs.wallet.SetExchangeRate(
        wallet_pb2.SetExchangeRateRequest(base="USD", quote="INR", rate="80", source="test")
    )
    org = await new_org()
    await gql.data(TOP_UP, {"org": org.id, "amount": "2", "key": "fx"}, token=org.token)
    ws = await connect(wallet_gateway, {"Authorization": f"Bearer {org.token}"})
    try:
        await subscribe(ws, org.id, display="INR")
        wallet = (await receive(ws))["payload"]["data"]["walletUpdated"]
        assert wallet["currency"] == "INR"
        assert wallet["balance"] == {"amount": "160.000000", "currency": "INR"}
    finally:
        await ws.close()


async def test_a_subscription_with_an_unknown_display_currency_ends_with_one_error(
    new_org, wallet_gateway
) -> None:
    org = await new_org()
    ws = await connect(wallet_gateway, {"Authorization": f"Bearer {org.token}"})
    try:
        await subscribe(ws, org.id, display="XYZ")
        reply = await receive(ws)
        assert reply["type"] == "error", reply  # the subscription's own error, not an event's
        [error] = reply["payload"]
        assert error["extensions"]["code"] == "BAD_USER_INPUT", error
        assert error["extensions"]["field"] == "displayCurrency", error
    finally:
        await ws.close()


async def test_a_subscription_shows_the_caller_s_preferred_currency(
    gql, new_org, wallet_gateway, wallet_stubs
) -> None:
    from gpudeck.proto.wallet.v1 import wallet_pb2

    org = await new_org()
    await wallet_stubs.wallet.SetExchangeRate(
        wallet_pb2.SetExchangeRateRequest(base="USD", quote="INR", rate="83.25", source="test")
    )
    await gql.data(
        'mutation($org: ID!) { updatePreferences(organizationId: $org, displayCurrency: "INR")'
        " { displayCurrency } }",
        {"org": org.id},
        token=org.token,
    )
    ws = await connect(wallet_gateway, {"Authorization": f"Bearer {org.token}"})
    try:
        await subscribe(ws, org.id)  # no displayCurrency: the preference, as organization does
        wallet = (await receive(ws))["payload"]["data"]["walletUpdated"]
        assert (wallet["currency"], wallet["balance"]["currency"]) == ("INR", "INR"), wallet
        await subscribe(ws, org.id, display="USD", op="2")  # an explicit one wins
        wallet = (await receive(ws))["payload"]["data"]["walletUpdated"]
        assert wallet["balance"]["currency"] == "USD", wallet
    finally:
        await ws.close()


async def test_an_organization_id_spelled_otherwise_is_watched_all_the_same(
    gql, new_org, wallet_gateway
) -> None:
    org = await new_org()
    ws = await connect(wallet_gateway, {"Authorization": f"Bearer {org.token}"})
    try:
        await subscribe(ws, org.id.upper())
        first = await receive(ws)
        assert first["type"] == "next", first
        await gql.data(TOP_UP, {"org": org.id, "amount": "2", "key": "upper"}, token=org.token)
        pushed = await receive(ws, timeout=8)
        assert pushed["payload"]["data"]["walletUpdated"]["balance"]["amount"] == "2.000000"
    finally:
        await ws.close()


async def test_a_second_connection_init_on_graphql_ws_is_refused(new_org, wallet_gateway) -> None:
    """One per connection, as graphql-transport-ws has it: the legacy protocol took more, each
    with a keep-alive task of its own, and acknowledged an invalid token in the second (the
    first one's identity stood)."""
    org = await new_org()

    async def answer(ws: aiohttp.ClientWebSocketResponse) -> Any:
        reply = await receive(ws)
        while reply["type"] == "ka":  # graphql-ws's keep-alive
            reply = await receive(ws)
        return reply

    for second in ({"Authorization": "Bearer not-a-valid-token"}, {}):
        async with wallet_gateway.ws_connect("/graphql", protocols=["graphql-ws"]) as ws:
            await ws.send_json(
                {"type": "connection_init", "payload": {"Authorization": f"Bearer {org.token}"}}
            )
            assert (await answer(ws))["type"] == "connection_ack"
            await ws.send_json({"type": "connection_init", "payload": second})
            assert (await answer(ws))["type"] == "connection_error"


async def test_a_query_over_graphql_ws_is_a_bad_request_not_an_internal_error(
    new_org, wallet_gateway, caplog
) -> None:
    """The legacy protocol runs subscriptions only: a query was INTERNAL, logged as a bug."""
    import logging

    org = await new_org()
    async with wallet_gateway.ws_connect("/graphql", protocols=["graphql-ws"]) as ws:
        await ws.send_json(
            {"type": "connection_init", "payload": {"Authorization": f"Bearer {org.token}"}}
        )
        query = "query($org: ID!) { organization(id: $org) { name } }"
        await ws.send_json(
            {"id": "q", "type": "start", "payload": {"query": query, "variables": {"org": org.id}}}
        )
        reply = await receive(ws)
        while reply["type"] in ("ka", "connection_ack"):
            reply = await receive(ws)
    errors = reply["payload"]["errors"] if "errors" in reply["payload"] else [reply["payload"]]
    assert errors[0]["extensions"]["code"] == "BAD_REQUEST", reply
    assert "graphql-transport-ws" in errors[0]["message"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
