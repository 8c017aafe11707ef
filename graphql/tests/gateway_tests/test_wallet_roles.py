"""Roles, enforced by the gateway: tokens of each role made through createApiToken, then what
each may read and change."""

from __future__ import annotations

from typing import Any

MAKE_TOKEN = """mutation($org: ID!, $name: String!, $role: Role!) {
  createApiToken(organizationId: $org, name: $name, role: $role) { token apiToken { id role } }
}"""
WALLET = "query($id: ID!) { organization(id: $id) { name wallet { balance { amount } } } }"
BILLING = "query($id: ID!) { organization(id: $id) { billing { currentMonthTotal { amount } } } }"
CARD = "query($id: ID!) { organization(id: $id) { name teamSize projects { name } } }"
PROJECT = 'mutation($org: ID!) { createProject(organizationId: $org, name: "p") { id } }'
TOP_UP = """mutation($org: ID!) {
  topUpWallet(organizationId: $org, amount: "1", currency: "USD", idempotencyKey: "roles") {
    wallet { balance { amount } }
  }
}"""
INVITE = """mutation($org: ID!, $role: Role!) {
  inviteMember(organizationId: $org, email: "new@example.com", role: $role) { role }
}"""


async def token_for(gql, org, role: str, *, by: str | None = None) -> dict[str, Any]:
    made = await gql.data(
        MAKE_TOKEN, {"org": org.id, "name": f"{role} token", "role": role}, token=by or org.token
    )
    token: dict[str, Any] = made["createApiToken"]
    assert token["apiToken"]["role"] == role.lower()
    return token


def code(body: dict[str, Any]) -> str:
    [error] = body["errors"]
    result: str = error["extensions"]["code"]
    return result


async def test_a_viewer_reads_the_card_but_changes_nothing(gql, new_org) -> None:
    org = await new_org()
    viewer = (await token_for(gql, org, "VIEWER"))["token"]
    card = await gql.data(CARD, {"id": org.id}, token=viewer)
    assert card["organization"]["teamSize"] == 1
    for mutation, variables in (
        (PROJECT, {"org": org.id}),
        (TOP_UP, {"org": org.id}),
        (MAKE_TOKEN, {"org": org.id, "name": "mine", "role": "VIEWER"}),
        (INVITE, {"org": org.id, "role": "VIEWER"}),
    ):
        error = await gql.error(mutation, variables, token=viewer)
        assert error["extensions"]["code"] == "FORBIDDEN", mutation


async def test_billing_fields_are_forbidden_to_members_and_viewers(gql, new_org) -> None:
    org = await new_org(name="Guarded")
    for role in ("MEMBER", "VIEWER"):
        token = (await token_for(gql, org, role))["token"]
        body = await gql(WALLET, {"id": org.id}, token=token)
        assert code(body) == "FORBIDDEN"
        assert body["errors"][0]["path"] == ["organization", "wallet"]
        # The rest of the card is still there.
        assert body["data"] == {"organization": {"name": "Guarded", "wallet": None}}
        assert code(await gql(BILLING, {"id": org.id}, token=token)) == "FORBIDDEN"


async def test_a_member_creates_projects_and_tokens_up_to_its_role(gql, new_org) -> None:
    org = await new_org()
    member = (await token_for(gql, org, "MEMBER"))["token"]
    assert (await gql.data(PROJECT, {"org": org.id}, token=member))["createProject"]["id"]
    await token_for(gql, org, "MEMBER", by=member)
    await token_for(gql, org, "VIEWER", by=member)
    for higher in ("BILLING", "ADMIN", "OWNER"):
        variables = {"org": org.id, "name": "escalate", "role": higher}
        error = await gql.error(MAKE_TOKEN, variables, token=member)
        assert error["extensions"]["code"] == "FORBIDDEN"
        assert "above your own role member" in error["message"]
    error = await gql.error(TOP_UP, {"org": org.id}, token=member)
    assert error["extensions"]["code"] == "FORBIDDEN"
    error = await gql.error(INVITE, {"org": org.id, "role": "VIEWER"}, token=member)
    assert error["extensions"]["code"] == "FORBIDDEN"


