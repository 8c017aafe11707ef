"""All SQL of accounts: organizations, users and memberships, projects, API tokens, preferences.

Every mutation runs in the caller's transaction and writes its account.* event to the outbox
there. Mutations inside one organization first lock its row (FOR NO KEY UPDATE, which leaves
foreign-key inserts elsewhere free), so checks such as "the last owner stays" cannot race.
`authenticate` is the hot path: one indexed SELECT, and a write at most once a minute per token.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection, sql

from gpudeck.kit.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from gpudeck.kit.events import Outbox
from gpudeck.proto.events.v1.envelope_pb2 import Event
from gpudeck.wallet import events, idempotency
from gpudeck.wallet.accounts import (
    DEFAULT_PROJECT,
    ApiToken,
    Identity,
    Member,
    Organization,
    Preferences,
    Project,
    User,
    check_email,
    check_expiry,
    check_grant,
    check_kyc_status,
    check_name,
    check_preference_update,
    check_role,
    fingerprint,
    new_secret,
    token_digest,
)
from gpudeck.wallet.ids import uuid7
from gpudeck.wallet.ledger_store import db_now, open_wallet
from gpudeck.wallet.money import check_currency

Conn = AsyncConnection[Any]
# A role's rank in SQL, weakest first: array_position(RANKED, role).
RANKED = "ARRAY['viewer', 'member', 'billing', 'admin', 'owner']"
# How often a token's last_used_at is written at most.
LAST_USED_RESOLUTION = "60 seconds"

ORGANIZATION = """
SELECT o.id, o.name, o.currency, o.plan_code, o.kyc_status, o.created_at, u.id, u.email, u.name,
       (SELECT count(*) FROM memberships m WHERE m.organization_id = o.id)
FROM organizations o JOIN users u ON u.id = o.owner_user_id
WHERE o.id = %s AND o.deleted_at IS NULL
"""
MEMBER = """
SELECT m.organization_id, u.id, u.email, u.name, m.role, m.created_at
FROM memberships m JOIN users u ON u.id = m.user_id
"""
PROJECT_COLUMNS = "id, organization_id, name, created_at, last_used_at, deleted_at"
PROJECT = f"SELECT {PROJECT_COLUMNS} FROM projects"
TOKEN_COLUMNS = (
    "id, organization_id, name, role, created_by, created_at, expires_at, revoked_at, last_used_at"
)
TOKEN = f"SELECT {TOKEN_COLUMNS} FROM api_tokens"
AUTHENTICATE = f"""
SELECT t.id, t.organization_id, o.name, t.role, t.created_by, coalesce(u.email, ''), t.expires_at,
       t.revoked_at IS NOT NULL, t.expires_at IS NOT NULL AND t.expires_at <= now(),
       o.deleted_at IS NOT NULL,
       t.last_used_at IS NULL OR t.last_used_at < now() - interval '{LAST_USED_RESOLUTION}'
