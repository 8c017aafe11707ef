"""A token acts in its own organization with its own role, however ids are spelled, whatever key
it sends, and never outlives the token that made it."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

MAKE_TOKEN = """mutation($org: ID!, $name: String!, $role: Role!, $expires: DateTime) {
  createApiToken(organizationId: $org, name: $name, role: $role, expiresAt: $expires) {
    token apiToken { id role expiresAt }
  }
}"""
INVITE = """mutation($org: ID!, $email: String!, $role: Role!) {
  inviteMember(organizationId: $org, email: $email, role: $role) { user { id } role }
}"""
SET_ROLE = """mutation($org: ID!, $user: ID!, $role: Role!) {
  setMemberRole(organizationId: $org, userId: $user, role: $role) { role }
}"""
REMOVE = "mutation($org: ID!, $user: ID!) { removeMember(organizationId: $org, userId: $user) }"
CREATE_ORG = """mutation($key: String) {
  createOrganization(name: "Second", currency: "USD", idempotencyKey: $key) {
    organization { id name wallet { balance { amount } } }
    ownerToken
  }
}"""


async def make_token(gql, org, role: str, *, by: str | None = None, **variables: Any) -> dict:
    made = await gql.data(
        MAKE_TOKEN,
        {"org": org.id, "name": f"{role} token", "role": role, **variables},
        token=by or org.token,
    )
    token: dict[str, Any] = made["createApiToken"]
    return token


def spellings(value: str) -> list[str]:
    plain = uuid.UUID(value)
    return [value.upper(), plain.hex, "{" + value + "}", plain.urn]


async def test_an_id_spelled_otherwise_is_the_same_id(gql, new_org) -> None:
    org = await new_org(name="Spelled")
    for spelled in spellings(org.id):
        data = await gql.data("query($id: ID!) { organization(id: $id) { id name } }",
                              {"id": spelled}, token=org.token)  # fmt: skip
        assert data["organization"] == {"id": org.id, "name": "Spelled"}
    project = await gql.data(
        'mutation($org: ID!) { createProject(organizationId: $org, name: "p") { id } }',
        {"org": org.id.upper()},
        token=org.token,
    )
    assert project["createProject"]["id"]
    other = await new_org()
    error = await gql.error("query($id: ID!) { organization(id: $id) { id } }",
                            {"id": other.id.upper()}, token=org.token)  # fmt: skip
    assert error["extensions"]["code"] == "NOT_FOUND"


async def test_an_admin_cannot_touch_an_owner_however_the_id_is_spelled(gql, new_org) -> None:
    org = await new_org()
    second = await gql.data(
        INVITE, {"org": org.id, "email": f"{uuid.uuid4().hex[:8]}@example.com", "role": "OWNER"},
        token=org.token,
    )  # fmt: skip
    assert second["inviteMember"]["role"] == "owner"
    admin = (await make_token(gql, org, "ADMIN"))["token"]
    for spelled in [org.user_id, *spellings(org.user_id)]:
        for mutation, extra in ((SET_ROLE, {"role": "VIEWER"}), (REMOVE, {})):
            variables = {"org": org.id, "user": spelled, **extra}
            error = await gql.error(mutation, variables, token=admin)
            assert error["extensions"]["code"] == "FORBIDDEN", (spelled, error)
    # The owner is still an owner, and their token still works.
    viewer = await gql.data("{ viewer { organizations { role } } }", token=org.token)
    assert viewer["viewer"]["organizations"] == [{"role": "owner"}]


async def test_a_member_that_is_not_one_is_not_found_and_a_bad_id_bad_input(gql, new_org) -> None:
    org = await new_org()
    error = await gql.error(SET_ROLE, {"org": org.id, "user": str(uuid.uuid4()), "role": "VIEWER"},
                            token=org.token)  # fmt: skip
    assert (error["extensions"]["code"], error["extensions"]["field"]) == ("NOT_FOUND", "userId")
    error = await gql.error(REMOVE, {"org": org.id, "user": "nobody"}, token=org.token)
    assert (error["extensions"]["code"], error["extensions"]["field"]) == (
        "BAD_USER_INPUT",
        "userId",
    )


async def test_a_creation_key_belongs_to_the_token_that_sent_it(gql, new_org) -> None:
    org = await new_org()
    first = (await gql.data(CREATE_ORG, {"key": "make-second"}, token=org.token))[
        "createOrganization"
    ]
    assert first["ownerToken"]
    # The same token retrying gets the first organization (its secret only once).
    again = (await gql.data(CREATE_ORG, {"key": "make-second"}, token=org.token))[
        "createOrganization"
    ]
    assert again["organization"]["id"] == first["organization"]["id"]
    assert again["ownerToken"] is None
    # A member token of the same user sending that key makes its own, and sees nothing of the first.
    member = (await make_token(gql, org, "MEMBER"))["token"]
    theirs = (await gql.data(CREATE_ORG, {"key": "make-second"}, token=member))[
        "createOrganization"
    ]
    assert theirs["organization"]["id"] not in (first["organization"]["id"], org.id)
    error = await gql.error("query($id: ID!) { organization(id: $id) { name } }",
                            {"id": first["organization"]["id"]}, token=member)  # fmt: skip
    assert error["extensions"]["code"] == "NOT_FOUND"


RETRY_THEN = """mutation($key: String, $org: ID!) {
  c: createOrganization(name: "Second", currency: "USD", idempotencyKey: $key) {
    organization { id }
  }
  %s
}"""
LATER_IN_THE_NEW_ONE = {
    "t": 't: createApiToken(organizationId: $org, name: "regained", role: OWNER) { token }',
    "u": 'u: topUpWallet(organizationId: $org, amount: "5", currency: "USD",'
    ' idempotencyKey: "regained") { wallet { balance { amount } } }',
}


async def test_a_retried_creation_acts_as_owner_in_its_own_payload_only(gql, new_org) -> None:
    """A member token's retry must not lend it the new organization's owner for the rest of
    the document: it could make itself an owner token there, or move money."""
    org = await new_org()
    member = (await make_token(gql, org, "MEMBER"))["token"]
    key = f"scoped-{uuid.uuid4().hex[:8]}"
    first = (await gql.data(CREATE_ORG, {"key": key}, token=member))["createOrganization"]
    new_id = first["organization"]["id"]
    for alias, later in LATER_IN_THE_NEW_ONE.items():
        body = await gql(RETRY_THEN % later, {"key": key, "org": new_id}, token=member)
        [error] = body["errors"]
        assert (error["path"], error["extensions"]["code"]) == ([alias], "NOT_FOUND"), body
    # The retry's own payload still shows it, as its owner.
    again = (await gql.data(CREATE_ORG, {"key": key}, token=member))["createOrganization"]
    assert again["organization"]["wallet"] == {"balance": {"amount": "0.000000"}}


CREATE_ORG_CARD = """mutation($key: String) {
  createOrganization(name: "Second", currency: "USD", idempotencyKey: $key) {
    organization { id name teamSize kycStatus planCode owner { email } }
    ownerToken ownerApiToken { id }
  }
}"""


async def test_a_retry_after_the_user_left_shows_nothing_of_the_organization(gql, new_org) -> None:
    """Once the caller's user no longer owns it, the retry's payload hides the organization
    as `organization(id:)` hides another one: NOT_FOUND."""
    org = await new_org()
    key = f"left-{uuid.uuid4().hex[:8]}"
    first = (await gql.data(CREATE_ORG_CARD, {"key": key}, token=org.token))["createOrganization"]
    new_id, owner = first["organization"]["id"], first["ownerToken"]
    email = f"{uuid.uuid4().hex[:8]}@example.com"
    await gql.data(INVITE, {"org": new_id, "email": email, "role": "OWNER"}, token=owner)
    await gql.data(REMOVE, {"org": new_id, "user": org.user_id}, token=owner)
    body = await gql(CREATE_ORG_CARD, {"key": key}, token=org.token)
    assert body["data"] == {
        "createOrganization": {"organization": None, "ownerToken": None, "ownerApiToken": None}
    }
    refusals = sorted((e["path"][-1], e["extensions"]["code"]) for e in body["errors"])
    assert refusals == [("organization", "NOT_FOUND"), ("ownerApiToken", "NOT_FOUND")]
    assert email not in str(body)


async def test_a_token_that_expires_makes_no_token_that_outlives_it(gql, new_org) -> None:
    org = await new_org()
    ends = (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0)
    short = await make_token(gql, org, "ADMIN", expires=ends.isoformat())
    child = await make_token(gql, org, "ADMIN", by=short["token"])
    assert datetime.fromisoformat(child["apiToken"]["expiresAt"]) == ends
    sooner = (ends - timedelta(minutes=30)).isoformat()
    child = await make_token(gql, org, "MEMBER", by=short["token"], expires=sooner)
    assert datetime.fromisoformat(child["apiToken"]["expiresAt"]) == ends - timedelta(minutes=30)
    later = (ends + timedelta(days=1)).isoformat()
    variables = {"org": org.id, "name": "lasting", "role": "ADMIN", "expires": later}
    error = await gql.error(MAKE_TOKEN, variables, token=short["token"])
    assert (error["extensions"]["code"], error["extensions"]["field"]) == (
        "BAD_USER_INPUT",
        "expiresAt",
    )
    # A token that does not expire may make either.
    lasting = await make_token(gql, org, "ADMIN")
    assert lasting["apiToken"]["expiresAt"] is None


KEYED_TOKEN = """mutation($org: ID!, $name: String!, $key: String) {
  createApiToken(organizationId: $org, name: $name, role: MEMBER, idempotencyKey: $key) {
    token apiToken { id name }
  }
}"""
KEYED_INVITE = """mutation($org: ID!, $email: String!, $key: String) {
  inviteMember(organizationId: $org, email: $email, role: MEMBER, idempotencyKey: $key) {
    user { id } role
  }
}"""
KEYED_REMOVE = """mutation($org: ID!, $user: ID!, $key: String) {
  removeMember(organizationId: $org, userId: $user, idempotencyKey: $key)
}"""
KEYED_DELETE_PROJECT = """mutation($org: ID!, $id: ID!, $key: String) {
  deleteProject(organizationId: $org, id: $id, idempotencyKey: $key) { id name }
}"""


async def test_a_retried_token_creation_returns_the_first_token_without_its_secret(
    gql, new_org
) -> None:
    org = await new_org()
    variables = {"org": org.id, "name": "ci", "key": "token-1"}
    first = (await gql.data(KEYED_TOKEN, variables, token=org.token))["createApiToken"]
    again = (await gql.data(KEYED_TOKEN, variables, token=org.token))["createApiToken"]
    assert first["token"] and again["token"] is None
    assert again["apiToken"] == first["apiToken"]
    listed = await gql.data("query($id: ID!) { organization(id: $id) { apiTokens { name } } }",
                            {"id": org.id}, token=org.token)  # fmt: skip
    assert [t["name"] for t in listed["organization"]["apiTokens"]].count("ci") == 1
    error = await gql.error(KEYED_TOKEN, {**variables, "name": "other"}, token=org.token)
    assert error["extensions"]["code"] == "CONFLICT"
    # A key is one request in its organization, whoever sends it: another token's use of it is
    # a CONFLICT (only its sender gets the first answer back) and makes nothing.
    admin = (await make_token(gql, org, "ADMIN"))["token"]
    theirs = await gql.error(KEYED_TOKEN, variables, token=admin)
    assert theirs["extensions"]["code"] == "CONFLICT"
    listed = await gql.data("query($id: ID!) { organization(id: $id) { apiTokens { name } } }",
                            {"id": org.id}, token=org.token)  # fmt: skip
    assert [t["name"] for t in listed["organization"]["apiTokens"]].count("ci") == 1


async def test_retried_member_and_project_changes_answer_as_the_first_time(gql, new_org) -> None:
    org = await new_org()
    email = f"{uuid.uuid4().hex[:8]}@example.com"
    invite = {"org": org.id, "email": email, "key": "invite-1"}
    first = (await gql.data(KEYED_INVITE, invite, token=org.token))["inviteMember"]
    assert (await gql.data(KEYED_INVITE, invite, token=org.token))["inviteMember"] == first
    unkeyed = await gql.error(KEYED_INVITE, {**invite, "key": None}, token=org.token)
    assert unkeyed["extensions"]["reason"] == "ALREADY_MEMBER"

    remove = {"org": org.id, "user": first["user"]["id"], "key": "remove-1"}
    for _ in range(2):
        assert (await gql.data(KEYED_REMOVE, remove, token=org.token))["removeMember"] is True
    gone = await gql.error(KEYED_REMOVE, {**remove, "key": "remove-2"}, token=org.token)
    assert gone["extensions"]["code"] == "NOT_FOUND"

    made = await gql.data(
        'mutation($org: ID!) { createProject(organizationId: $org, name: "temp") { id } }',
        {"org": org.id},
        token=org.token,
    )
    delete = {"org": org.id, "id": made["createProject"]["id"], "key": "delete-1"}
    first_delete = await gql.data(KEYED_DELETE_PROJECT, delete, token=org.token)
    assert await gql.data(KEYED_DELETE_PROJECT, delete, token=org.token) == first_delete
    # Another organization's live project stays NOT_FOUND (the wallet checks whose it is).
    kept = await gql.data(
        'mutation($org: ID!) { createProject(organizationId: $org, name: "kept") { id } }',
        {"org": org.id},
        token=org.token,
    )
    other = await new_org()
    theirs = {"org": other.id, "id": kept["createProject"]["id"], "key": "x"}
    error = await gql.error(KEYED_DELETE_PROJECT, theirs, token=other.token)
    assert error["extensions"]["code"] == "NOT_FOUND"
    # With a key the project's organization used: still NOT_FOUND (it was CONFLICT, telling
    # the caller the project exists and which keys its organization used).
    used = await gql.error(KEYED_DELETE_PROJECT, {**theirs, "key": "delete-1"}, token=other.token)
    assert used["extensions"]["code"] == "NOT_FOUND"
    projects = await gql.data("query($id: ID!) { organization(id: $id) { projects { name } } }",
                              {"id": org.id}, token=org.token)  # fmt: skip
    assert {"name": "kept"} in projects["organization"]["projects"]


async def test_an_organization_made_by_a_token_that_expires_gets_an_owner_token_as_short(
    gql, new_org
) -> None:
    org = await new_org()
    ends = (datetime.now(UTC) + timedelta(hours=2)).replace(microsecond=0)
    short = await make_token(gql, org, "MEMBER", expires=ends.isoformat())
    made = await gql.data(
        'mutation { createOrganization(name: "Brief", currency: "USD") {'
        " ownerToken ownerApiToken { expiresAt } organization { apiTokens { expiresAt } } } }",
        token=short["token"],
    )
    payload = made["createOrganization"]
    assert datetime.fromisoformat(payload["ownerApiToken"]["expiresAt"]) == ends
    assert payload["organization"]["apiTokens"] == [payload["ownerApiToken"]]


async def test_an_expiry_no_timestamp_holds_is_bad_input(gql, new_org) -> None:
    org = await new_org()
    variables = {"org": org.id, "name": "ancient", "role": "MEMBER"}
    error = await gql.error(MAKE_TOKEN, {**variables, "expires": "0001-01-01T00:00:00+14:00"},
                            token=org.token)  # fmt: skip
    assert (error["extensions"]["code"], error["extensions"]["field"]) == (
        "BAD_USER_INPUT",
        "expiresAt",
    )


async def test_a_retry_after_the_owner_token_was_revoked_shows_nothing_of_the_organization(
    gql, new_org
) -> None:
    """A member token of A made organization B; B's owner revoked the token it got. Replaying
    the creation still lent the member token owner rights over B in the payload: B's wallet,
    billing and tokens, for good (keys are never pruned)."""
    org = await new_org()
    member = (await make_token(gql, org, "MEMBER"))["token"]
    key = f"revoked-{uuid.uuid4().hex[:8]}"
    first = (await gql.data(CREATE_ORG_CARD, {"key": key}, token=member))["createOrganization"]
    owner_token_id = first["ownerApiToken"]["id"]
    await gql.data(
        "mutation($id: ID!) { revokeApiToken(id: $id) { id } }",
        {"id": owner_token_id},
        token=first["ownerToken"],
    )
    body = await gql(CREATE_ORG_CARD, {"key": key}, token=member)
    assert body["data"] == {
        "createOrganization": {"organization": None, "ownerToken": None, "ownerApiToken": None}
    }
    refusals = sorted((e["path"][-1], e["extensions"]["code"]) for e in body["errors"])
    assert refusals == [("organization", "NOT_FOUND"), ("ownerApiToken", "NOT_FOUND")]


async def test_a_demoted_owner_cannot_undo_it_while_its_token_is_remembered(
    gql, new_org, wallet_stubs
) -> None:
    """The gateway keeps identities a few seconds. A demoted (or removed) owner's token, used
    at once, promoted its user back to owner (or invited it back) and minted a new owner token:
    the demotion was undone for good. The wallet refuses it (a demotion through another gateway
    replica); this gateway also forgets the tokens of a member it removed."""
    from gpudeck.proto.wallet.v1 import account_pb2

    org = await new_org()
    for n, undo in enumerate(("demote", "remove")):
        email = f"{undo}-{uuid.uuid4().hex[:8]}@example.com"
        invited = await gql.data(
            INVITE, {"org": org.id, "email": email, "role": "OWNER"}, token=org.token
        )
        user = invited["inviteMember"]["user"]["id"]
        made = await wallet_stubs.accounts.CreateApiToken(
            account_pb2.CreateApiTokenRequest(
                organization_id=org.id, name=f"v{n}", role="owner", created_by=user
            )
        )
        assert (await gql.data("{ viewer { role } }", token=made.token))["viewer"]["role"]
        if undo == "demote":  # by another gateway replica: this one still knows the token
            await wallet_stubs.accounts.SetMemberRole(
                account_pb2.SetMemberRoleRequest(
                    organization_id=org.id, user_id=user, role="viewer"
                )
            )
            back = await gql(
                SET_ROLE, {"org": org.id, "user": user, "role": "OWNER"}, token=made.token
            )
        else:  # through this gateway, which forgets the token at once
            await gql.data(REMOVE, {"org": org.id, "user": user}, token=org.token)
            back = await gql(
                INVITE, {"org": org.id, "email": email, "role": "OWNER"}, token=made.token
            )
        assert back["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED", back
        minted = await gql(
            MAKE_TOKEN, {"org": org.id, "name": "keep", "role": "OWNER"}, token=made.token
        )
        assert minted["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED", minted
    members = await gql.data(
        "query($id: ID!) { organization(id: $id) { members { user { email } role } } }",
        {"id": org.id},
        token=org.token,
    )
    roles = {m["user"]["email"]: m["role"] for m in members["organization"]["members"]}
    assert sorted(roles.values()) == ["owner", "viewer"], roles
