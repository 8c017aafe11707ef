"""AccountService over the real gRPC server and PostgreSQL: tenancy, tokens, roles, projects."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from psycopg_pool import AsyncConnectionPool

from gpudeck.proto.common.v1.money_pb2 import Money
from gpudeck.proto.wallet.v1 import account_pb2 as pb
from gpudeck.proto.wallet.v1 import wallet_pb2 as wpb
from gpudeck.proto.wallet.v1.account_pb2_grpc import AccountServiceStub
from gpudeck.proto.wallet.v1.wallet_pb2_grpc import WalletServiceStub
from gpudeck.wallet import demo

Stub = AccountServiceStub


def email() -> str:
    return f"{uuid.uuid4().hex[:12]}@example.com"


async def new_org(
    stub: Stub, *, name: str = "Acme", currency: str = "USD", owner: str = "", key: str = ""
) -> pb.CreateOrganizationResponse:
    request = pb.CreateOrganizationRequest(name=name, currency=currency, idempotency_key=key)
    if owner:
        request.owner_user_id = owner
    else:
        request.owner_email = email()
    created: pb.CreateOrganizationResponse = await stub.CreateOrganization(request)
    return created


async def refused(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value


def field_of(err: grpc.aio.AioRpcError) -> str | None:
    return dict(err.trailing_metadata() or ()).get("x-error-field")  # type: ignore[no-any-return]


def reason_of(err: grpc.aio.AioRpcError) -> str | None:
    return dict(err.trailing_metadata() or ()).get("x-error-reason")  # type: ignore[no-any-return]


def in_future(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(datetime.now(UTC) + timedelta(seconds=seconds))
    return ts


async def invite(stub: Stub, org: str, role: str, address: str = "") -> pb.Member:
    request = pb.InviteMemberRequest(organization_id=org, email=address or email(), role=role)
    member: pb.Member = await stub.InviteMember(request)
    return member


async def token_for(stub: Stub, org: str, role: str, created_by: str = "", **kw: Any) -> str:
    request = pb.CreateApiTokenRequest(
        organization_id=org, name=f"{role} token", role=role, created_by=created_by, **kw
    )
    made: pb.CreateApiTokenResponse = await stub.CreateApiToken(request)
    return made.token


# ---------------------------------------------------------------------------------- tokens


async def test_a_new_organization_comes_with_an_owner_token_that_authenticates(
    account_stub: Stub,
) -> None:
    created = await new_org(account_stub, name="Acme Labs", currency="INR")
    org = created.organization
    assert org.name == "Acme Labs" and org.currency == "INR" and org.kyc_status == "unverified"
    assert org.team_size == 1 and org.owner.email.endswith("@example.com")
    assert created.owner_token.startswith("gpd_") and len(created.owner_token) == 44
    assert created.owner_api_token.role == "owner"

    who = await account_stub.Authenticate(pb.AuthenticateRequest(token=created.owner_token))
    assert who.organization_id == org.id and who.role == "owner"
    assert who.user_id == org.owner.id and who.email == org.owner.email
    assert who.token_id == created.owner_api_token.id
    assert list(who.organizations) == [
        pb.OrganizationRole(organization_id=org.id, name="Acme Labs", role="owner")
    ]


async def test_a_new_organization_has_a_wallet_and_a_default_project(
    account_stub: Stub, wallet_pool: AsyncConnectionPool
) -> None:
    org = (await new_org(account_stub, currency="INR")).organization
    listed = await account_stub.ListProjects(pb.ListProjectsRequest(organization_id=org.id))
    assert [p.name for p in listed.projects] == ["default"]
    async with wallet_pool.connection() as conn:
        cur = await conn.execute(
            "SELECT currency, balance FROM wallets WHERE organization_id = %s", (uuid.UUID(org.id),)
        )
        assert await cur.fetchone() == ("INR", 0)


async def test_a_revoked_token_is_refused_on_the_very_next_call(account_stub: Stub) -> None:
    org = (await new_org(account_stub)).organization
    made = await account_stub.CreateApiToken(
        pb.CreateApiTokenRequest(organization_id=org.id, name="ci", role="member")
    )
    await account_stub.Authenticate(pb.AuthenticateRequest(token=made.token))

    revoked = await account_stub.RevokeApiToken(
        pb.RevokeApiTokenRequest(organization_id=org.id, api_token_id=made.api_token.id)
    )
    assert revoked.HasField("revoked_at")
    err = await refused(account_stub.Authenticate(pb.AuthenticateRequest(token=made.token)))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "revoked" in (err.details() or "")
    again = await account_stub.RevokeApiToken(
        pb.RevokeApiTokenRequest(organization_id=org.id, api_token_id=made.api_token.id)
    )
    assert again.revoked_at == revoked.revoked_at


async def test_an_expired_token_is_refused(
    account_stub: Stub, wallet_pool: AsyncConnectionPool
) -> None:
    org = (await new_org(account_stub)).organization
    made = await account_stub.CreateApiToken(
        pb.CreateApiTokenRequest(
            organization_id=org.id, name="short", role="viewer", expires_at=in_future(3600)
        )
    )
    who = await account_stub.Authenticate(pb.AuthenticateRequest(token=made.token))
    assert who.expires_at == made.api_token.expires_at
    async with wallet_pool.connection() as conn:
        await conn.execute(
            "UPDATE api_tokens SET expires_at = now() - interval '1 second' WHERE id = %s",
            (uuid.UUID(made.api_token.id),),
        )
    err = await refused(account_stub.Authenticate(pb.AuthenticateRequest(token=made.token)))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "expired" in (err.details() or "")


@pytest.mark.parametrize("token", ["gpd_" + "x" * 40, "", "y" * 5000])
async def test_an_unknown_token_is_refused(account_stub: Stub, token: str) -> None:
    err = await refused(account_stub.Authenticate(pb.AuthenticateRequest(token=token)))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "unknown" in (err.details() or "") or "required" in (err.details() or "")


async def test_a_token_sees_only_its_own_organization_though_its_creator_is_in_another(
    account_stub: Stub,
) -> None:
    a = (await new_org(account_stub, name="A")).organization
    b = (await new_org(account_stub, name="B", owner=a.owner.id)).organization
    assert b.owner.id == a.owner.id
    token = await token_for(account_stub, a.id, "admin", created_by=a.owner.id)

    who = await account_stub.Authenticate(pb.AuthenticateRequest(token=token))
    assert who.organization_id == a.id and who.role == "admin" and who.user_id == a.owner.id
    assert [o.organization_id for o in who.organizations] == [a.id]


async def test_a_token_may_not_outrank_its_creator(account_stub: Stub) -> None:
    org = (await new_org(account_stub)).organization
    admin = await invite(account_stub, org.id, "admin")
    viewer = await invite(account_stub, org.id, "viewer")

    assert await token_for(account_stub, org.id, "admin", created_by=admin.user.id)
    err = await refused(token_for(account_stub, org.id, "owner", created_by=admin.user.id))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and field_of(err) == "role"
    err = await refused(token_for(account_stub, org.id, "viewer", created_by=viewer.user.id))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    outsider = (await new_org(account_stub)).organization.owner.id
    err = await refused(token_for(account_stub, org.id, "viewer", created_by=outsider))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and field_of(err) == "created_by"


async def test_a_token_cannot_expire_in_the_past(account_stub: Stub) -> None:
    org = (await new_org(account_stub)).organization
    err = await refused(token_for(account_stub, org.id, "viewer", expires_at=in_future(-5)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and field_of(err) == "expires_at"


async def test_last_used_is_written_at_most_once_a_minute(account_stub: Stub) -> None:
    created = await new_org(account_stub)
    org = created.organization.id
    for _ in range(3):
        await account_stub.Authenticate(pb.AuthenticateRequest(token=created.owner_token))
    [token] = (
        await account_stub.ListApiTokens(pb.ListApiTokensRequest(organization_id=org))
    ).api_tokens
    assert token.HasField("last_used_at")
    first = token.last_used_at
    await account_stub.Authenticate(pb.AuthenticateRequest(token=created.owner_token))
    [token] = (
        await account_stub.ListApiTokens(pb.ListApiTokensRequest(organization_id=org))
    ).api_tokens
    assert token.last_used_at == first


async def test_listed_tokens_never_show_a_secret(account_stub: Stub) -> None:
    created = await new_org(account_stub)
    listed = await account_stub.ListApiTokens(
        pb.ListApiTokensRequest(organization_id=created.organization.id)
    )
    assert created.owner_token not in str(listed)
    assert [t.name for t in listed.api_tokens] == ["owner"]


# ---------------------------------------------------------------------------------- members


async def test_the_last_owner_can_be_neither_removed_nor_demoted(account_stub: Stub) -> None:
    org = (await new_org(account_stub)).organization
    owner = org.owner.id
    for call in (
        account_stub.RemoveMember(pb.RemoveMemberRequest(organization_id=org.id, user_id=owner)),
        account_stub.SetMemberRole(
            pb.SetMemberRoleRequest(organization_id=org.id, user_id=owner, role="admin")
        ),
    ):
        err = await refused(call)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "last owner" in (err.details() or "")


async def test_a_token_manages_members_as_its_role_allows_them_as_they_are_now(
    account_stub: Stub,
) -> None:
    """The wallet checks the calling token's role against the member's role as it is under the
    organization's lock. Only the gateway checked, on a list read earlier in the operation: an
    admin's removeMember of a member promoted to owner meanwhile went through."""
    org = (await new_org(account_stub)).organization
    made = await account_stub.CreateApiToken(
        pb.CreateApiTokenRequest(organization_id=org.id, name="ops", role="admin")
    )
    as_admin = (("x-actor", f"token:{made.api_token.id}"),)
    x = await invite(account_stub, org.id, "member")
    promoted = await account_stub.SetMemberRole(
        pb.SetMemberRoleRequest(organization_id=org.id, user_id=x.user.id, role="billing"),
        metadata=as_admin,
    )
    assert promoted.role == "billing"  # within the admin's reach
    await account_stub.SetMemberRole(  # the owner makes x an owner (no token: trusted)
        pb.SetMemberRoleRequest(organization_id=org.id, user_id=x.user.id, role="owner")
    )
    for call in (
        account_stub.RemoveMember(
            pb.RemoveMemberRequest(organization_id=org.id, user_id=x.user.id), metadata=as_admin
        ),
        account_stub.SetMemberRole(
            pb.SetMemberRoleRequest(organization_id=org.id, user_id=x.user.id, role="viewer"),
            metadata=as_admin,
        ),
        account_stub.SetMemberRole(  # handing out a role above its own
            pb.SetMemberRoleRequest(
                organization_id=org.id,
                user_id=(await invite(account_stub, org.id, "member")).user.id,
                role="owner",
            ),
            metadata=as_admin,
        ),
    ):
        err = await refused(call)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err.details()
    members = await account_stub.ListMembers(pb.ListMembersRequest(organization_id=org.id))
    assert {m.user.id: m.role for m in members.members}[x.user.id] == "owner"
    # A member's token manages no one.
    member_token = await account_stub.CreateApiToken(
        pb.CreateApiTokenRequest(organization_id=org.id, name="dev", role="member")
    )
    err = await refused(
        account_stub.RemoveMember(
            pb.RemoveMemberRequest(organization_id=org.id, user_id=x.user.id),
            metadata=(("x-actor", f"token:{member_token.api_token.id}"),),
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_with_a_second_owner_the_first_may_step_down(account_stub: Stub) -> None:
    org = (await new_org(account_stub)).organization
    second = await invite(account_stub, org.id, "owner")
    changed = await account_stub.SetMemberRole(
        pb.SetMemberRoleRequest(organization_id=org.id, user_id=org.owner.id, role="billing")
    )
    assert changed.role == "billing"
    now = await account_stub.GetOrganization(pb.GetOrganizationRequest(organization_id=org.id))
    assert now.owner.id == second.user.id and now.team_size == 2
    err = await refused(
        account_stub.RemoveMember(
            pb.RemoveMemberRequest(organization_id=org.id, user_id=second.user.id)
        )
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_inviting_creates_the_user_once_and_lists_members_by_role(account_stub: Stub) -> None:
    org = (await new_org(account_stub)).organization
    address = email()
    viewer = await invite(account_stub, org.id, "viewer", address.upper())
    assert viewer.user.email == address and viewer.role == "viewer"
    err = await refused(invite(account_stub, org.id, "admin", address))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS and field_of(err) == "email"
    assert reason_of(err) == "ALREADY_MEMBER"
    other = (await new_org(account_stub)).organization
    again = await invite(account_stub, other.id, "member", address)
    assert again.user.id == viewer.user.id
    admin = await invite(account_stub, org.id, "admin")

    members = await account_stub.ListMembers(pb.ListMembersRequest(organization_id=org.id))
    assert [(m.user.id, m.role) for m in members.members] == [
        (org.owner.id, "owner"),
        (admin.user.id, "admin"),
        (viewer.user.id, "viewer"),
    ]


async def test_removing_a_member_revokes_the_tokens_they_made(account_stub: Stub) -> None:
    org = (await new_org(account_stub)).organization
    admin = await invite(account_stub, org.id, "admin")
    token = await token_for(account_stub, org.id, "member", created_by=admin.user.id)
    await account_stub.Authenticate(pb.AuthenticateRequest(token=token))

    await account_stub.RemoveMember(
        pb.RemoveMemberRequest(organization_id=org.id, user_id=admin.user.id)
    )
    err = await refused(account_stub.Authenticate(pb.AuthenticateRequest(token=token)))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "revoked" in (err.details() or "")


async def test_demoting_a_member_revokes_their_tokens_that_now_outrank_them(
    account_stub: Stub,
) -> None:
    org = (await new_org(account_stub)).organization
    admin = await invite(account_stub, org.id, "admin")
    strong = await token_for(account_stub, org.id, "admin", created_by=admin.user.id)
    weak = await token_for(account_stub, org.id, "member", created_by=admin.user.id)

    await account_stub.SetMemberRole(
        pb.SetMemberRoleRequest(organization_id=org.id, user_id=admin.user.id, role="member")
    )
    err = await refused(account_stub.Authenticate(pb.AuthenticateRequest(token=strong)))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (await account_stub.Authenticate(pb.AuthenticateRequest(token=weak))).role == "member"


# ---------------------------------------------------------------------------------- organizations


async def test_creating_again_with_the_same_key_returns_the_first_organization(
    account_stub: Stub, wallet_pool: AsyncConnectionPool
) -> None:
    owner = (await new_org(account_stub)).organization.owner.id
    first = await new_org(account_stub, name="Twice", owner=owner, key="org-1")
    second = await new_org(account_stub, name="Twice", owner=owner, key="org-1")
    assert second.organization.id == first.organization.id
    assert second.owner_api_token.id == first.owner_api_token.id
    assert first.owner_token and not second.owner_token
    async with wallet_pool.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM organizations WHERE owner_user_id = %s AND name = 'Twice'",
            (uuid.UUID(owner),),
        )
        assert await cur.fetchone() == (1,)


async def test_the_same_key_with_another_payload_is_refused(account_stub: Stub) -> None:
    owner = (await new_org(account_stub)).organization.owner.id
    await new_org(account_stub, name="One", owner=owner, key="org-2")
    err = await refused(new_org(account_stub, name="Other", owner=owner, key="org-2"))
    assert err.code() == grpc.StatusCode.ABORTED and field_of(err) == "idempotency_key"
    err = await refused(new_org(account_stub, name="One", currency="INR", owner=owner, key="org-2"))
    assert err.code() == grpc.StatusCode.ABORTED


async def test_keys_are_per_owner(account_stub: Stub) -> None:
    a = (await new_org(account_stub)).organization.owner.id
    b = (await new_org(account_stub)).organization.owner.id
    first = await new_org(account_stub, name="Same", owner=a, key="shared")
    second = await new_org(account_stub, name="Same", owner=b, key="shared")
    assert first.organization.id != second.organization.id


async def test_rename_and_kyc_status(account_stub: Stub) -> None:
    org = (await new_org(account_stub)).organization
    renamed = await account_stub.UpdateOrganization(
        pb.UpdateOrganizationRequest(organization_id=org.id, name="  Renamed  ")
    )
    assert renamed.name == "Renamed"
    verified = await account_stub.SetKycStatus(
        pb.SetKycStatusRequest(organization_id=org.id, kyc_status="verified")
    )
    assert verified.kyc_status == "verified" and verified.name == "Renamed"


# ---------------------------------------------------------------------------------- projects


async def test_projects_are_listed_most_recently_used_first(account_stub: Stub) -> None:
    org = (await new_org(account_stub)).organization.id
    made = {}
    for name in ("one", "two", "three"):
        request = pb.CreateProjectRequest(organization_id=org, name=name)
        made[name] = (await account_stub.CreateProject(request)).id
    touched = await account_stub.TouchProject(pb.TouchProjectRequest(project_id=made["one"]))
    assert touched.last_used_at.ToDatetime() > touched.created_at.ToDatetime()

    listed = await account_stub.ListProjects(pb.ListProjectsRequest(organization_id=org))
    assert [p.name for p in listed.projects] == ["one", "three", "two", "default"]
    first_two = await account_stub.ListProjects(
        pb.ListProjectsRequest(organization_id=org, limit=2)
    )
    assert [p.name for p in first_two.projects] == ["one", "three"]


async def test_create_project_is_idempotent_by_key_and_names_are_unique(account_stub: Stub) -> None:
    org = (await new_org(account_stub)).organization.id
    request = pb.CreateProjectRequest(organization_id=org, name="ml", idempotency_key="p1")
    first = await account_stub.CreateProject(request)
    assert await account_stub.CreateProject(request) == first
    err = await refused(
        account_stub.CreateProject(pb.CreateProjectRequest(organization_id=org, name="ml"))
    )
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS and field_of(err) == "name"
    assert reason_of(err) == "NAME_TAKEN"
    err = await refused(
        account_stub.CreateProject(
            pb.CreateProjectRequest(organization_id=org, name="other", idempotency_key="p1")
        )
    )
    assert err.code() == grpc.StatusCode.ABORTED


async def test_project_names_differing_only_in_case_or_width_are_one_name(
    account_stub: Stub,
) -> None:
    """ "Prod", "prod", "PROD" and "Ｐｒｏｄ" were four projects of one organization."""
    org = (await new_org(account_stub)).organization.id
    prod = await account_stub.CreateProject(
        pb.CreateProjectRequest(organization_id=org, name="Prod")
    )
    for name in ("prod", "PROD", "Ｐｒｏｄ", " prod "):
        err = await refused(
            account_stub.CreateProject(pb.CreateProjectRequest(organization_id=org, name=name))
        )
        assert (err.code(), reason_of(err)) == (grpc.StatusCode.ALREADY_EXISTS, "NAME_TAKEN")
        assert "'Prod'" in (err.details() or "")  # the name it clashes with
    staging = await account_stub.CreateProject(
        pb.CreateProjectRequest(organization_id=org, name="staging")
    )
    err = await refused(
        account_stub.RenameProject(pb.RenameProjectRequest(project_id=staging.id, name="PROD"))
    )
    assert reason_of(err) == "NAME_TAKEN"
    renamed = await account_stub.RenameProject(  # its own name in another case: fine
        pb.RenameProjectRequest(project_id=prod.id, name="PROD")
    )
    assert renamed.name == "PROD"


async def test_a_deleted_project_is_gone_but_the_last_one_stays(account_stub: Stub) -> None:
    org = (await new_org(account_stub)).organization.id
    [default] = (
        await account_stub.ListProjects(pb.ListProjectsRequest(organization_id=org))
    ).projects
    extra = await account_stub.CreateProject(pb.CreateProjectRequest(organization_id=org, name="x"))
    deleted = await account_stub.DeleteProject(pb.DeleteProjectRequest(project_id=extra.id))
    assert deleted.HasField("deleted_at")
    err = await refused(account_stub.GetProject(pb.GetProjectRequest(project_id=extra.id)))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = await refused(account_stub.DeleteProject(pb.DeleteProjectRequest(project_id=default.id)))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and field_of(err) == "project_id"


async def test_a_deleted_projects_name_can_be_used_again(account_stub: Stub) -> None:
    org = (await new_org(account_stub)).organization.id
    old = await account_stub.CreateProject(pb.CreateProjectRequest(organization_id=org, name="ml"))
    await account_stub.DeleteProject(pb.DeleteProjectRequest(project_id=old.id))
    new = await account_stub.CreateProject(pb.CreateProjectRequest(organization_id=org, name="ml"))
    assert new.id != old.id and new.name == "ml"
    err = await refused(  # among live projects a name is still unique
        account_stub.CreateProject(pb.CreateProjectRequest(organization_id=org, name="ml"))
    )
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS and field_of(err) == "name"


# ---------------------------------------------------------------------------------- preferences


async def test_preferences_default_then_change_only_the_named_fields(account_stub: Stub) -> None:
    org = (await new_org(account_stub, currency="INR")).organization
    ask = pb.GetPreferencesRequest(organization_id=org.id, user_id=org.owner.id)
    defaults = await account_stub.GetPreferences(ask)
    assert (defaults.display_currency, defaults.theme, defaults.compact_mode) == (
        "INR",
        "system",
        False,
    )
    assert defaults.email_notifications and defaults.low_balance_notifications

    wanted = pb.Preferences(
        organization_id=org.id, user_id=org.owner.id, theme="dark", display_currency="usd"
    )
    changed = await account_stub.UpdatePreferences(
        pb.UpdatePreferencesRequest(preferences=wanted, fields=["theme"])
    )
    assert (changed.theme, changed.display_currency) == ("dark", "INR")
    changed = await account_stub.UpdatePreferences(
        pb.UpdatePreferencesRequest(preferences=wanted, fields=["display_currency"])
    )
    assert (changed.theme, changed.display_currency) == ("dark", "USD")
    assert await account_stub.GetPreferences(ask) == changed


# ---------------------------------------------------------------------------------- bad input

Case = Callable[[Stub, pb.Organization], Awaitable[Any]]
UNKNOWN = str(uuid.uuid4())
INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND


def prefs(o: pb.Organization, field: str, value: str) -> pb.UpdatePreferencesRequest:
    wanted = pb.Preferences(organization_id=o.id, user_id=o.owner.id)
    setattr(wanted, field, value)
    return pb.UpdatePreferencesRequest(preferences=wanted, fields=[field])


BAD_INPUT: list[tuple[str, Case, grpc.StatusCode, str]] = [
    ("empty name", lambda s, o: new_org(s, name="  "), INVALID, "name"),
    ("long name", lambda s, o: new_org(s, name="n" * 101), INVALID, "name"),
    ("currency", lambda s, o: new_org(s, currency="EUR"), INVALID, "currency"),
    ("owner email", lambda s, o: s.CreateOrganization(pb.CreateOrganizationRequest(
        name="x", currency="USD", owner_email="not-an-email")), INVALID, "owner_email"),
    ("no owner", lambda s, o: s.CreateOrganization(pb.CreateOrganizationRequest(
        name="x", currency="USD")), INVALID, "owner_user_id"),
    ("unknown owner", lambda s, o: new_org(s, owner=UNKNOWN), NOT_FOUND, "owner_user_id"),
    ("malformed owner", lambda s, o: new_org(s, owner="42"), INVALID, "owner_user_id"),
    ("invite email", lambda s, o: invite(s, o.id, "member", "bob@"), INVALID, "email"),
    ("invite role", lambda s, o: invite(s, o.id, "boss"), INVALID, "role"),
    ("set role", lambda s, o: s.SetMemberRole(pb.SetMemberRoleRequest(
        organization_id=o.id, user_id=o.owner.id, role="god")), INVALID, "role"),
    ("non-member", lambda s, o: s.SetMemberRole(pb.SetMemberRoleRequest(
        organization_id=o.id, user_id=UNKNOWN, role="viewer")), NOT_FOUND, "user_id"),
    ("token role", lambda s, o: token_for(s, o.id, "root"), INVALID, "role"),
    ("token name", lambda s, o: s.CreateApiToken(pb.CreateApiTokenRequest(
        organization_id=o.id, role="viewer")), INVALID, "name"),
    ("unknown org", lambda s, o: s.GetOrganization(pb.GetOrganizationRequest(
        organization_id=UNKNOWN)), NOT_FOUND, "organization_id"),
    ("malformed org", lambda s, o: s.GetOrganization(pb.GetOrganizationRequest(
        organization_id="acme")), INVALID, "organization_id"),
    ("missing org", lambda s, o: s.ListMembers(pb.ListMembersRequest()),
        INVALID, "organization_id"),
    ("project in unknown org", lambda s, o: s.CreateProject(pb.CreateProjectRequest(
        organization_id=UNKNOWN, name="x")), NOT_FOUND, "organization_id"),
    ("unknown project", lambda s, o: s.GetProject(pb.GetProjectRequest(project_id=UNKNOWN)),
        NOT_FOUND, "project_id"),
    ("malformed project", lambda s, o: s.TouchProject(pb.TouchProjectRequest(project_id="p-1")),
        INVALID, "project_id"),
    ("project name", lambda s, o: s.CreateProject(pb.CreateProjectRequest(
        organization_id=o.id, name="")), INVALID, "name"),
    ("negative limit", lambda s, o: s.ListProjects(pb.ListProjectsRequest(
        organization_id=o.id, limit=-1)), INVALID, "limit"),
    ("unknown token id", lambda s, o: s.RevokeApiToken(pb.RevokeApiTokenRequest(
        organization_id=o.id, api_token_id=UNKNOWN)), NOT_FOUND, "api_token_id"),
    ("kyc status", lambda s, o: s.SetKycStatus(pb.SetKycStatusRequest(
        organization_id=o.id, kyc_status="approved")), INVALID, "kyc_status"),
    ("display currency", lambda s, o: s.UpdatePreferences(prefs(o, "display_currency", "EUR")),
        INVALID, "display_currency"),
    ("theme", lambda s, o: s.UpdatePreferences(prefs(o, "theme", "neon")), INVALID, "theme"),
    ("preferences of a stranger", lambda s, o: s.GetPreferences(pb.GetPreferencesRequest(
        organization_id=o.id, user_id=UNKNOWN)), NOT_FOUND, "user_id"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "code", "field"), [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT]
)
async def test_bad_input_is_refused_naming_the_field(
    account_stub: Stub, case: Case, code: grpc.StatusCode, field: str
) -> None:
    created = await new_org(account_stub)
    err = await refused(case(account_stub, created.organization))
    assert err.code() == code, err.details()
    assert field_of(err) == field
    assert field in (err.details() or "") or code == grpc.StatusCode.NOT_FOUND


# ---------------------------------------------------------------------------------- demo


async def test_the_demo_organization_is_verified_has_a_project_and_the_bootstrap_token(
    account_stub: Stub, wallet_pool: AsyncConnectionPool
) -> None:
    bootstrap = f"bootstrap-{uuid.uuid4().hex}"
    await demo.seed(wallet_pool, bootstrap_token=bootstrap)
    await demo.seed(wallet_pool, bootstrap_token=bootstrap)  # every start seeds again

    who = await account_stub.Authenticate(pb.AuthenticateRequest(token=bootstrap))
    assert who.organization_id == str(demo.DEMO_ORGANIZATION_ID) and who.role == "owner"
    assert who.email == demo.DEMO_EMAIL
    org = await account_stub.GetOrganization(
        pb.GetOrganizationRequest(organization_id=who.organization_id)
    )
    assert org.kyc_status == "verified" and org.currency == "USD"
    project = await account_stub.GetProject(
        pb.GetProjectRequest(project_id=str(demo.DEMO_PROJECT_ID))
    )
    assert project.organization_id == org.id
    tokens = await account_stub.ListApiTokens(pb.ListApiTokensRequest(organization_id=org.id))
    assert [t.name for t in tokens.api_tokens].count("bootstrap") >= 1
    async with wallet_pool.connection() as conn:
        cur = await conn.execute(
            "SELECT balance, credits FROM wallets WHERE organization_id = %s",
            (demo.DEMO_ORGANIZATION_ID,),
        )
        balance, credits = await cur.fetchone() or (0, 0)
        assert credits >= 0 and balance >= demo.DEMO_CREDITS  # funded, usable at once
        cur = await conn.execute(
            "SELECT count(*) FROM exchange_rates WHERE base IN ('USD', 'INR')"
            " AND quote IN ('USD', 'INR')"
        )
        assert (await cur.fetchone()) != (0,), "the demo can show INR and USD"


async def test_deleting_an_organization_again_with_its_key_returns_the_first_answer(
    account_stub: Stub,
) -> None:
    org = (await new_org(account_stub, name="Leaving")).organization
    request = pb.DeleteOrganizationRequest(
        organization_id=org.id, confirm_name="Leaving", idempotency_key="leave-1"
    )
    first = await account_stub.DeleteOrganization(request)
    assert await account_stub.DeleteOrganization(request) == first
    unkeyed = pb.DeleteOrganizationRequest(organization_id=org.id, confirm_name="Leaving")
    assert (await refused(account_stub.DeleteOrganization(unkeyed))).code() == (
        grpc.StatusCode.NOT_FOUND
    )
    other = pb.DeleteOrganizationRequest(
        organization_id=org.id, confirm_name="Other", idempotency_key="leave-1"
    )
    assert (await refused(account_stub.DeleteOrganization(other))).code() == (
        grpc.StatusCode.ABORTED
    )


async def test_a_keyed_token_creation_is_one_token_and_its_secret_is_never_kept(
    account_stub: Stub, wallet_pool: AsyncConnectionPool
) -> None:
    org = (await new_org(account_stub)).organization
    request = pb.CreateApiTokenRequest(
        organization_id=org.id, name="ci", role="member", idempotency_key="t-1"
    )
    first = await account_stub.CreateApiToken(request)
    again = await account_stub.CreateApiToken(request)
    assert first.token and not again.token
    assert again.api_token == first.api_token
    async with wallet_pool.connection() as conn:
        cur = await conn.execute(
            "SELECT result FROM idempotency WHERE key = 't-1' AND scope LIKE %s",
            (f"org:{org.id}:%",),
        )
        [(stored,)] = await cur.fetchall()
    kept = pb.CreateApiTokenResponse.FromString(base64.b64decode(stored["answer"]))
    assert kept.api_token == first.api_token and kept.token == ""
    listed = await account_stub.ListApiTokens(pb.ListApiTokensRequest(organization_id=org.id))
    assert [t.name for t in listed.api_tokens].count("ci") == 1


async def test_a_key_is_one_request_whatever_the_account_call(account_stub: Stub) -> None:
    """One caller's key in one organization names one request: sent with another call (an
    invite's key with a role change, a project, a rename) it is ABORTED and changes nothing."""
    created = await new_org(account_stub)
    org = created.organization.id
    invite_request = pb.InviteMemberRequest(
        organization_id=org, email=email(), role="member", idempotency_key="K"
    )
    invited = await account_stub.InviteMember(invite_request)
    [project] = (
        await account_stub.ListProjects(pb.ListProjectsRequest(organization_id=org))
    ).projects
    others = (
        account_stub.SetMemberRole(
            pb.SetMemberRoleRequest(
                organization_id=org, user_id=invited.user.id, role="admin", idempotency_key="K"
            )
        ),
        account_stub.CreateProject(
            pb.CreateProjectRequest(organization_id=org, name="ml", idempotency_key="K")
        ),
        account_stub.RenameProject(
            pb.RenameProjectRequest(project_id=project.id, name="renamed", idempotency_key="K")
        ),
        account_stub.UpdateOrganization(
            pb.UpdateOrganizationRequest(organization_id=org, name="Other", idempotency_key="K")
        ),
        account_stub.RemoveMember(
            pb.RemoveMemberRequest(
                organization_id=org, user_id=invited.user.id, idempotency_key="K"
            )
        ),
    )
    for call in others:
        err = await refused(call)
        assert err.code() == grpc.StatusCode.ABORTED, err
        assert reason_of(err) == "IDEMPOTENCY_KEY_REUSED"
    members = await account_stub.ListMembers(pb.ListMembersRequest(organization_id=org))
    assert {(m.user.id, m.role) for m in members.members} >= {(invited.user.id, "member")}
    projects = await account_stub.ListProjects(pb.ListProjectsRequest(organization_id=org))
    assert [p.name for p in projects.projects] == [project.name]
    assert (
        await account_stub.GetOrganization(pb.GetOrganizationRequest(organization_id=org))
    ).name == "Acme"
    assert await account_stub.InviteMember(invite_request) == invited  # the retry still replays


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (
            pb.CreateOrganizationRequest(name="A", currency="USD", idempotency_key="k\x00"),
            "idempotency_key",
        ),
        (
            pb.CreateOrganizationRequest(name="A", currency="USD", idempotency_key="k" * 201),
            "idempotency_key",
        ),
        (pb.CreateOrganizationRequest(name="A", currency="USD", owner_name="\x00x"), "owner_name"),
        (
            pb.CreateOrganizationRequest(name="A", currency="USD", owner_name="n" * 101),
            "owner_name",
        ),
        (
            pb.CreateOrganizationRequest(
                name="A", currency="USD", owner_token_expires_at=in_future(-86_400)
            ),
            "owner_token_expires_at",
        ),
    ],
)
async def test_a_new_organizations_key_name_and_token_expiry_are_checked(
    account_stub: Stub,
    wallet_pool: AsyncConnectionPool,
    request_: pb.CreateOrganizationRequest,
    field: str,
) -> None:
    request = pb.CreateOrganizationRequest()
    request.CopyFrom(request_)
    request.owner_email = email()
    err = await refused(account_stub.CreateOrganization(request))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert field_of(err) == field
    async with wallet_pool.connection() as conn:
        cur = await conn.execute("SELECT 1 FROM users WHERE email = %s", (request.owner_email,))
        assert await cur.fetchone() is None  # nothing half-made


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"name": "\x07\x1b[31mred"}, "name"),
        ({"name": "n" * 101}, "name"),
        ({"idempotency_key": "k\x00"}, "idempotency_key"),
    ],
)
async def test_an_invited_members_name_and_key_are_checked(
    account_stub: Stub, change: dict[str, str], field: str
) -> None:
    org = (await new_org(account_stub)).organization.id
    request = pb.InviteMemberRequest(organization_id=org, email=email(), role="member", **change)
    err = await refused(account_stub.InviteMember(request))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert field_of(err) == field
    members = await account_stub.ListMembers(pb.ListMembersRequest(organization_id=org))
    assert len(members.members) == 1