FROM api_tokens t
JOIN organizations o ON o.id = t.organization_id
LEFT JOIN users u ON u.id = t.created_by
WHERE t.secret_sha256 = %s
"""
MAX_SECRET = 512


@dataclass(frozen=True)
class NewOrganization:
    name: str
    currency: str
    owner_user_id: uuid.UUID | None = None
    owner_email: str = ""
    owner_name: str = ""
    idempotency_key: str = ""


@dataclass(frozen=True)
class CreatedOrganization:
    organization: Organization
    owner_token: str  # the secret: "" on a retried call, or when none was asked for
    owner_api_token: ApiToken | None
    default_project: Project | None


def _organization(row: Sequence[Any]) -> Organization:
    owner = User(row[6], row[7], row[8])
    return Organization(row[0], row[1], owner, row[2], row[3], row[4], row[5], row[9])


def _member(row: Sequence[Any]) -> Member:
    return Member(row[0], User(row[1], row[2], row[3]), row[4], row[5])


def _project(row: Sequence[Any]) -> Project:
    return Project(*row)


def _token(row: Sequence[Any]) -> ApiToken:
    return ApiToken(*row)


def _org_not_found(org: uuid.UUID) -> NotFound:
    return NotFound(f"organization {org} not found", field="organization_id")


class AccountStore:
    """Accounts in the wallet's schema; events go to `outbox` in the caller's transaction."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox

    # ------------------------------------------------------------------ organizations

    async def create_organization(
        self,
        conn: Conn,
        request: NewOrganization,
        *,
        organization_id: uuid.UUID | None = None,
        project_id: uuid.UUID | None = None,
        owner_token: bool = True,
    ) -> CreatedOrganization:
        """Organization, owner membership, wallet, project "default" and an owner token, at once.

        With an idempotency key, a retry by the same owner returns the first organization
        (without the token's secret); the same key with another name or currency is refused.
        """
        name = check_name(request.name)
        currency = check_currency(request.currency)
        owner = await self._owner(conn, request)
        scope, key = f"user:{owner.id}", request.idempotency_key
        digest = fingerprint("organization.create", name=name, currency=currency)
        if key:
            earlier = await idempotency.recall(conn, scope, key, digest)
            if earlier is not None:
                return await self._created_before(conn, earlier)
        org = organization_id or uuid7()
        await conn.execute(
            "INSERT INTO organizations (id, name, owner_user_id, currency) VALUES (%s, %s, %s, %s)",
            (org, name, owner.id, currency),
        )
        await conn.execute(
            "INSERT INTO memberships (organization_id, user_id, role) VALUES (%s, %s, 'owner')",
            (org, owner.id),
        )
        await open_wallet(conn, org, currency)
        project = await self._insert_project(conn, org, DEFAULT_PROJECT, project_id)
        news = [
            self._organization_event("account.organization.created", org, name),
            self._member_event("account.member.created", org, owner, "owner"),
            self._project_event("account.project.created", project),
        ]
        secret, token = "", None
        if owner_token:
            secret, token = await self._insert_token(conn, org, "owner", "owner", owner.id, None)
            news.append(self._token_event("account.token.created", token))
        await self.outbox.add_many(conn, news)
        if key:
            result = {"organization_id": str(org), "project_id": str(project.id)}
            if token is not None:
                result["token_id"] = str(token.id)
            await idempotency.remember(conn, scope, key, digest, result)
        return CreatedOrganization(await self.get_organization(conn, org), secret, token, project)

    async def _owner(self, conn: Conn, request: NewOrganization) -> User:
        """The owning user, row-locked (which serializes their creations), made if need be."""
        email = check_email(request.owner_email, field="owner_email") if request.owner_email else ""
        if request.owner_user_id is None and not email:
            raise InvalidArgument("owner_user_id or owner_email is required", field="owner_user_id")
        if request.owner_user_id is not None:
            cur = await conn.execute(
                "SELECT id, email, name FROM users WHERE id = %s FOR UPDATE",
                (request.owner_user_id,),
            )
            row = await cur.fetchone()
            if row is not None:
                return User(*row)
            if not email:
                raise NotFound(f"user {request.owner_user_id} not found", field="owner_user_id")
        return await self._user_by_email(
            conn,
            email,
            name=request.owner_name.strip(),
            user_id=request.owner_user_id,
            field="owner_email",
        )

    async def _user_by_email(
        self,
        conn: Conn,
        email: str,
        *,
        name: str = "",
        user_id: uuid.UUID | None = None,
        field: str = "email",
    ) -> User:
        """The user with `email`, created (with `user_id` if given) when there is none; locked."""
        cur = await conn.execute(
            "INSERT INTO users (id, email, name) VALUES (%s, %s, %s)"
            " ON CONFLICT (email) DO UPDATE SET email = excluded.email RETURNING id, email, name",
            (user_id or uuid7(), email, name),
        )
        row = await cur.fetchone()
        assert row is not None
        user = User(*row)
        if user_id is not None and user.id != user_id:
            raise AlreadyExists(f"{field} {email!r} belongs to another user", field=field)
        return user

    async def _created_before(self, conn: Conn, earlier: dict[str, Any]) -> CreatedOrganization:
        org = await self.get_organization(conn, uuid.UUID(earlier["organization_id"]))
        token = None
        if earlier.get("token_id"):
            cur = await conn.execute(f"{TOKEN} WHERE id = %s", (uuid.UUID(earlier["token_id"]),))
            row = await cur.fetchone()
            token = _token(row) if row else None
        project = await self._find_project(conn, uuid.UUID(earlier["project_id"]), deleted=True)
        return CreatedOrganization(org, "", token, project)

    async def get_organization(self, conn: Conn, org: uuid.UUID) -> Organization:
        cur = await conn.execute(ORGANIZATION, (org,))
        row = await cur.fetchone()
        if row is None:
            raise _org_not_found(org)
        return _organization(row)

    async def find_organization(self, conn: Conn, org: uuid.UUID) -> Organization | None:
        cur = await conn.execute(ORGANIZATION, (org,))
        row = await cur.fetchone()
        return _organization(row) if row else None

    async def _lock_organization(self, conn: Conn, org: uuid.UUID) -> tuple[str, uuid.UUID]:
        """Serialize this organization's account changes; its (currency, owner_user_id)."""
        cur = await conn.execute(
            "SELECT currency, owner_user_id FROM organizations"
            " WHERE id = %s AND deleted_at IS NULL FOR NO KEY UPDATE",
            (org,),
        )
        row = await cur.fetchone()
        if row is None:
            raise _org_not_found(org)
        return row[0], row[1]

    async def update_organization(self, conn: Conn, org: uuid.UUID, *, name: str) -> Organization:
        name = check_name(name)
        await self._lock_organization(conn, org)
        await conn.execute("UPDATE organizations SET name = %s WHERE id = %s", (name, org))
        await self.outbox.add(
            conn, self._organization_event("account.organization.updated", org, name)
        )
        return await self.get_organization(conn, org)

    async def set_kyc_status(self, conn: Conn, org: uuid.UUID, status: str) -> Organization:
        status = check_kyc_status(status)
        await self._lock_organization(conn, org)
        cur = await conn.execute(
            "UPDATE organizations SET kyc_status = %s WHERE id = %s AND kyc_status <> %s"
            " RETURNING name",
            (status, org, status),
        )
        changed = await cur.fetchone()
        if changed is not None:
            event = self._organization_event("account.organization.updated", org, changed[0])
            await self.outbox.add(conn, event)
        return await self.get_organization(conn, org)

    @staticmethod
    def _organization_event(event_type: str, org: uuid.UUID, name: str) -> Event:
        return events.account_changed(event_type, org, kind="organization", id=org, name=name)

    # ------------------------------------------------------------------ members

    async def list_members(self, conn: Conn, org: uuid.UUID) -> list[Member]:
        await self.get_organization(conn, org)
        cur = await conn.execute(
            f"{MEMBER} WHERE m.organization_id = %s"
            f" ORDER BY array_position({RANKED}, m.role) DESC, m.created_at, u.email",
            (org,),
        )
        return [_member(row) for row in await cur.fetchall()]

    async def member_role(self, conn: Conn, org: uuid.UUID, user: uuid.UUID) -> str | None:
        cur = await conn.execute(
            "SELECT role FROM memberships WHERE organization_id = %s AND user_id = %s", (org, user)
        )
        row = await cur.fetchone()
        return row[0] if row else None

    async def invite_member(
        self, conn: Conn, org: uuid.UUID, email: str, role: str, *, name: str = ""
    ) -> Member:
        """Add the user with `email` (created if new) to the organization with `role`."""
        email, role = check_email(email), check_role(role)
        await self._lock_organization(conn, org)
        user = await self._user_by_email(conn, email, name=name.strip())
        cur = await conn.execute(
            "INSERT INTO memberships (organization_id, user_id, role) VALUES (%s, %s, %s)"
            " ON CONFLICT DO NOTHING RETURNING created_at",
            (org, user.id, role),
        )
        row = await cur.fetchone()
        if row is None:
            raise AlreadyExists(f"{email} is already a member of organization {org}", field="email")
        await self.outbox.add(conn, self._member_event("account.member.created", org, user, role))
        return Member(org, user, role, row[0])

    async def set_member_role(
        self, conn: Conn, org: uuid.UUID, user_id: uuid.UUID, role: str
    ) -> Member:
        """Change a member's role. The last owner cannot step down; tokens the member made that
        now outrank them are revoked."""
        role = check_role(role)
        _, recorded_owner = await self._lock_organization(conn, org)
        member = await self._member(conn, org, user_id)
        if member.role == role:
            return member
        if member.role == "owner":
            await self._keep_an_owner(conn, org, "demote")
        await conn.execute(
            "UPDATE memberships SET role = %s WHERE organization_id = %s AND user_id = %s",
            (role, org, user_id),
        )
        if user_id == recorded_owner and role != "owner":
            await self._reassign_owner(conn, org, user_id)
        await self.outbox.add(
            conn, self._member_event("account.member.updated", org, member.user, role)
        )
        await self._revoke_tokens_of(conn, org, user_id, above=role)
        return Member(org, member.user, role, member.joined_at)

    async def remove_member(self, conn: Conn, org: uuid.UUID, user_id: uuid.UUID) -> Member:
        """Remove a member and revoke the tokens they made here; the last owner stays."""
        _, recorded_owner = await self._lock_organization(conn, org)
        member = await self._member(conn, org, user_id)
        if member.role == "owner":
            await self._keep_an_owner(conn, org, "remove")
        await conn.execute(
            "DELETE FROM memberships WHERE organization_id = %s AND user_id = %s", (org, user_id)
        )
        if user_id == recorded_owner:
            await self._reassign_owner(conn, org, user_id)
        event = self._member_event("account.member.deleted", org, member.user, member.role)
        await self.outbox.add(conn, event)
        await self._revoke_tokens_of(conn, org, user_id, above=None)
        return member

    async def _member(self, conn: Conn, org: uuid.UUID, user_id: uuid.UUID) -> Member:
        cur = await conn.execute(
            f"{MEMBER} WHERE m.organization_id = %s AND m.user_id = %s", (org, user_id)
        )
        row = await cur.fetchone()
        if row is None:
            raise NotFound(f"user {user_id} is not a member of organization {org}", field="user_id")
        return _member(row)

    async def _keep_an_owner(self, conn: Conn, org: uuid.UUID, verb: str) -> None:
        cur = await conn.execute(
            "SELECT count(*) FROM memberships WHERE organization_id = %s AND role = 'owner'", (org,)
        )
        row = await cur.fetchone()
        if row is None or row[0] <= 1:
            raise FailedPrecondition(
                f"cannot {verb} the last owner of organization {org}; make another owner first",
                field="user_id",
                reason="LAST_OWNER",
            )

    async def _reassign_owner(self, conn: Conn, org: uuid.UUID, leaving: uuid.UUID) -> None:
        """organizations.owner_user_id follows the longest-standing remaining owner."""
        await conn.execute(
            "UPDATE organizations SET owner_user_id = ("
            " SELECT user_id FROM memberships WHERE organization_id = %s AND role = 'owner'"
            " AND user_id <> %s ORDER BY created_at, user_id LIMIT 1) WHERE id = %s",
            (org, leaving, org),
        )

    async def _revoke_tokens_of(
        self, conn: Conn, org: uuid.UUID, user_id: uuid.UUID, *, above: str | None
    ) -> None:
        """Revoke the live tokens `user_id` made here: all, or those outranking `above`."""
        cur = await conn.execute(
            f"UPDATE api_tokens SET revoked_at = now() WHERE organization_id = %s"
            f" AND created_by = %s AND revoked_at IS NULL"
            f" AND (%s::text IS NULL"
            f" OR array_position({RANKED}, role) > array_position({RANKED}, %s::text))"
            f" RETURNING {TOKEN_COLUMNS}",
            (org, user_id, above, above),
        )
        revoked = [_token(row) for row in await cur.fetchall()]
        await self.outbox.add_many(
            conn, [self._token_event("account.token.deleted", t) for t in revoked]
        )

    @staticmethod
    def _member_event(event_type: str, org: uuid.UUID, user: User, role: str) -> Event:
        return events.account_changed(
            event_type, org, kind="member", id=user.id, name=user.name, email=user.email, role=role
        )

    # ------------------------------------------------------------------ projects

    async def create_project(
        self, conn: Conn, org: uuid.UUID, name: str, *, idempotency_key: str = ""
    ) -> Project:
        name = check_name(name)
        await self._lock_organization(conn, org)
        scope, digest = f"org:{org}:projects", fingerprint("project.create", name=name)
        if idempotency_key:
            earlier = await idempotency.recall(conn, scope, idempotency_key, digest)
            if earlier is not None:
                return await self.get_project(conn, uuid.UUID(earlier["project_id"]), deleted=True)
        project = await self._insert_project(conn, org, name, None)
        await self.outbox.add(conn, self._project_event("account.project.created", project))
        if idempotency_key:
            result = {"project_id": str(project.id)}
            await idempotency.remember(conn, scope, idempotency_key, digest, result)
        return project

    async def _insert_project(
        self, conn: Conn, org: uuid.UUID, name: str, project_id: uuid.UUID | None
    ) -> Project:
        cur = await conn.execute(
            "INSERT INTO projects (id, organization_id, name) VALUES (%s, %s, %s)"
            " ON CONFLICT (organization_id, name) DO NOTHING"
            f" RETURNING {PROJECT_COLUMNS}",
            (project_id or uuid7(), org, name),
        )
        row = await cur.fetchone()
        if row is None:
            raise AlreadyExists(
                f"organization {org} already has a project named {name!r}"
                " (names of deleted projects stay taken)",
                field="name",
            )
        return _project(row)

    async def _find_project(
        self, conn: Conn, project_id: uuid.UUID, *, deleted: bool = False
    ) -> Project | None:
        live = "" if deleted else " AND deleted_at IS NULL"
        cur = await conn.execute(f"{PROJECT} WHERE id = %s{live}", (project_id,))
        row = await cur.fetchone()
        return _project(row) if row else None

    async def get_project(
        self, conn: Conn, project_id: uuid.UUID, *, deleted: bool = False
    ) -> Project:
        project = await self._find_project(conn, project_id, deleted=deleted)
        if project is None:
            raise NotFound(f"project {project_id} not found", field="project_id")
        return project

    async def list_projects(self, conn: Conn, org: uuid.UUID, *, limit: int = 50) -> list[Project]:
        """The organization's projects, most recently used first."""
        await self.get_organization(conn, org)
        cur = await conn.execute(
            f"{PROJECT} WHERE organization_id = %s AND deleted_at IS NULL"
            " ORDER BY last_used_at DESC, id DESC LIMIT %s",
            (org, limit),
        )
        return [_project(row) for row in await cur.fetchall()]

    async def touch_project(self, conn: Conn, project_id: uuid.UUID) -> Project:
        """Mark a project as just used (it moves to the front of the recent list); no event."""
        cur = await conn.execute(
            "UPDATE projects SET last_used_at = greatest(last_used_at, clock_timestamp())"
            " WHERE id = %s AND deleted_at IS NULL"
            f" RETURNING {PROJECT_COLUMNS}",
            (project_id,),
        )
        row = await cur.fetchone()
        if row is None:
            raise NotFound(f"project {project_id} not found", field="project_id")
        return _project(row)

    async def delete_project(self, conn: Conn, project_id: uuid.UUID) -> Project:
        """Soft-delete a project that is not its organization's last and meters nothing."""
        project = await self.get_project(conn, project_id)
        await self._lock_organization(conn, project.organization_id)
        cur = await conn.execute(
            "SELECT (SELECT count(*) FROM projects WHERE organization_id = %s"
            "        AND deleted_at IS NULL),"
            "       EXISTS (SELECT 1 FROM meters WHERE organization_id = %s AND project_id = %s"
            "        AND closed_at IS NULL)",
            (project.organization_id, project.organization_id, project_id),
        )
        row = await cur.fetchone()
        assert row is not None
        if row[0] <= 1:
            raise FailedPrecondition(
                f"project {project_id} is the organization's last project", field="project_id"
            )
        if row[1]:
            raise FailedPrecondition(
                f"project {project_id} still has running resources", field="project_id"
            )
        cur = await conn.execute(
            "UPDATE projects SET deleted_at = now() WHERE id = %s AND deleted_at IS NULL"
            f" RETURNING {PROJECT_COLUMNS}",
            (project_id,),
        )
        row = await cur.fetchone()
        if row is None:  # deleted while we waited for the lock
            raise NotFound(f"project {project_id} not found", field="project_id")
        deleted = _project(row)
        await self.outbox.add(conn, self._project_event("account.project.deleted", deleted))
        return deleted

    @staticmethod
    def _project_event(event_type: str, project: Project) -> Event:
        return events.account_changed(
            event_type,
            project.organization_id,
            kind="project",
            id=project.id,
            name=project.name,
            project_id=project.id,
        )

    # ------------------------------------------------------------------ API tokens

    async def create_token(
        self,
        conn: Conn,
        org: uuid.UUID,
        *,
        name: str,
        role: str,
        expires_at: datetime | None = None,
        created_by: uuid.UUID | None = None,
        secret: str | None = None,
    ) -> tuple[str, ApiToken]:
        """A new token and its secret (shown once). With `created_by`, that user must be a
        member and `role` may not exceed theirs."""
        name, role = check_name(name), check_role(role)
        check_expiry(expires_at, await db_now(conn))
        await self._lock_organization(conn, org)
        if created_by is not None:
            creator_role = await self.member_role(conn, org, created_by)
            if creator_role is None:
                raise PermissionDenied(
                    f"created_by: user {created_by} is not a member of organization {org}",
                    field="created_by",
                )
            check_grant(creator_role, role)
        secret, token = await self._insert_token(
            conn, org, name, role, created_by, expires_at, secret
        )
        await self.outbox.add(conn, self._token_event("account.token.created", token))
        return secret, token

    async def _insert_token(
        self,
        conn: Conn,
        org: uuid.UUID,
        name: str,
        role: str,
        created_by: uuid.UUID | None,
        expires_at: datetime | None,
        secret: str | None = None,
    ) -> tuple[str, ApiToken]:
        secret = secret or new_secret()
        cur = await conn.execute(
            "INSERT INTO api_tokens"
            " (id, organization_id, created_by, name, role, secret_sha256, expires_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s)"
            f" RETURNING {TOKEN_COLUMNS}",
            (uuid7(), org, created_by, name, role, token_digest(secret), expires_at),
        )
        row = await cur.fetchone()
        assert row is not None
        return secret, _token(row)

    async def find_token_by_secret(self, conn: Conn, secret: str) -> ApiToken | None:
        cur = await conn.execute(f"{TOKEN} WHERE secret_sha256 = %s", (token_digest(secret),))
        row = await cur.fetchone()
        return _token(row) if row else None

    async def list_tokens(self, conn: Conn, org: uuid.UUID) -> list[ApiToken]:
        """The organization's tokens, newest first, revoked ones included (never secrets)."""
        await self.get_organization(conn, org)
        cur = await conn.execute(
            f"{TOKEN} WHERE organization_id = %s ORDER BY created_at DESC, id DESC", (org,)
        )
        return [_token(row) for row in await cur.fetchall()]

    async def revoke_token(self, conn: Conn, org: uuid.UUID, token_id: uuid.UUID) -> ApiToken:
        """Revoke at once (the next Authenticate refuses it); revoking twice changes nothing."""
        cur = await conn.execute(
            "UPDATE api_tokens SET revoked_at = now()"
            " WHERE id = %s AND organization_id = %s AND revoked_at IS NULL"
            f" RETURNING {TOKEN_COLUMNS}",
            (token_id, org),
        )
        row = await cur.fetchone()
        if row is not None:
            token = _token(row)
            await self.outbox.add(conn, self._token_event("account.token.deleted", token))
            return token
        cur = await conn.execute(f"{TOKEN} WHERE id = %s AND organization_id = %s", (token_id, org))
        row = await cur.fetchone()
        if row is None:
            raise NotFound(
                f"API token {token_id} not found in organization {org}", field="api_token_id"
            )
        return _token(row)

    @staticmethod
    def _token_event(event_type: str, token: ApiToken) -> Event:
        return events.account_changed(
            event_type,
            token.organization_id,
            kind="token",
            id=token.id,
            name=token.name,
            role=token.role,
        )

    async def authenticate(self, conn: Conn, secret: str) -> Identity:
        """Who `secret` is; Unauthenticated, saying why, for unknown, revoked or expired ones."""
        if not secret:
            raise Unauthenticated("token is required", field="token")
        if len(secret) > MAX_SECRET:
            raise Unauthenticated("unknown token", field="token", reason="TOKEN_UNKNOWN")
        cur = await conn.execute(AUTHENTICATE, (token_digest(secret),))
        row = await cur.fetchone()
        if row is None:
            raise Unauthenticated("unknown token", field="token", reason="TOKEN_UNKNOWN")
        (
            token_id,
            org,
            org_name,
            role,
            user_id,
            email,
            expires_at,
            revoked,
            expired,
            org_deleted,
            stale,
        ) = row
        if revoked:
            raise Unauthenticated("token was revoked", field="token", reason="TOKEN_REVOKED")
        if expired:
            raise Unauthenticated("token has expired", field="token", reason="TOKEN_EXPIRED")
        if org_deleted:
            raise Unauthenticated(
                "token's organization was deleted", field="token", reason="TOKEN_UNKNOWN"
            )
        if stale:
            await conn.execute(
                "UPDATE api_tokens SET last_used_at = now() WHERE id = %s AND (last_used_at IS NULL"
                f" OR last_used_at < now() - interval '{LAST_USED_RESOLUTION}')",
                (token_id,),
            )
        return Identity(token_id, org, org_name, role, user_id, email, expires_at)

    # ------------------------------------------------------------------ preferences

    async def get_preferences(self, conn: Conn, org: uuid.UUID, user_id: uuid.UUID) -> Preferences:
        """A member's preferences; the defaults (display in the wallet's currency) if unset."""
        cur = await conn.execute(
            "SELECT o.currency, p.display_currency, p.theme, p.compact_mode,"
            " p.email_notifications, p.low_balance_notifications"
            " FROM organizations o"
            " JOIN memberships m ON m.organization_id = o.id AND m.user_id = %s"
            " LEFT JOIN preferences p ON p.organization_id = o.id AND p.user_id = m.user_id"
            " WHERE o.id = %s AND o.deleted_at IS NULL",
            (user_id, org),
        )
        row = await cur.fetchone()
        if row is None:
            await self.get_organization(conn, org)
            raise NotFound(f"user {user_id} is not a member of organization {org}", field="user_id")
        currency, display, *rest = row
        if rest[0] is None:
            return Preferences(org, user_id, currency)
        return Preferences(org, user_id, display or currency, *rest)

    async def update_preferences(
        self, conn: Conn, prefs: Preferences, fields: list[str]
    ) -> Preferences:
        """Store the `fields` of `prefs` (all when empty); the others keep their values."""
        values = check_preference_update(
            {
                name: getattr(prefs, name)
                for name in (
                    "display_currency",
                    "theme",
                    "compact_mode",
                    "email_notifications",
                    "low_balance_notifications",
                )
            },
            fields,
        )
        org, user_id = prefs.organization_id, prefs.user_id
        await self.get_preferences(conn, org, user_id)  # the member exists
        columns = [sql.Identifier(name) for name in values]
        query = sql.SQL(
            "INSERT INTO preferences (organization_id, user_id, {columns})"
            " VALUES (%s, %s, {values})"
            " ON CONFLICT (organization_id, user_id) DO UPDATE SET {updates}"
        ).format(
            columns=sql.SQL(", ").join(columns),
            values=sql.SQL(", ").join(sql.Placeholder() for _ in columns),
            updates=sql.SQL(", ").join(
                sql.SQL("{0} = excluded.{0}").format(column) for column in columns
            ),
        )
        await conn.execute(query, (org, user_id, *values.values()))
        return await self.get_preferences(conn, org, user_id)
