"""gRPC ⇄ accounts (AccountService): decode, call the account store, encode. No SQL, no rules."""

from __future__ import annotations

import uuid

from gpudeck.kit.errors import InvalidArgument, NotFound
from gpudeck.kit.logs import actor
from gpudeck.proto.wallet.v1 import account_pb2 as pb
from gpudeck.proto.wallet.v1 import account_pb2_grpc
from gpudeck.wallet import convert
from gpudeck.wallet.accounts import (
    ApiToken,
    Identity,
    Member,
    Organization,
    Preferences,
    Project,
    User,
)
from gpudeck.wallet.accounts_store import AccountStore, CreatedOrganization, NewOrganization
from gpudeck.wallet.deps import Wallet
from gpudeck.wallet.live_actor import caller_token_role, require_live_actor
from gpudeck.wallet.once import once
from gpudeck.wallet.organization_deletion import delete_organization
from gpudeck.wallet.organizations_store import Conn

DEFAULT_PROJECTS = 50
MAX_PROJECTS = 500


# ---------------------------------------------------------------------------------- encode


def user(u: User) -> pb.User:
    return pb.User(id=str(u.id), email=u.email, name=u.name)


def organization(o: Organization) -> pb.Organization:
    return pb.Organization(
        id=str(o.id),
        name=o.name,
        created_at=convert.timestamp(o.created_at),
        owner=user(o.owner),
        plan_code=o.plan_code,
        currency=o.currency,
        kyc_status=o.kyc_status,
        team_size=o.team_size,
    )


def member(m: Member) -> pb.Member:
    return pb.Member(
        organization_id=str(m.organization_id),
        user=user(m.user),
        role=m.role,
        joined_at=convert.timestamp(m.joined_at),
    )


def project(p: Project) -> pb.Project:
    return pb.Project(
        id=str(p.id),
        organization_id=str(p.organization_id),
        name=p.name,
        created_at=convert.timestamp(p.created_at),
        last_used_at=convert.timestamp(p.last_used_at),
        deleted_at=convert.timestamp(p.deleted_at),
    )


def api_token(t: ApiToken) -> pb.ApiToken:
    return pb.ApiToken(
        id=str(t.id),
        organization_id=str(t.organization_id),
        name=t.name,
        role=t.role,
        created_at=convert.timestamp(t.created_at),
        expires_at=convert.timestamp(t.expires_at),
        revoked_at=convert.timestamp(t.revoked_at),
        last_used_at=convert.timestamp(t.last_used_at),
        created_by=str(t.created_by or ""),
    )


def identity(i: Identity) -> pb.Identity:
    return pb.Identity(
        user_id=str(i.user_id or ""),
        email=i.email,
        token_id=str(i.token_id),
        organization_id=str(i.organization_id),
        role=i.role,
        organizations=[
            pb.OrganizationRole(organization_id=str(o.organization_id), name=o.name, role=o.role)
            for o in i.organizations
        ],
        expires_at=convert.timestamp(i.expires_at),
    )


def preferences(p: Preferences) -> pb.Preferences:
    return pb.Preferences(
        organization_id=str(p.organization_id),
        user_id=str(p.user_id),
        display_currency=p.display_currency,
        theme=p.theme,
        compact_mode=p.compact_mode,
        email_notifications=p.email_notifications,
        low_balance_notifications=p.low_balance_notifications,
    )


def created(c: CreatedOrganization) -> pb.CreateOrganizationResponse:
    response = pb.CreateOrganizationResponse(
        organization=organization(c.organization), owner_token=c.owner_token
    )
    if c.owner_api_token is not None:
        response.owner_api_token.CopyFrom(api_token(c.owner_api_token))
    return response


def _org(value: str) -> uuid.UUID:
    return convert.parse_id(value, "organization_id")


def _limit(value: int) -> int:
    if value < 0:
        raise InvalidArgument(f"limit must not be negative, got {value}", field="limit")
    return min(value or DEFAULT_PROJECTS, MAX_PROJECTS)


# ---------------------------------------------------------------------------------- servicer


