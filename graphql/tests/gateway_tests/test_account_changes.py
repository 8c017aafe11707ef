"""renameApiToken, renameProject, deleteProject, renameOrganization, setKycStatus and
deleteOrganization through the gateway,
against the real wallet, NATS and PostgreSQL: who may, what each refusal looks like, and that a
deleted organization's tokens stop working."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import grpc
import pytest

from gpudeck.proto.common.v1.money_pb2 import Money
from gpudeck.proto.wallet.v1 import account_pb2, wallet_pb2

from .conftest import ADMIN_TOKEN

USD = 1_000_000
MAKE_TOKEN = """mutation($org: ID!, $name: String!, $role: Role!) {
  createApiToken(organizationId: $org, name: $name, role: $role) {
    token apiToken { id name role }
  }
}"""
RENAME_TOKEN = """mutation($id: ID!, $name: String!) {
  renameApiToken(id: $id, name: $name) { id name role revokedAt }
}"""
CREATE_PROJECT = """mutation($org: ID!, $name: String!) {
  createProject(organizationId: $org, name: $name) { id name }
}"""
RENAME_PROJECT = """mutation($org: ID!, $id: ID!, $name: String!) {
  renameProject(organizationId: $org, id: $id, name: $name) { id name createdAt }
}"""
DELETE_PROJECT = """mutation($org: ID!, $id: ID!) {
  deleteProject(organizationId: $org, id: $id) { id name }
}"""
DELETE_ORG = """mutation($id: ID!, $confirm: String!) {
  deleteOrganization(id: $id, confirmName: $confirm)
}"""
PROJECTS = "query($id: ID!) { organization(id: $id) { projects { id name } } }"
TOKENS = "query($id: ID!) { organization(id: $id) { apiTokens { id name revokedAt } } }"
CARD = "query($id: ID!) { organization(id: $id) { id name wallet { balance { amount } } } }"
VIEWER = "{ viewer { tokenId organizationId } }"
TOP_UP = """mutation($org: ID!, $key: String!) {
  topUpWallet(organizationId: $org, amount: "5", currency: "USD", idempotencyKey: $key) {
    wallet { balance { amount } }
  }
}"""


async def token_for(gql, org, role: str, name: str = "") -> dict[str, Any]:
    """A token of `role` made by the owner: its secret and apiToken."""
    made = await gql.data(
        MAKE_TOKEN, {"org": org.id, "name": name or f"{role} token", "role": role}, token=org.token
    )
    token: dict[str, Any] = made["createApiToken"]
    return token


async def projects(gql, org) -> dict[str, str]:
    listed = await gql.data(PROJECTS, {"id": org.id}, token=org.token)
    return {p["id"]: p["name"] for p in listed["organization"]["projects"]}


async def new_project(gql, org, name: str) -> str:
    made = await gql.data(CREATE_PROJECT, {"org": org.id, "name": name}, token=org.token)
    project_id: str = made["createProject"]["id"]
    return project_id


async def project_in_wallet(wallet_stubs, project_id: str) -> account_pb2.Project:
    project: account_pb2.Project = await wallet_stubs.accounts.GetProject(
        account_pb2.GetProjectRequest(project_id=project_id)
    )
    return project


async def unauthenticated_within(gql, token: str, seconds: float) -> float:
    """How long until `token` is UNAUTHENTICATED at the gateway (fails after `seconds`)."""
    started = time.monotonic()
    while True:
        body = await gql(VIEWER, token=token)
        if body.get("errors"):
            [error] = body["errors"]
            assert error["extensions"]["code"] == "UNAUTHENTICATED", error
            return time.monotonic() - started
        assert time.monotonic() - started < seconds, f"token still works after {seconds} s"
        await asyncio.sleep(0.2)


# ---------------------------------------------------------------------------------- tokens


async def test_rename_an_api_token(gql, new_org) -> None:
    org = await new_org()
    made = await token_for(gql, org, "MEMBER", "ci")
    renamed = await gql.data(
        RENAME_TOKEN, {"id": made["apiToken"]["id"], "name": "  deploy  "}, token=org.token
    )
    assert renamed["renameApiToken"] == {
        "id": made["apiToken"]["id"],
        "name": "deploy",
        "role": "member",
        "revokedAt": None,
    }
    listed = await gql.data(TOKENS, {"id": org.id}, token=org.token)
    names = {t["id"]: t["name"] for t in listed["organization"]["apiTokens"]}
    assert names[made["apiToken"]["id"]] == "deploy"
    # The secret still works, and a member may rename its own token.
    own = await gql.data(
        RENAME_TOKEN, {"id": made["apiToken"]["id"], "name": "mine"}, token=made["token"]
    )
    assert own["renameApiToken"]["name"] == "mine"


async def test_another_organizations_token_cannot_be_renamed(gql, new_org) -> None:
    org, other = await new_org(), await new_org()
    theirs = await token_for(gql, other, "VIEWER", "theirs")
    for token_id in (theirs["apiToken"]["id"], str(uuid.uuid4())):
        error = await gql.error(RENAME_TOKEN, {"id": token_id, "name": "x"}, token=org.token)
        assert error["extensions"]["code"] == "NOT_FOUND", error
    listed = await gql.data(TOKENS, {"id": other.id}, token=other.token)
    names = {t["id"]: t["name"] for t in listed["organization"]["apiTokens"]}
    assert names[theirs["apiToken"]["id"]] == "theirs"


# ---------------------------------------------------------------------------------- projects


async def test_rename_and_delete_a_project(gql, new_org, wallet_stubs) -> None:
    org = await new_org()
    ml = await new_project(gql, org, "ml")
    renamed = await gql.data(
        RENAME_PROJECT, {"org": org.id, "id": ml, "name": "training"}, token=org.token
    )
    assert renamed["renameProject"]["id"] == ml
    assert renamed["renameProject"]["name"] == "training"
    assert sorted((await projects(gql, org)).values()) == ["default", "training"]
    assert (await project_in_wallet(wallet_stubs, ml)).name == "training"

    # A name another live project has is a conflict.
    error = await gql.error(
        RENAME_PROJECT, {"org": org.id, "id": ml, "name": "default"}, token=org.token
    )
    assert error["extensions"]["code"] == "CONFLICT", error

    deleted = await gql.data(DELETE_PROJECT, {"org": org.id, "id": ml}, token=org.token)
    assert deleted["deleteProject"] == {"id": ml, "name": "training"}
    assert list((await projects(gql, org)).values()) == ["default"]
    # Deleted: not renamed, not deleted again; the last project stays.
    for mutation, variables in (
        (RENAME_PROJECT, {"org": org.id, "id": ml, "name": "again"}),
        (DELETE_PROJECT, {"org": org.id, "id": ml}),
    ):
        error = await gql.error(mutation, variables, token=org.token)
        assert error["extensions"]["code"] == "NOT_FOUND", error
    [default] = await projects(gql, org)
    error = await gql.error(DELETE_PROJECT, {"org": org.id, "id": default}, token=org.token)
    assert error["extensions"]["code"] == "FAILED_PRECONDITION", error


async def test_another_organizations_project_is_not_found(gql, new_org, wallet_stubs) -> None:
    org, other = await new_org(), await new_org()
    theirs = await new_project(gql, other, "theirs")
    for project_id in (theirs, str(uuid.uuid4())):
        for mutation, variables in (
            (RENAME_PROJECT, {"org": org.id, "id": project_id, "name": "stolen"}),
            (DELETE_PROJECT, {"org": org.id, "id": project_id}),
        ):
            error = await gql.error(mutation, variables, token=org.token)
            assert error["extensions"]["code"] == "NOT_FOUND", error
    # Naming the other organization itself is NOT_FOUND too.
    error = await gql.error(
        RENAME_PROJECT, {"org": other.id, "id": theirs, "name": "stolen"}, token=org.token
    )
    assert error["extensions"]["code"] == "NOT_FOUND", error
    error = await gql.error(DELETE_PROJECT, {"org": other.id, "id": theirs}, token=org.token)
    assert error["extensions"]["code"] == "NOT_FOUND", error
    kept = await project_in_wallet(wallet_stubs, theirs)
    assert kept.name == "theirs" and not kept.HasField("deleted_at")
    assert sorted((await projects(gql, other)).values()) == ["default", "theirs"]


async def test_who_may_rename_and_delete_projects(gql, new_org) -> None:
    org = await new_org()
    project = await new_project(gql, org, "shared")
    viewer = (await token_for(gql, org, "VIEWER"))["token"]
    member = (await token_for(gql, org, "MEMBER"))["token"]
    billing = (await token_for(gql, org, "BILLING"))["token"]
    admin = (await token_for(gql, org, "ADMIN"))["token"]

    rename = {"org": org.id, "id": project, "name": "by viewer"}
    error = await gql.error(RENAME_PROJECT, rename, token=viewer)
    assert error["extensions"]["code"] == "FORBIDDEN", error
    assert error["path"] == ["renameProject"]
    for token in (viewer, member, billing):
        error = await gql.error(DELETE_PROJECT, {"org": org.id, "id": project}, token=token)
        assert error["extensions"]["code"] == "FORBIDDEN", error
    assert (await projects(gql, org))[project] == "shared"

    renamed = await gql.data(
        RENAME_PROJECT, {"org": org.id, "id": project, "name": "by member"}, token=member
    )
    assert renamed["renameProject"]["name"] == "by member"
    deleted = await gql.data(DELETE_PROJECT, {"org": org.id, "id": project}, token=admin)
    assert deleted["deleteProject"]["id"] == project
    assert project not in await projects(gql, org)


# ---------------------------------------------------------------------------------- organizations


async def test_only_an_owner_may_delete_the_organization(gql, new_org) -> None:
    org = await new_org(name="Kept Co")
    admin = (await token_for(gql, org, "ADMIN"))["token"]
    error = await gql.error(DELETE_ORG, {"id": org.id, "confirm": "Kept Co"}, token=admin)
    assert error["extensions"]["code"] == "FORBIDDEN", error
    assert error["path"] == ["deleteOrganization"]
    # Another organization's owner: NOT_FOUND, as for one that does not exist.
    other = await new_org(name="Kept Co")
    error = await gql.error(DELETE_ORG, {"id": org.id, "confirm": "Kept Co"}, token=other.token)
    assert error["extensions"]["code"] == "NOT_FOUND", error
    card = await gql.data(CARD, {"id": org.id}, token=org.token)
    assert card["organization"]["name"] == "Kept Co"
    assert (await gql.data(VIEWER, token=admin))["viewer"]["organizationId"] == org.id


async def test_a_wrong_confirmation_name_is_bad_user_input(gql, new_org) -> None:
    org = await new_org(name="Careful Co")
    for wrong in ("careful co", "Careful", ""):
        error = await gql.error(DELETE_ORG, {"id": org.id, "confirm": wrong}, token=org.token)
        assert error["extensions"]["code"] == "BAD_USER_INPUT", (wrong, error)
        assert error["extensions"].get("field") == "confirmName", (wrong, error)
    assert (await gql.data(CARD, {"id": org.id}, token=org.token))["organization"]["id"] == org.id


async def test_an_organization_with_cash_left_is_not_deleted(gql, new_org) -> None:
    org = await new_org(name="Funded Co")
    await gql.data(TOP_UP, {"org": org.id, "key": uuid.uuid4().hex}, token=org.token)
    error = await gql.error(DELETE_ORG, {"id": org.id, "confirm": "Funded Co"}, token=org.token)
    assert error["extensions"]["code"] == "FAILED_PRECONDITION", error
    assert error["extensions"].get("reason") == "ORGANIZATION_IN_USE", error
    assert error["extensions"].get("field") == "id", error
    assert "cash" in error["message"]
    card = await gql.data(CARD, {"id": org.id}, token=org.token)
    assert card["organization"]["wallet"]["balance"]["amount"] == "5.000000"


async def test_deleting_the_organization_ends_its_tokens(gql, new_org, wallet_stubs) -> None:
    org = await new_org(name="Doomed Co")
    admin = (await token_for(gql, org, "ADMIN"))["token"]
    # Credits only: they are forfeited, nothing blocks the deletion.
    await wallet_stubs.wallet.Transfer(
        wallet_pb2.TransferRequest(
            idempotency_key=uuid.uuid4().hex,
            organization_id=org.id,
            kind=wallet_pb2.CREDIT_GRANT,
            amount=Money(amount=3 * USD),
            credit_source="promotion",
        )
    )
    # Both tokens are known to (cached by) the gateway before the deletion.
    assert (await gql.data(VIEWER, token=admin))["viewer"]["organizationId"] == org.id
    assert (await gql.data(VIEWER, token=org.token))["viewer"]["organizationId"] == org.id

    done = await gql.data(DELETE_ORG, {"id": org.id, "confirm": "Doomed Co"}, token=org.token)
    assert done == {"deleteOrganization": True}

    # The token that deleted it stops at once; any other within the identity cache's life.
    error = await gql.error(VIEWER, token=org.token)
    assert error["extensions"]["code"] == "UNAUTHENTICATED", error
    await unauthenticated_within(gql, admin, seconds=6)
    await unauthenticated_within(gql, org.token, seconds=6)
    for mutation, variables in (
        (CARD, {"id": org.id}),
        (DELETE_ORG, {"id": org.id, "confirm": "Doomed Co"}),
    ):
        error = await gql.error(mutation, variables, token=admin)
        assert error["extensions"]["code"] == "UNAUTHENTICATED", error
    # The wallet agrees: the organization is gone.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wallet_stubs.accounts.GetOrganization(
            account_pb2.GetOrganizationRequest(organization_id=org.id)
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


RENAME_ORG = """mutation($id: ID!, $name: String!) {
  renameOrganization(id: $id, name: $name) { id name }
}"""
SET_KYC = """mutation($org: ID!, $status: String!) {
  setKycStatus(organizationId: $org, status: $status) { id kycStatus }
}"""


async def test_an_owner_or_admin_renames_the_organization(gql, new_org) -> None:
    org, other = await new_org(), await new_org()
    renamed = await gql.data(RENAME_ORG, {"id": org.id, "name": "  Acme Labs "}, token=org.token)
    assert renamed["renameOrganization"] == {"id": org.id, "name": "Acme Labs"}
    card = await gql.data("query($id: ID!) { organization(id: $id) { name } }", {"id": org.id},
                          token=org.token)  # fmt: skip
    assert card["organization"]["name"] == "Acme Labs"
    member = (
        await gql.data(MAKE_TOKEN, {"org": org.id, "name": "m", "role": "MEMBER"}, token=org.token)
    )["createApiToken"]["token"]
    error = await gql.error(RENAME_ORG, {"id": org.id, "name": "Mine"}, token=member)
    assert error["extensions"]["code"] == "FORBIDDEN", error
    error = await gql.error(RENAME_ORG, {"id": other.id, "name": "Mine"}, token=org.token)
    assert error["extensions"]["code"] == "NOT_FOUND", error
    error = await gql.error(RENAME_ORG, {"id": org.id, "name": "  "}, token=org.token)
    assert (error["extensions"]["code"], error["extensions"].get("field")) == (
        "BAD_USER_INPUT",
        "name",
    ), error


async def test_only_the_platform_admin_records_kyc_reviews(gql, new_org) -> None:
    org = await new_org(verified=False)
    done = await gql.data(SET_KYC, {"org": org.id, "status": "verified"}, token=ADMIN_TOKEN)
    assert done["setKycStatus"] == {"id": org.id, "kycStatus": "verified"}
    card = await gql.data("query($id: ID!) { organization(id: $id) { kycStatus } }",
                          {"id": org.id}, token=org.token)  # fmt: skip
    assert card["organization"]["kycStatus"] == "verified"
    error = await gql.error(SET_KYC, {"org": org.id, "status": "pending"}, token=org.token)
    assert error["extensions"]["code"] == "FORBIDDEN", error
    error = await gql.error(SET_KYC, {"org": org.id, "status": "approved"}, token=ADMIN_TOKEN)
    assert (error["extensions"]["code"], error["extensions"].get("field")) == (
        "BAD_USER_INPUT",
        "status",
    ), error
    assert error["message"].startswith("status "), error
    missing = str(uuid.uuid4())
    error = await gql.error(SET_KYC, {"org": missing, "status": "pending"}, token=ADMIN_TOKEN)
    assert error["extensions"]["code"] == "NOT_FOUND", error
