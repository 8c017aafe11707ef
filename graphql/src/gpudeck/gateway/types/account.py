"""Accounts: the viewer, members and roles, projects, API tokens and preferences, and the
mutations that change them."""

from __future__ import annotations

from datetime import UTC, datetime

import strawberry

from gpudeck.gateway.context import Info
from gpudeck.gateway.errors import BAD_USER_INPUT, FORBIDDEN, NOT_FOUND, Arguments, GatewayError
from gpudeck.gateway.permissions import (
    Admin,
    MayGrant,
    MayManageMember,
    MayManageToken,
    Member,
    Owner,
    Writer,
    require,
)
from gpudeck.gateway.types.common import OptionalKey, Role, check_first, role, timestamp, when
from gpudeck.gateway.types.common import display_currency as check_display
from gpudeck.proto.wallet.v1 import account_pb2


@strawberry.type
class User:
    id: strawberry.ID
    email: str
    name: str

    @classmethod
    def from_pb(cls, m: account_pb2.User) -> User:
        return cls(id=strawberry.ID(m.id), email=m.email, name=m.name)


@strawberry.type(description="An organization the caller acts in, and the role it has there.")
class OrganizationRole:
    id: strawberry.ID
    name: str
    role: Role


@strawberry.type(
    description=(
        "Who is calling: the user behind the token (`id` is the token's id when no user made "
        "it), and the one organization the token acts in, with its role."
    )
)
class Viewer:
    id: strawberry.ID
    email: str
    role: Role
    organization_id: strawberry.ID
    token_id: strawberry.ID
    token_expires_at: datetime | None
    organizations: list[OrganizationRole]


@strawberry.type(description="A project; every resource belongs to one.")
class Project:
    id: strawberry.ID
    name: str
    created_at: datetime | None
    last_used_at: datetime | None

    @classmethod
    def from_pb(cls, m: account_pb2.Project) -> Project:
        return cls(
            id=strawberry.ID(m.id),
            name=m.name,
            created_at=when(m.created_at, m.HasField("created_at")),
            last_used_at=when(m.last_used_at, m.HasField("last_used_at")),
        )


@strawberry.type(name="Member", description="A member of an organization and their role.")
class OrganizationMember:
    user: User
    role: Role
    joined_at: datetime | None

    @classmethod
    def from_pb(cls, m: account_pb2.Member) -> OrganizationMember:
        return cls(
            user=User.from_pb(m.user),
            role=role(m.role),
            joined_at=when(m.joined_at, m.HasField("joined_at")),
        )


@strawberry.type(description="An API token (never its secret, which is shown once).")
class ApiToken:
    id: strawberry.ID
    name: str
    role: Role
    created_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    created_by: strawberry.ID | None = strawberry.field(description="The user who made it.")

    @classmethod
    def from_pb(cls, m: account_pb2.ApiToken) -> ApiToken:
        return cls(
            id=strawberry.ID(m.id),
            name=m.name,
            role=role(m.role),
            created_at=when(m.created_at, m.HasField("created_at")),
            expires_at=when(m.expires_at, m.HasField("expires_at")),
            revoked_at=when(m.revoked_at, m.HasField("revoked_at")),
            last_used_at=when(m.last_used_at, m.HasField("last_used_at")),
            created_by=strawberry.ID(m.created_by) if m.created_by else None,
        )


@strawberry.type(description="The caller's own settings in an organization.")
class Preferences:
    display_currency: str
    theme: str = strawberry.field(description="light, dark or system")
    compact_mode: bool
    email_notifications: bool
    low_balance_notifications: bool

    @classmethod
    def from_pb(cls, m: account_pb2.Preferences) -> Preferences:
        return cls(
            display_currency=m.display_currency,
            theme=m.theme,
            compact_mode=m.compact_mode,
            email_notifications=m.email_notifications,
            low_balance_notifications=m.low_balance_notifications,
        )


@strawberry.type(description="A new API token: `token` is its secret, shown this once only.")
class CreateApiTokenPayload:
    token: str | None = strawberry.field(
        description="The secret, shown once: null when a retry with the same idempotencyKey "
        "answers again."
    )
    api_token: ApiToken


async def list_projects(info: Info, organization_id: str, first: int | None) -> list[Project]:
    c = info.context.wallet
    request = account_pb2.ListProjectsRequest(
        organization_id=organization_id, limit=check_first(first)
    )
    answer = await c.accounts.ListProjects(request, metadata=c.metadata)
    return [Project.from_pb(p) for p in answer.projects]


async def list_members(info: Info, organization_id: str) -> list[OrganizationMember]:
    members = await info.context.loaders.members.load(organization_id)
    return [OrganizationMember.from_pb(m) for m in members]