async def test_a_key_is_one_request_in_its_organization_whoever_sends_it(
    account_stub: Stub, wallet_stub: WalletServiceStub
) -> None:
    """Account calls, settings and money calls share an organization's keys: a key a top-up
    used is ABORTED for an invite and the other way round; another caller's key is ABORTED
    too (only its sender gets the first answer back)."""
    org = (await new_org(account_stub)).organization.id

    def top_up(key: str) -> Any:
        return wallet_stub.Transfer(
            wpb.TransferRequest(
                idempotency_key=key, organization_id=org, kind=wpb.TOPUP,
                amount=Money(amount=1_000_000),
            )
        )  # fmt: skip

    def invite_with(key: str) -> pb.InviteMemberRequest:
        return pb.InviteMemberRequest(
            organization_id=org, email=email(), role="member", idempotency_key=key
        )

    await top_up("paid")
    err = await refused(account_stub.InviteMember(invite_with("paid")))
    assert (err.code(), reason_of(err)) == (grpc.StatusCode.ABORTED, "IDEMPOTENCY_KEY_REUSED")

    request = invite_with("invited")
    first = await account_stub.InviteMember(request, metadata=(("x-actor", "user:a"),))
    assert await account_stub.InviteMember(request, metadata=(("x-actor", "user:a"),)) == first
    for call in (
        top_up("invited"),
        account_stub.InviteMember(request, metadata=(("x-actor", "user:b"),)),
        wallet_stub.SetThresholds(
            wpb.SetThresholdsRequest(
                organization_id=org, warning_amount=1, idempotency_key="invited"
            )
        ),
    ):
        err = await refused(call)
        assert (err.code(), reason_of(err)) == (grpc.StatusCode.ABORTED, "IDEMPOTENCY_KEY_REUSED")
    members = await account_stub.ListMembers(pb.ListMembersRequest(organization_id=org))
    assert len(members.members) == 2  # the owner and the one invite
    wallet = await wallet_stub.GetWalletSummary(wpb.GetWalletSummaryRequest(organization_id=org))
    assert wallet.balance.amount == 1_000_000  # the one top-up


