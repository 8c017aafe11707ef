"""The organization card, projects, members, tokens and preferences, against the real wallet."""

from __future__ import annotations

from datetime import UTC, datetime

CARD = """query($id: ID!) {
  organization(id: $id) {
    id name createdAt teamSize owner { email } currency kycStatus planCode
    projects(first: 5) { id name }
    members { user { email } role }
  }
}"""


async def test_the_organization_card(gql, new_org) -> None:
    org = await new_org(name="Card Co", currency="INR")
    card = (await gql.data(CARD, {"id": org.id}, token=org.token))["organization"]
    assert card["id"] == org.id
    assert card["name"] == "Card Co"
    assert card["teamSize"] == 1
    assert card["owner"] == {"email": org.email}
    assert card["currency"] == "INR"
    assert card["kycStatus"] == "verified"
    assert card["planCode"] == "standard"
    created = datetime.fromisoformat(card["createdAt"])
    assert abs((datetime.now(UTC) - created).total_seconds()) < 120
    assert [p["name"] for p in card["projects"]] == ["default"]
    assert card["members"] == [{"user": {"email": org.email}, "role": "owner"}]


async def test_another_organizations_id_is_not_found(gql, new_org) -> None:
    mine, theirs = await new_org(), await new_org()
    error = await gql.error(CARD, {"id": theirs.id}, token=mine.token)
    assert error["extensions"]["code"] == "NOT_FOUND"
    assert error["path"] == ["organization"]
    nonexistent = "01900000-0000-7000-8000-000000000000"
    same = await gql.error(CARD, {"id": nonexistent}, token=mine.token)
    assert same["extensions"]["code"] == "NOT_FOUND"
    assert same["message"] == error["message"].replace(theirs.id, nonexistent)
    mutation = 'mutation($org: ID!) { createProject(organizationId: $org, name: "x") { id } }'
    refused = await gql.error(mutation, {"org": theirs.id}, token=mine.token)
    assert refused["extensions"]["code"] == "NOT_FOUND"


async def test_create_a_project_and_see_it_first(gql, new_org) -> None:
    org = await new_org()
    made = await gql.data(
        'mutation($org: ID!) { createProject(organizationId: $org, name: "training") '
        "{ id name createdAt } }",
        {"org": org.id},
        token=org.token,
    )
    project = made["createProject"]
    assert project["name"] == "training"
    listed = await gql.data(
        "query($id: ID!) { organization(id: $id) { projects(first: 1) { id name } } }",
        {"id": org.id},
        token=org.token,
    )
    assert listed["organization"]["projects"] == [{"id": project["id"], "name": "training"}]


async def test_a_bad_page_size_names_the_argument(gql, new_org) -> None:
    org = await new_org()
    error = await gql.error(
        "query($id: ID!) { organization(id: $id) { projects(first: 0) { id } } }",
        {"id": org.id},
        token=org.token,
    )
    assert error["extensions"] == {"code": "BAD_USER_INPUT", "field": "first"}
    assert "first" in error["message"]


async def test_a_wallet_refusal_names_the_field(gql, new_org) -> None:
    org = await new_org()
    error = await gql.error(
        'mutation($org: ID!) { createProject(organizationId: $org, name: "  ") { id } }',
        {"org": org.id},
        token=org.token,
    )
    assert error["extensions"]["code"] == "BAD_USER_INPUT"
    assert error["extensions"]["field"] == "name"
    assert "name" in error["message"]


async def test_members_invited_and_their_roles_changed(gql, new_org) -> None:
    org = await new_org()
    invited = await gql.data(
        'mutation($org: ID!) { inviteMember(organizationId: $org, email: "bill@example.com",'
        ' role: BILLING, name: "Bill") { user { id email name } role } }',
        {"org": org.id},
        token=org.token,
    )
    member = invited["inviteMember"]
    assert member["role"] == "billing" and member["user"]["name"] == "Bill"
    changed = await gql.data(
        "mutation($org: ID!, $user: ID!) { setMemberRole(organizationId: $org, userId: $user,"
        " role: VIEWER) { role } }",
        {"org": org.id, "user": member["user"]["id"]},
        token=org.token,
    )
    assert changed["setMemberRole"]["role"] == "viewer"
    card = await gql.data(
        "query($id: ID!) { organization(id: $id) { teamSize } }", {"id": org.id}, token=org.token
    )
    assert card["organization"]["teamSize"] == 2
    removed = await gql.data(
        "mutation($org: ID!, $user: ID!) { removeMember(organizationId: $org, userId: $user) }",
        {"org": org.id, "user": member["user"]["id"]},
        token=org.token,
    )
    assert removed["removeMember"] is True


async def test_the_last_owner_cannot_step_down(gql, new_org) -> None:
    org = await new_org()
    error = await gql.error(
        "mutation($org: ID!, $user: ID!) { setMemberRole(organizationId: $org, userId: $user,"
        " role: ADMIN) { role } }",
        {"org": org.id, "user": org.user_id},
        token=org.token,
    )
    assert error["extensions"]["code"] == "FAILED_PRECONDITION"
    assert error["extensions"]["reason"] == "LAST_OWNER"


async def test_api_tokens_listed_without_secrets(gql, new_org) -> None:
    org = await new_org()
    made = await gql.data(
        'mutation($org: ID!, $at: DateTime) { createApiToken(organizationId: $org, name: "ci",'
        " role: MEMBER, expiresAt: $at) { token apiToken { id name role expiresAt } } }",
        {"org": org.id, "at": "2099-01-01T00:00:00+00:00"},
        token=org.token,
    )
    created = made["createApiToken"]
    assert created["token"].startswith("gpd_")
    assert created["apiToken"]["role"] == "member"
    assert created["apiToken"]["expiresAt"].startswith("2099-01-01T00:00:00")
    listed = await gql.data(
        "query($id: ID!) { organization(id: $id) { apiTokens { id name role createdBy } } }",
        {"id": org.id},
        token=org.token,
    )
    tokens = {t["name"]: t for t in listed["organization"]["apiTokens"]}
    assert set(tokens) == {"ci", "owner"}
    assert tokens["ci"]["createdBy"] == org.user_id


async def test_preferences_change_only_what_is_given(gql, new_org) -> None:
    org = await new_org(currency="INR")
    query = (
        "query($id: ID!) { organization(id: $id) { preferences { displayCurrency theme "
        "compactMode emailNotifications lowBalanceNotifications } } }"
    )
    before = (await gql.data(query, {"id": org.id}, token=org.token))["organization"]
    assert before["preferences"]["displayCurrency"] == "INR"
    updated = await gql.data(
        'mutation($org: ID!) { updatePreferences(organizationId: $org, theme: "dark",'
        ' displayCurrency: "usd", compactMode: true) { displayCurrency theme compactMode'
        " emailNotifications } }",
        {"org": org.id},
        token=org.token,
    )
    assert updated["updatePreferences"] == {
        "displayCurrency": "USD",
        "theme": "dark",
        "compactMode": True,
        "emailNotifications": before["preferences"]["emailNotifications"],
    }
    error = await gql.error(
        'mutation($org: ID!) { updatePreferences(organizationId: $org, theme: "neon") { theme } }',
        {"org": org.id},
        token=org.token,
    )
    assert error["extensions"]["code"] == "BAD_USER_INPUT"
    assert error["extensions"]["field"] == "theme"