async def list_api_tokens(info: Info, organization_id: str) -> list[ApiToken]:
    """Every token for an owner or admin; the tokens its own user made for anyone else."""
    identity = await info.context.identity_in(organization_id, info)
    tokens = await info.context.loaders.api_tokens.load(organization_id)
    if identity.role not in ("owner", "admin"):
        tokens = [
            t
            for t in tokens
            if t.id == identity.token_id or (identity.user_id and t.created_by == identity.user_id)
        ]
    return [ApiToken.from_pb(t) for t in tokens]


async def _user_id(info: Info, organization_id: str) -> str:
    identity = await info.context.identity_in(organization_id, info)
    if not identity.user_id:
        raise GatewayError(
            "this token belongs to no user, so it has no preferences", code=FORBIDDEN
        )
    return identity.user_id


async def load_preferences(info: Info, organization_id: str) -> Preferences:
    c = info.context.wallet
    request = account_pb2.GetPreferencesRequest(
        organization_id=organization_id, user_id=await _user_id(info, organization_id)
    )
    return Preferences.from_pb(await c.accounts.GetPreferences(request, metadata=c.metadata))


async def display_for(info: Info, organization_id: str, given: str | None) -> str:
    """The currency to show `organization_id`'s amounts in: `given` (checked: INR or USD), or
    when it is null the caller's saved preference there ("" for none: the wallet's own)."""
    if given is None:
        identity = await info.context.identity_in(organization_id, info)
        if not identity.user_id:
            return ""
        given = (await load_preferences(info, organization_id)).display_currency or None
    return check_display(given)


async def resolve_viewer(info: Info) -> Viewer:
    i = await info.context.identity()
    return Viewer(
        id=strawberry.ID(i.user_id or i.token_id),
        email=i.email,
        role=role(i.role),
        organization_id=strawberry.ID(i.organization_id),
        token_id=strawberry.ID(i.token_id),
        token_expires_at=i.expires_at,
        organizations=[
            OrganizationRole(id=strawberry.ID(o.organization_id), name=o.name, role=role(o.role))
            for o in i.organizations
        ],
    )


@strawberry.type
class Query:
    viewer = strawberry.field(
        resolver=resolve_viewer, description="Who is calling.", extensions=require(Member())
    )


async def resolve_create_project(
    info: Info,
    organization_id: strawberry.ID,
    name: str,
    idempotency_key: OptionalKey = None,
) -> Project:
    c = info.context.wallet
    request = account_pb2.CreateProjectRequest(
        organization_id=str(organization_id), name=name, idempotency_key=idempotency_key or ""
    )
    return Project.from_pb(await c.accounts.CreateProject(request, metadata=c.metadata))


async def resolve_create_api_token(
    info: Info,
    organization_id: strawberry.ID,
    name: str,
    role: Role,
    expires_at: datetime | None = None,
    idempotency_key: OptionalKey = None,
) -> CreateApiTokenPayload:
    identity = await info.context.identity()
    expires_at = _within_callers_life(expires_at, identity.expires_at)
    c = info.context.wallet
    request = account_pb2.CreateApiTokenRequest(
        organization_id=str(organization_id),
        name=name,
        role=str(role),
        created_by=identity.user_id,
        idempotency_key=idempotency_key or "",
    )
    expiry = timestamp(expires_at, "expiresAt")
    if expiry is not None:
        request.expires_at.CopyFrom(expiry)
    answer = await c.accounts.CreateApiToken(request, metadata=c.metadata)
    return CreateApiTokenPayload(
        token=answer.token or None, api_token=ApiToken.from_pb(answer.api_token)
    )


def _within_callers_life(wanted: datetime | None, limit: datetime | None) -> datetime | None:
    """A new token's expiry: a token that expires makes only tokens that expire no later (by
    default, with it), so a short-lived credential never mints a lasting one."""
    if limit is None:
        return wanted
    if wanted is None:
        return limit
    if (wanted if wanted.tzinfo is not None else wanted.replace(tzinfo=UTC)) > limit:
        raise GatewayError(
            f"expiresAt may not be later than the calling token's own expiry"
            f" ({limit.isoformat()}): a token cannot outlive the one that makes it",
            code=BAD_USER_INPUT,
            field="expiresAt",
        )
    return wanted


async def resolve_revoke_api_token(
    info: Info, id: strawberry.ID, idempotency_key: OptionalKey = None
) -> ApiToken:
    identity = await info.context.identity()
    c = info.context.wallet
    request = account_pb2.RevokeApiTokenRequest(
        organization_id=identity.organization_id,
        api_token_id=str(id),
        idempotency_key=idempotency_key or "",
    )
    revoked = await c.accounts.RevokeApiToken(request, metadata=c.metadata)
    info.context.auth.forget(revoked.id)
    if info.context.live is not None:  # its subscriptions check their token now, and end
        info.context.live.wake(identity.organization_id)
    return ApiToken.from_pb(revoked)