class AccountServicer(account_pb2_grpc.AccountServiceServicer):
    """Organizations, members, projects, API tokens and preferences; Authenticate for callers
    that hold a bearer token."""

    def __init__(self, wallet: Wallet) -> None:
        self.wallet = wallet
        self.accounts = AccountStore(wallet.ledger.outbox)

    async def Authenticate(self, request: pb.AuthenticateRequest, context: object) -> pb.Identity:
        async with self.wallet.pool.connection() as conn:
            return identity(await self.accounts.authenticate(conn, request.token))

    # ------------------------------------------------------------------ organizations

    async def CreateOrganization(
        self, request: pb.CreateOrganizationRequest, context: object
    ) -> pb.CreateOrganizationResponse:
        new = NewOrganization(
            name=request.name,
            currency=request.currency,
            owner_user_id=convert.optional_id(request.owner_user_id, "owner_user_id"),
            owner_email=request.owner_email,
            owner_name=request.owner_name,
            idempotency_key=request.idempotency_key,
            caller_scope=request.caller_scope,
            owner_token_expires_at=convert.optional_time(request, "owner_token_expires_at"),
        )
        async with self.wallet.pool.connection() as conn, conn.transaction():
            await require_live_actor(conn)
            return created(await self.accounts.create_organization(conn, new))

    async def GetOrganization(
        self, request: pb.GetOrganizationRequest, context: object
    ) -> pb.Organization:
        org = _org(request.organization_id)
        async with self.wallet.pool.connection() as conn:
            return organization(await self.accounts.get_organization(conn, org))

    async def UpdateOrganization(
        self, request: pb.UpdateOrganizationRequest, context: object
    ) -> pb.Organization:
        org = _org(request.organization_id)

        async def rename() -> pb.Organization:
            return organization(
                await self.accounts.update_organization(conn, org, name=request.name)
            )

        async with self.wallet.pool.connection() as conn, conn.transaction():
            return await once(conn, f"org:{org}", request, pb.Organization, rename)

    async def DeleteOrganization(
        self, request: pb.DeleteOrganizationRequest, context: object
    ) -> pb.Organization:
        org = _org(request.organization_id)

        async def delete() -> pb.Organization:
            deleted = await delete_organization(
                self.accounts, self.wallet.ledger, conn, org,
                confirm_name=request.confirm_name, actor=actor.get(),
            )  # fmt: skip
            return organization(deleted)

        async with self.wallet.pool.connection() as conn, conn.transaction():
            return await once(conn, f"org:{org}", request, pb.Organization, delete)

    async def SetKycStatus(
        self, request: pb.SetKycStatusRequest, context: object
    ) -> pb.Organization:
        org = _org(request.organization_id)

        async def set_status() -> pb.Organization:
            return organization(await self.accounts.set_kyc_status(conn, org, request.kyc_status))

        async with self.wallet.pool.connection() as conn, conn.transaction():
            return await once(conn, f"org:{org}", request, pb.Organization, set_status)

    # ------------------------------------------------------------------ members

    async def ListMembers(
        self, request: pb.ListMembersRequest, context: object
    ) -> pb.ListMembersResponse:
        org = _org(request.organization_id)
        async with self.wallet.pool.connection() as conn:
            members = await self.accounts.list_members(conn, org)
        return pb.ListMembersResponse(members=[member(m) for m in members])

    async def InviteMember(self, request: pb.InviteMemberRequest, context: object) -> pb.Member:
        org = _org(request.organization_id)

        async def invite() -> pb.Member:
            return member(
                await self.accounts.invite_member(
                    conn, org, request.email, request.role, name=request.name
                )
            )

        async with self.wallet.pool.connection() as conn, conn.transaction():
            return await once(conn, f"org:{org}", request, pb.Member, invite)

    async def SetMemberRole(self, request: pb.SetMemberRoleRequest, context: object) -> pb.Member:
        org = _org(request.organization_id)
        user_id = convert.parse_id(request.user_id, "user_id")

        async def set_role() -> pb.Member:
            by = await caller_token_role(conn, org)
            return member(
                await self.accounts.set_member_role(conn, org, user_id, request.role, by=by)
            )

        async with self.wallet.pool.connection() as conn, conn.transaction():
            return await once(conn, f"org:{org}", request, pb.Member, set_role)

    async def RemoveMember(
        self, request: pb.RemoveMemberRequest, context: object
    ) -> pb.RemoveMemberResponse:
        org = _org(request.organization_id)
        user_id = convert.parse_id(request.user_id, "user_id")

        async def remove() -> pb.RemoveMemberResponse:
            await self.accounts.remove_member(
                conn, org, user_id, by=await caller_token_role(conn, org)
            )
            return pb.RemoveMemberResponse()

        async with self.wallet.pool.connection() as conn, conn.transaction():
            return await once(conn, f"org:{org}", request, pb.RemoveMemberResponse, remove)

    # ------------------------------------------------------------------ projects

    async def CreateProject(self, request: pb.CreateProjectRequest, context: object) -> pb.Project:
        org = _org(request.organization_id)

        async def create() -> pb.Project:
            return project(await self.accounts.create_project(conn, org, request.name))

        async with self.wallet.pool.connection() as conn, conn.transaction():
            return await once(conn, f"org:{org}", request, pb.Project, create)

    async def _project_scope(self, conn: Conn, project_id: uuid.UUID) -> str:
        """The idempotency scope of a call on a project: its organization's."""
        found = await self.accounts.get_project(conn, project_id, deleted=True)
        return f"org:{found.organization_id}"

    async def GetProject(self, request: pb.GetProjectRequest, context: object) -> pb.Project:
        project_id = convert.parse_id(request.project_id, "project_id")
        async with self.wallet.pool.connection() as conn:
            return project(await self.accounts.get_project(conn, project_id))

    async def ListProjects(
        self, request: pb.ListProjectsRequest, context: object
    ) -> pb.ListProjectsResponse:
        org, limit = _org(request.organization_id), _limit(request.limit)
        async with self.wallet.pool.connection() as conn:
            projects = await self.accounts.list_projects(conn, org, limit=limit)
        return pb.ListProjectsResponse(projects=[project(p) for p in projects])

    async def TouchProject(self, request: pb.TouchProjectRequest, context: object) -> pb.Project:
        project_id = convert.parse_id(request.project_id, "project_id")
        async with self.wallet.pool.connection() as conn:
            return project(await self.accounts.touch_project(conn, project_id))

    async def RenameProject(self, request: pb.RenameProjectRequest, context: object) -> pb.Project:
        project_id = convert.parse_id(request.project_id, "project_id")

        async def rename() -> pb.Project:
            return project(await self.accounts.rename_project(conn, project_id, request.name))

        async with self.wallet.pool.connection() as conn, conn.transaction():
            scope = await self._project_scope(conn, project_id)
            return await once(conn, scope, request, pb.Project, rename)

    async def DeleteProject(self, request: pb.DeleteProjectRequest, context: object) -> pb.Project:
        project_id = convert.parse_id(request.project_id, "project_id")

        owner = convert.optional_id(request.organization_id, "organization_id")

        async def delete() -> pb.Project:
            return project(await self.accounts.delete_project(conn, project_id))

        # This process asks the database whether it is live until it is done, then trusts it
        # no more (a meter waiting for the wallet lock the deletion holds opened in it).
        with self.wallet.ledger.projects.deleting(project_id):
            async with self.wallet.pool.connection() as conn, conn.transaction():
                # Another organization's project is NOT_FOUND before its keys are looked at (or
                # its wallet locked): a key taken there must not tell the caller it exists.
                found = await self.accounts.get_project(conn, project_id, deleted=True)
                if owner is not None and found.organization_id != owner:
                    raise NotFound(f"project {project_id} not found", field="project_id")
                scope = f"org:{found.organization_id}"
                return await once(conn, scope, request, pb.Project, delete)

    # ------------------------------------------------------------------ API tokens

    async def CreateApiToken(
        self, request: pb.CreateApiTokenRequest, context: object
    ) -> pb.CreateApiTokenResponse:
        org = _org(request.organization_id)
        created_by = convert.optional_id(request.created_by, "created_by")
        expires_at = convert.optional_time(request, "expires_at")

        async def create() -> pb.CreateApiTokenResponse:
            secret, token = await self.accounts.create_token(
                conn,
                org,
                name=request.name,
                role=request.role,
                expires_at=expires_at,
                created_by=created_by,
            )
            return pb.CreateApiTokenResponse(token=secret, api_token=api_token(token))

        async with self.wallet.pool.connection() as conn, conn.transaction():
            return await once(
                conn, f"org:{org}", request, pb.CreateApiTokenResponse, create, secret="token"
            )

    async def ListApiTokens(
        self, request: pb.ListApiTokensRequest, context: object
    ) -> pb.ListApiTokensResponse:
        org = _org(request.organization_id)
        async with self.wallet.pool.connection() as conn:
            tokens = await self.accounts.list_tokens(conn, org)
        return pb.ListApiTokensResponse(api_tokens=[api_token(t) for t in tokens])

    async def RevokeApiToken(
        self, request: pb.RevokeApiTokenRequest, context: object
    ) -> pb.ApiToken:
        org = _org(request.organization_id)
        token_id = convert.parse_id(request.api_token_id, "api_token_id")

        async def revoke() -> pb.ApiToken:
            return api_token(await self.accounts.revoke_token(conn, org, token_id))

        async with self.wallet.pool.connection() as conn, conn.transaction():
            return await once(conn, f"org:{org}", request, pb.ApiToken, revoke)

    async def RenameApiToken(
        self, request: pb.RenameApiTokenRequest, context: object
    ) -> pb.ApiToken:
        org = _org(request.organization_id)
        token_id = convert.parse_id(request.api_token_id, "api_token_id")

        async def rename() -> pb.ApiToken:
            return api_token(await self.accounts.rename_token(conn, org, token_id, request.name))

        async with self.wallet.pool.connection() as conn, conn.transaction():
            return await once(conn, f"org:{org}", request, pb.ApiToken, rename)

    # ------------------------------------------------------------------ preferences

    async def GetPreferences(
        self, request: pb.GetPreferencesRequest, context: object
    ) -> pb.Preferences:
        org = _org(request.organization_id)
        user_id = convert.parse_id(request.user_id, "user_id")
        async with self.wallet.pool.connection() as conn:
            return preferences(await self.accounts.get_preferences(conn, org, user_id))

    async def UpdatePreferences(
        self, request: pb.UpdatePreferencesRequest, context: object
    ) -> pb.Preferences:
        m = request.preferences
        wanted = Preferences(
            organization_id=_org(m.organization_id),
            user_id=convert.parse_id(m.user_id, "user_id"),
            display_currency=m.display_currency,
            theme=m.theme,
            compact_mode=m.compact_mode,
            email_notifications=m.email_notifications,
            low_balance_notifications=m.low_balance_notifications,
        )

        async def update() -> pb.Preferences:
            return preferences(
                await self.accounts.update_preferences(conn, wanted, list(request.fields))
            )

        scope = f"org:{wanted.organization_id}"
        async with self.wallet.pool.connection() as conn, conn.transaction():
            return await once(conn, scope, request, pb.Preferences, update)
