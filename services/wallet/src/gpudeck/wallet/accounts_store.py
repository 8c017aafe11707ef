"""All SQL of accounts behind one surface, AccountStore; this module owns creating organizations,
users and memberships, and members' preferences (projects and tokens: projects_store, tokens_store).

Every mutation runs in the caller's transaction and writes its account.* event to the outbox
there, after locking the organization's row (see organizations_store).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import sql

from gpudeck.kit.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, echo
from gpudeck.proto.events.v1.envelope_pb2 import Event
from gpudeck.wallet import events, idempotency
from gpudeck.wallet.accounts import (
    DEFAULT_PROJECT,
    ApiToken,
    Member,
    Organization,
    Preferences,
    Project,
    User,
    check_email,
    check_expiry,
    check_manage_member,
    check_name,
    check_preference_update,
    check_role,
    check_user_name,
    fingerprint,
)
from gpudeck.wallet.ids import uuid7
from gpudeck.wallet.ledger_store import db_now, open_wallet
from gpudeck.wallet.money import check_currency
from gpudeck.wallet.organizations_store import RANKED, Conn
from gpudeck.wallet.projects_store import ProjectStore
from gpudeck.wallet.text import check_text
from gpudeck.wallet.tokens_store import TokenStore

MEMBER = """
SELECT m.organization_id, u.id, u.email, u.name, m.role, m.created_at
FROM memberships m JOIN users u ON u.id = m.user_id
"""


@dataclass(frozen=True)
class NewOrganization:
    name: str
    currency: str
    owner_user_id: uuid.UUID | None = None
    owner_email: str = ""
    owner_name: str = ""
    idempotency_key: str = ""
    caller_scope: str = ""  # keys are this caller's own (the gateway: "token:<id>")
    owner_token_expires_at: datetime | None = None


@dataclass(frozen=True)
class CreatedOrganization:
    organization: Organization
    owner_token: str  # the secret: "" on a retried call, or when none was asked for
    owner_api_token: ApiToken | None
    default_project: Project | None


def _member(row: Sequence[Any]) -> Member:
    return Member(row[0], User(row[1], row[2], row[3]), row[4], row[5])


class AccountStore(ProjectStore, TokenStore):
    """Accounts in the wallet's schema; events go to `outbox` in the caller's transaction."""

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

        With an idempotency key, a retry by the same owner (and caller scope, when given)
        returns the first organization (without the token's secret); the same key with another
        name or currency is refused.
        """
        name = check_name(request.name)
        currency = check_currency(request.currency)
        key = check_text(request.idempotency_key, "idempotency_key")
        expires = request.owner_token_expires_at
        owner = await self._owner(conn, request)
        scope = f"user:{owner.id}"
        if request.caller_scope:
            scope = f"{scope}:{check_text(request.caller_scope, 'caller_scope')}"
        expiry = {"owner_token_expires_at": expires.isoformat()} if expires else {}
        digest = fingerprint("organization.create", name=name, currency=currency, **expiry)
        if key:
            earlier = await idempotency.recall(conn, scope, key, digest)
            if earlier is not None:
                return await self._created_before(conn, earlier)
        if owner_token:
            check_expiry(expires, await db_now(conn), field="owner_token_expires_at")
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
            secret, token = await self._insert_token(conn, org, "owner", "owner", owner.id, expires)
            news.append(self._token_event("account.token.created", token))
        await self.outbox.add_many(conn, news)
        if key:
            result = {"organization_id": str(org), "project_id": str(project.id)}
            if token is not None:
                result["token_id"] = str(token.id)
            await idempotency.remember(conn, scope, key, digest, result)
        return CreatedOrganization(await self.get_organization(conn, org), secret, token, project)

    async def close_organization(self, conn: Conn, org: uuid.UUID) -> None:
        """Mark a (locked) organization deleted, revoke all its tokens and delete its projects
        (a resource can no longer name one), with their events."""
        cur = await conn.execute(
            "UPDATE organizations SET deleted_at = now() WHERE id = %s AND deleted_at IS NULL"
            " RETURNING name",
            (org,),
        )
        row = await cur.fetchone()
        if row is None:
            raise NotFound(f"organization {org} not found", field="organization_id")
        news = [
            *await self._revoke_all_tokens(conn, org),
            *await self._delete_all_projects(conn, org),
        ]
        news.append(self._organization_event("account.organization.deleted", org, row[0]))
        await self.outbox.add_many(conn, news)

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
            name=check_user_name(request.owner_name, field="owner_name"),
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
            raise AlreadyExists(
                f"{field} {echo(email)} belongs to another user", field=field, reason="EMAIL_TAKEN"
            )
        return user

    async def _created_before(self, conn: Conn, earlier: dict[str, Any]) -> CreatedOrganization:
        org = await self.get_organization(conn, uuid.UUID(earlier["organization_id"]))
        token = None
        if earlier.get("token_id"):
            token = await self._find_token(conn, uuid.UUID(earlier["token_id"]))
        project = await self._find_project(conn, uuid.UUID(earlier["project_id"]), deleted=True)
        return CreatedOrganization(org, "", token, project)

    # ------------------------------------------------------------------ members

    async def list_members(self, conn: Conn, org: uuid.UUID) -> list[Member]:
        await self.get_organization(conn, org)
        cur = await conn.execute(
            f"{MEMBER} WHERE m.organization_id = %s"
            f" ORDER BY array_position({RANKED}, m.role) DESC, m.created_at, u.email",
            (org,),
        )
        return [_member(row) for row in await cur.fetchall()]

    async def invite_member(
        self, conn: Conn, org: uuid.UUID, email: str, role: str, *, name: str = ""
    ) -> Member:
        """Add the user with `email` (created if new) to the organization with `role`."""
        email, role = check_email(email), check_role(role)
        await self.lock_organization(conn, org)
        user = await self._user_by_email(conn, email, name=check_user_name(name))
        cur = await conn.execute(
            "INSERT INTO memberships (organization_id, user_id, role) VALUES (%s, %s, %s)"
            " ON CONFLICT DO NOTHING RETURNING created_at",
            (org, user.id, role),
        )
        row = await cur.fetchone()
        if row is None:
            raise AlreadyExists(
                f"{email} is already a member of organization {org}",
                field="email",
                reason="ALREADY_MEMBER",
            )
        await self.outbox.add(conn, self._member_event("account.member.created", org, user, role))
        return Member(org, user, role, row[0])

    async def set_member_role(
        self, conn: Conn, org: uuid.UUID, user_id: uuid.UUID, role: str, *, by: str | None = None
    ) -> Member:
        """Change a member's role. The last owner cannot step down; tokens the member made that
        now outrank them are revoked. `by`: the caller's role, checked against the member's
        role as it is now (under the organization's lock), None for a trusted caller."""
        role = check_role(role)
        _, recorded_owner = await self.lock_organization(conn, org)
        member = await self._member(conn, org, user_id)
        if by is not None:
            check_manage_member(by, member.role, role)
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

    async def remove_member(
        self, conn: Conn, org: uuid.UUID, user_id: uuid.UUID, *, by: str | None = None
    ) -> Member:
        """Remove a member and revoke the tokens they made here; the last owner stays. `by`: as
        for `set_member_role`."""
        _, recorded_owner = await self.lock_organization(conn, org)
        member = await self._member(conn, org, user_id)
        if by is not None:
            check_manage_member(by, member.role)
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
        """organizations.owner_user_id follows the longest-standing remaining owner, with its
        account.organization.updated (the organization's owner is part of it)."""
        cur = await conn.execute(
            "UPDATE organizations SET owner_user_id = ("
            " SELECT user_id FROM memberships WHERE organization_id = %s AND role = 'owner'"
            " AND user_id <> %s ORDER BY created_at, user_id LIMIT 1) WHERE id = %s"
            " RETURNING name",
            (org, leaving, org),
        )
        row = await cur.fetchone()
        if row is not None:
            await self.outbox.add(
                conn, self._organization_event("account.organization.updated", org, row[0])
            )

    @staticmethod
    def _member_event(event_type: str, org: uuid.UUID, user: User, role: str) -> Event:
        return events.account_changed(
            event_type, org, kind="member", id=user.id, name=user.name, email=user.email, role=role
        )

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