async def test_the_billing_role_handles_money_but_not_members(gql, new_org) -> None:
    org = await new_org()
    billing = (await token_for(gql, org, "BILLING"))["token"]
    topped = await gql.data(TOP_UP, {"org": org.id}, token=billing)
    assert topped["topUpWallet"]["wallet"]["balance"]["amount"] == "1.000000"
    wallet = await gql.data(WALLET, {"id": org.id}, token=billing)
    assert wallet["organization"]["wallet"]["balance"]["amount"] == "1.000000"
    assert (await gql.data(BILLING, {"id": org.id}, token=billing))["organization"]["billing"]
    error = await gql.error(INVITE, {"org": org.id, "role": "VIEWER"}, token=billing)
    assert error["extensions"]["code"] == "FORBIDDEN"
    variables = {"org": org.id, "name": "up", "role": "ADMIN"}
    assert (await gql.error(MAKE_TOKEN, variables, token=billing))["extensions"][
        "code"
    ] == "FORBIDDEN"


async def test_an_admin_manages_members_but_not_owners(gql, new_org) -> None:
    org = await new_org()
    admin = (await token_for(gql, org, "ADMIN"))["token"]
    invited = await gql.data(INVITE, {"org": org.id, "role": "ADMIN"}, token=admin)
    assert invited["inviteMember"]["role"] == "admin"
    error = await gql.error(INVITE, {"org": org.id, "role": "owner"}, token=admin)
    assert error["extensions"]["code"] == "FORBIDDEN"
    demote_owner = """mutation($org: ID!, $user: ID!) {
      setMemberRole(organizationId: $org, userId: $user, role: VIEWER) { role }
    }"""
    error = await gql.error(demote_owner, {"org": org.id, "user": org.user_id}, token=admin)
    assert error["extensions"]["code"] == "FORBIDDEN"
    remove_owner = (
        "mutation($org: ID!, $user: ID!) { removeMember(organizationId: $org, userId: $user) }"
    )
    error = await gql.error(remove_owner, {"org": org.id, "user": org.user_id}, token=admin)
    assert error["extensions"]["code"] == "FORBIDDEN"


async def test_who_may_revoke_which_token(gql, new_org) -> None:
    org = await new_org()
    member = await token_for(gql, org, "MEMBER")
    billing = await token_for(gql, org, "BILLING")
    revoke = "mutation($id: ID!) { revokeApiToken(id: $id) { id revokedAt } }"
    # A member may not revoke the billing token (above its role, made by someone else) …
    error = await gql.error(revoke, {"id": billing["apiToken"]["id"]}, token=member["token"])
    assert error["extensions"]["code"] == "FORBIDDEN"
    # … nor an unknown one, nor one of another organization: NOT_FOUND.
    other = await new_org()
    others = await token_for(gql, other, "VIEWER")
    error = await gql.error(revoke, {"id": others["apiToken"]["id"]}, token=member["token"])
    assert error["extensions"]["code"] == "NOT_FOUND"
    # It may revoke itself; the owner may revoke anything.
    own = await gql.data(revoke, {"id": member["apiToken"]["id"]}, token=member["token"])
    assert own["revokeApiToken"]["revokedAt"]
    done = await gql.data(revoke, {"id": billing["apiToken"]["id"]}, token=org.token)
    assert done["revokeApiToken"]["revokedAt"]