async def resolve_rename_api_token(
    info: Info, id: strawberry.ID, name: str, idempotency_key: OptionalKey = None
) -> ApiToken:
    identity = await info.context.identity()
    c = info.context.wallet
    request = account_pb2.RenameApiTokenRequest(
        organization_id=identity.organization_id,
        api_token_id=str(id),
        name=name,
        idempotency_key=idempotency_key or "",
    )
    return ApiToken.from_pb(await c.accounts.RenameApiToken(request, metadata=c.metadata))


async def _project_of(
    info: Info, organization_id: strawberry.ID, project_id: strawberry.ID
) -> None:
    """NOT_FOUND unless the project is one of this organization's."""
    c = info.context.wallet
    request = account_pb2.GetProjectRequest(project_id=str(project_id))
    found = await c.accounts.GetProject(request, metadata=c.metadata)
    if found.organization_id != str(organization_id):
        raise GatewayError(f"project {project_id} not found", code=NOT_FOUND, field="id")


async def resolve_rename_project(
    info: Info,
    organization_id: strawberry.ID,
    id: strawberry.ID,
    name: str,
    idempotency_key: OptionalKey = None,
) -> Project:
    await _project_of(info, organization_id, id)
    c = info.context.wallet
    request = account_pb2.RenameProjectRequest(
        project_id=str(id), name=name, idempotency_key=idempotency_key or ""
    )
    return Project.from_pb(await c.accounts.RenameProject(request, metadata=c.metadata))


async def resolve_delete_project(
    info: Info,
    organization_id: strawberry.ID,
    id: strawberry.ID,
    idempotency_key: OptionalKey = None,
) -> Project:
    c = info.context.wallet
    request = account_pb2.DeleteProjectRequest(
        project_id=str(id),
        organization_id=str(organization_id),
        idempotency_key=idempotency_key or "",
    )
    return Project.from_pb(await c.accounts.DeleteProject(request, metadata=c.metadata))


async def resolve_delete_organization(
    info: Info, id: strawberry.ID, confirm_name: str, idempotency_key: OptionalKey = None
) -> bool:
    identity = await info.context.identity()
    c = info.context.wallet
    request = account_pb2.DeleteOrganizationRequest(
        organization_id=str(id),
        confirm_name=confirm_name,
        idempotency_key=idempotency_key or "",
    )
    await c.accounts.DeleteOrganization(request, metadata=c.metadata)
    info.context.auth.forget_members(str(id))  # it revoked them all
    if info.context.live is not None:
        info.context.live.wake(identity.organization_id)
    return True


async def resolve_invite_member(
    info: Info,
    organization_id: strawberry.ID,
    email: str,
    role: Role,
    name: str | None = None,
    idempotency_key: OptionalKey = None,
) -> OrganizationMember:
    c = info.context.wallet
    request = account_pb2.InviteMemberRequest(
        organization_id=str(organization_id),
        email=email,
        role=str(role),
        name=name or "",
        idempotency_key=idempotency_key or "",
    )
    return OrganizationMember.from_pb(await c.accounts.InviteMember(request, metadata=c.metadata))


async def resolve_set_member_role(
    info: Info,
    organization_id: strawberry.ID,
    user_id: strawberry.ID,
    role: Role,
    idempotency_key: OptionalKey = None,
) -> OrganizationMember:
    c = info.context.wallet
    request = account_pb2.SetMemberRoleRequest(
        organization_id=str(organization_id),
        user_id=str(user_id),
        role=str(role),
        idempotency_key=idempotency_key or "",
    )
    member = await c.accounts.SetMemberRole(request, metadata=c.metadata)
    # Their tokens that now outrank them were revoked (the others' role stands as it was).
    _member_changed(info, str(organization_id), member.user.id)
    return OrganizationMember.from_pb(member)


def _member_changed(info: Info, organization_id: str, user_id: str) -> None:
    """A member's role changed or they left (the wallet revoked tokens): forget what this
    gateway knew of them, and have the organization's subscriptions check their token now (as
    for revokeApiToken: one of those tokens watched on for seconds)."""
    info.context.auth.forget_members(organization_id, user_id)
    if info.context.live is not None:
        info.context.live.wake(organization_id)


async def resolve_remove_member(
    info: Info,
    organization_id: strawberry.ID,
    user_id: strawberry.ID,
    idempotency_key: OptionalKey = None,
) -> bool:
    c = info.context.wallet
    request = account_pb2.RemoveMemberRequest(
        organization_id=str(organization_id),
        user_id=str(user_id),
        idempotency_key=idempotency_key or "",
    )
    await c.accounts.RemoveMember(request, metadata=c.metadata)
    _member_changed(info, str(organization_id), str(user_id))  # it revoked their tokens
    return True