@pytest.mark.parametrize(
    ("call", "field"),
    [
        ("invite_nul", "email"),
        ("invite_huge", "email"),
        ("kyc_huge", "kyc_status"),
        ("theme_huge", "theme"),
    ],
)
async def test_a_hostile_value_is_named_in_a_short_message(
    account_stub: Stub, call: str, field: str
) -> None:
    """A NUL reached the database (INTERNAL); a huge value was sent back whole, past what a
    gRPC client takes, and the call failed as RESOURCE_EXHAUSTED."""
    created = await new_org(account_stub)
    org, owner = created.organization.id, created.organization.owner.id
    huge = "x" * 20_000
    attempt = {
        "invite_nul": lambda: account_stub.InviteMember(
            pb.InviteMemberRequest(organization_id=org, email="a\x00b@x.com", role="member")
        ),
        "invite_huge": lambda: account_stub.InviteMember(
            pb.InviteMemberRequest(organization_id=org, email=huge + "@x.com", role="member")
        ),
        "kyc_huge": lambda: account_stub.SetKycStatus(
            pb.SetKycStatusRequest(organization_id=org, kyc_status=huge)
        ),
        "theme_huge": lambda: account_stub.UpdatePreferences(
            pb.UpdatePreferencesRequest(
                preferences=pb.Preferences(organization_id=org, user_id=owner, theme=huge),
                fields=["theme"],
            )
        ),
    }[call]
    err = await refused(attempt())
    assert (err.code(), field_of(err)) == (grpc.StatusCode.INVALID_ARGUMENT, field)
    assert len(err.details() or "") < 500