async def test_members_see_only_the_tokens_their_user_made(gql, new_org, wallet_stubs) -> None:
    from gpudeck.proto.wallet.v1 import account_pb2

    org = await new_org()
    invited = await gql.data(INVITE, {"org": org.id, "role": "MEMBER"}, token=org.token)
    assert invited["inviteMember"]["role"] == "member"
    members = await gql.data(
        "query($id: ID!) { organization(id: $id) { members { user { id email } role } } }",
        {"id": org.id},
        token=org.token,
    )
    [user] = [
        m["user"]["id"]
        for m in members["organization"]["members"]
        if m["user"]["email"] == "new@example.com"
    ]
    theirs = await wallet_stubs.accounts.CreateApiToken(
        account_pb2.CreateApiTokenRequest(
            organization_id=org.id, name="laptop", role="member", created_by=user
        )
    )
    await token_for(gql, org, "BILLING")
    query = "query($id: ID!) { organization(id: $id) { apiTokens { name } } }"
    seen = await gql.data(query, {"id": org.id}, token=theirs.token)
    assert seen["organization"]["apiTokens"] == [{"name": "laptop"}]
    everything = await gql.data(query, {"id": org.id}, token=org.token)
    names = {t["name"] for t in everything["organization"]["apiTokens"]}
    assert names == {"owner", "laptop", "BILLING token"}


async def test_a_role_may_be_written_as_a_string_or_a_bare_word(gql, new_org) -> None:
    org = await new_org()
    for literal in ('"viewer"', "VIEWER", '"Billing"'):
        made = await gql.data(
            'mutation($org: ID!) { createApiToken(organizationId: $org, name: "x", role: '
            + literal
            + ") { apiToken { role } } }",
            {"org": org.id},
            token=org.token,
        )
        assert made["createApiToken"]["apiToken"]["role"] == literal.strip('"').lower()
    bad = await gql(
        'mutation($org: ID!) { createApiToken(organizationId: $org, name: "x", role: "root") { token } }',
        {"org": org.id},
        token=org.token,
    )
    assert "role must be one of" in bad["errors"][0]["message"]


METERS = """query($id: ID!, $open: Boolean) { organization(id: $id) {
  serviceStatus
  meters(openOnly: $open) { id resourceId resourceType hourlyRate { amount currency }
                            totalCharged { amount } closedAt }
} }"""


async def test_every_member_sees_the_service_status_and_billing_roles_the_meters(
    gql, new_org, wallet_stubs
) -> None:
    """A member running pods needs to know they are paused (a banner), without the amounts;
    a console's pod list shows what each running resource costs an hour."""
    from gpudeck.proto.wallet.v1 import wallet_pb2

    org = await new_org()  # an empty wallet: resources running on it are paused
    for n, rate in enumerate((1_500_000, 2_000_000, 3_000_000)):
        await wallet_stubs.wallet.OpenMeter(
            wallet_pb2.OpenMeterRequest(
                meter_id=f"pod:{org.id}:{n}", organization_id=org.id, resource_id=f"pod-{n}",
                resource_type="pod", hourly_rate=rate,
            )
        )  # fmt: skip
    await wallet_stubs.wallet.CloseMeter(wallet_pb2.CloseMeterRequest(meter_id=f"pod:{org.id}:0"))
    owner = await gql.data(METERS, {"id": org.id}, token=org.token)
    running = owner["organization"]["meters"]
    assert [(m["resourceId"], m["hourlyRate"]) for m in running] == [
        ("pod-2", {"amount": "3.000000", "currency": "USD"}),
        ("pod-1", {"amount": "2.000000", "currency": "USD"}),
    ]
    everything = await gql.data(METERS, {"id": org.id, "open": False}, token=org.token)
    assert len(everything["organization"]["meters"]) == 3
    assert owner["organization"]["serviceStatus"] == "paused"
    for role in ("MEMBER", "VIEWER"):
        token = (await token_for(gql, org, role))["token"]
        body = await gql(METERS, {"id": org.id}, token=token)
        assert (
            body["data"]["organization"]["serviceStatus"]
            == (owner["organization"]["serviceStatus"])
        )
        assert code(body) == "FORBIDDEN"
        assert body["errors"][0]["path"] == ["organization", "meters"]
    error = await gql.error(
        "query($id: ID!) { organization(id: $id) { meters(first: 0) { id } } }",
        {"id": org.id},
        token=org.token,
    )
    assert error["extensions"]["code"] == "BAD_USER_INPUT"
    assert error["extensions"]["field"] == "first"
