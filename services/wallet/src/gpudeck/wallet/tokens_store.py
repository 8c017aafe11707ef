"""SQL of API tokens: issuing, listing and revoking them, and authenticating a secret.

Only a secret's SHA-256 is kept. `authenticate` is the hot path: one indexed SELECT, and a write
at most once a minute per token.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from gpudeck.kit.errors import NotFound, PermissionDenied, Unauthenticated
from gpudeck.proto.events.v1.envelope_pb2 import Event
from gpudeck.wallet import events
from gpudeck.wallet.accounts import (
    ApiToken,
    Identity,
    check_expiry,
    check_grant,
    check_name,
    check_role,
    new_secret,
    token_digest,
)
from gpudeck.wallet.ids import uuid7
from gpudeck.wallet.ledger_store import db_now
from gpudeck.wallet.organizations_store import RANKED, Conn, OrganizationStore

# How often a token's last_used_at is written at most.
LAST_USED_RESOLUTION = "60 seconds"

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


def _token(row: Sequence[Any]) -> ApiToken:
    return ApiToken(*row)


class TokenStore(OrganizationStore):
    """An organization's API tokens, and who a token's secret is."""

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
        await self.lock_organization(conn, org)
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

    async def _find_token(self, conn: Conn, token_id: uuid.UUID) -> ApiToken | None:
        cur = await conn.execute(f"{TOKEN} WHERE id = %s", (token_id,))
        row = await cur.fetchone()
        return _token(row) if row else None

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
        return await self._token_in(conn, org, token_id)

    async def _token_in(self, conn: Conn, org: uuid.UUID, token_id: uuid.UUID) -> ApiToken:
        cur = await conn.execute(f"{TOKEN} WHERE id = %s AND organization_id = %s", (token_id, org))
        row = await cur.fetchone()
        if row is None:
            raise NotFound(
                f"API token {token_id} not found in organization {org}", field="api_token_id"
            )
        return _token(row)

    async def rename_token(
        self, conn: Conn, org: uuid.UUID, token_id: uuid.UUID, name: str
    ) -> ApiToken:
        """Give a token a new name (its secret, role and expiry stay)."""
        name = check_name(name)
        cur = await conn.execute(
            "UPDATE api_tokens SET name = %s WHERE id = %s AND organization_id = %s"
            f" AND name <> %s RETURNING {TOKEN_COLUMNS}",
            (name, token_id, org, name),
        )
        row = await cur.fetchone()
        if row is not None:
            token = _token(row)
            await self.outbox.add(conn, self._token_event("account.token.updated", token))
            return token
        return await self._token_in(conn, org, token_id)

    async def _revoke_all_tokens(self, conn: Conn, org: uuid.UUID) -> list[Event]:
        """Revoke every live token of the organization; their events."""
        cur = await conn.execute(
            "UPDATE api_tokens SET revoked_at = now() WHERE organization_id = %s"
            f" AND revoked_at IS NULL RETURNING {TOKEN_COLUMNS}",
            (org,),
        )
        return [
            self._token_event("account.token.deleted", _token(row)) for row in await cur.fetchall()
        ]

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