async def resolve_update_preferences(
    info: Info,
    organization_id: strawberry.ID,
    display_currency: str | None = strawberry.UNSET,
    theme: str | None = strawberry.UNSET,
    compact_mode: bool | None = strawberry.UNSET,
    email_notifications: bool | None = strawberry.UNSET,
    low_balance_notifications: bool | None = strawberry.UNSET,
    idempotency_key: OptionalKey = None,
) -> Preferences:
    wanted = account_pb2.Preferences(
        organization_id=str(organization_id), user_id=await _user_id(info, str(organization_id))
    )
    fields: list[str] = []
    if isinstance(display_currency, str):  # null, like leaving it out, keeps the value
        wanted.display_currency = check_display(display_currency)
        fields.append("display_currency")
    if isinstance(theme, str):
        wanted.theme = theme
        fields.append("theme")
    for name, value in (
        ("compact_mode", compact_mode),
        ("email_notifications", email_notifications),
        ("low_balance_notifications", low_balance_notifications),
    ):
        if isinstance(value, bool):
            setattr(wanted, name, value)
            fields.append(name)
    c = info.context.wallet
    if not fields:
        return await load_preferences(info, str(organization_id))
    request = account_pb2.UpdatePreferencesRequest(
        preferences=wanted, fields=fields, idempotency_key=idempotency_key or ""
    )
    return Preferences.from_pb(await c.accounts.UpdatePreferences(request, metadata=c.metadata))


@strawberry.type
class Mutation:
    create_project = strawberry.mutation(
        resolver=resolve_create_project,
        description="A new project. A retry with the same idempotencyKey returns the first.",
        extensions=require(Writer("organization_id")),
    )

    create_api_token = strawberry.mutation(
        resolver=resolve_create_api_token,
        description=(
            "A new API token acting in this organization with `role` (not above the caller's "
            "own). A calling token that expires makes tokens that expire no later (by default, "
            "with it). The answer carries the secret; it is never shown again (a retry with the "
            "same idempotencyKey returns the same token, its secret null)."
        ),
        extensions=require(MayGrant("organization_id")),
    )

    revoke_api_token = strawberry.mutation(
        resolver=resolve_revoke_api_token,
        description="Revoke an API token at once (revoking it again changes nothing).",
        extensions=require(MayManageToken("id")),
    )

    rename_api_token = strawberry.mutation(
        resolver=resolve_rename_api_token,
        description="Give an API token a new name (its secret, role and expiry stay).",
        extensions=require(MayManageToken("id")),
    )

    rename_project = strawberry.mutation(
        resolver=resolve_rename_project,
        description="Give a project a new name, unique among the organization's projects.",
        extensions=[*require(Writer("organization_id")), Arguments(project_id="id")],
    )

    delete_project = strawberry.mutation(
        resolver=resolve_delete_project,
        description=(
            "Delete a project: refused while it runs resources, or when it is the last one. "
            "Its spending history stays. A retry with the same idempotencyKey returns the first "
            "answer."
        ),
        extensions=[*require(Admin("organization_id")), Arguments(project_id="id")],
    )

    delete_organization = strawberry.mutation(
        resolver=resolve_delete_organization,
        description=(
            "Delete the organization (owner only; `confirmName` must be its name). Refused "
            "while it runs resources, holds funds or has cash left; unspent credits are "
            "forfeited; every token of it stops working. True when done."
        ),
        extensions=[*require(Owner("id")), Arguments(organization_id="id")],
    )

    invite_member = strawberry.mutation(
        resolver=resolve_invite_member,
        description=(
            "Add the user with `email` (made if new) as a member with `role`. A retry with "
            "the same idempotencyKey returns the first answer."
        ),
        extensions=require(Admin("organization_id"), MayGrant("organization_id")),
    )

    set_member_role = strawberry.mutation(
        resolver=resolve_set_member_role,
        description="Change a member's role (the last owner cannot step down).",
        extensions=require(MayManageMember("organization_id"), MayGrant("organization_id")),
    )

    remove_member = strawberry.mutation(
        resolver=resolve_remove_member,
        description=(
            "Remove a member (not the last owner). True when done; a retry with the same "
            "idempotencyKey is true again."
        ),
        extensions=require(MayManageMember("organization_id")),
    )

    update_preferences = strawberry.mutation(
        resolver=resolve_update_preferences,
        description="Change the caller's own preferences; arguments left out keep their values.",
        extensions=require(Writer("organization_id")),
    )