async def test_a_revoked_token_moves_no_money_and_changes_nothing(
    account_stub: Stub, wallet_stub: WalletServiceStub
) -> None:
    """The gateway keeps a token's identity a few seconds: the wallet took account changes and
    money calls sent for a token already revoked (`x-actor`), e.g. a demoted owner's."""
    org = (await new_org(account_stub)).organization
    made = await account_stub.CreateApiToken(
        pb.CreateApiTokenRequest(organization_id=org.id, name="billing", role="billing")
    )
    as_token = (("x-actor", f"token:{made.api_token.id}"),)

    def top_up(key: str) -> Awaitable[Any]:
        request = wpb.TransferRequest(
            idempotency_key=key, organization_id=org.id, kind=wpb.TOPUP,
            amount=Money(amount=1_000_000),
        )  # fmt: skip
        return wallet_stub.Transfer(request, metadata=as_token)

    await top_up("while-live")  # a live token acts
    await account_stub.RevokeApiToken(
        pb.RevokeApiTokenRequest(organization_id=org.id, api_token_id=made.api_token.id)
    )
    calls = {
        "Transfer": top_up("after-revoke"),
        "CreateHold": wallet_stub.CreateHold(
            wpb.CreateHoldRequest(idempotency_key="h", organization_id=org.id, amount=1),
            metadata=as_token,
        ),
        "ChangePlan": wallet_stub.ChangePlan(
            wpb.ChangePlanRequest(organization_id=org.id, plan_code="premium", idempotency_key="p"),
            metadata=as_token,
        ),
        "CreateProject": account_stub.CreateProject(
            pb.CreateProjectRequest(organization_id=org.id, name="late"), metadata=as_token
        ),
    }
    for name, call in calls.items():
        err = await refused(call)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, (name, err.details())
        assert "revoked or has expired" in (err.details() or ""), name
    summary = await wallet_stub.GetWalletSummary(
        wpb.GetWalletSummaryRequest(organization_id=org.id)
    )
    assert summary.balance.amount == 1_000_000  # only the call made while it was live
