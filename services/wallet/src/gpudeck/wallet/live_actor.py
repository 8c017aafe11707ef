"""The token behind an account change must still be valid when the change is made.

The gateway keeps a token's identity a few seconds (graphql: auth.TTL_SECONDS), so a token
revoked or expired a moment ago may still reach the wallet. For reads that window is harmless;
for account changes it is not: a member demoted (their tokens revoked) could use it to promote
themselves back, or mint a new token, for good; and a revoked billing token should move no
money. Account changes check under the organization's wallet lock (`once`), which revocations
take too, so a call ordered after a revocation sees it; money calls check as they begin.
"""

from __future__ import annotations

import uuid
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from gpudeck.kit.errors import PermissionDenied, Unauthenticated
from gpudeck.kit.logs import actor


def _token_id() -> uuid.UUID | None:
    """The API token the caller (`x-actor`) is, if it names one."""
    who = actor.get()
    if not who.startswith("token:"):
        return None
    try:
        return uuid.UUID(who.removeprefix("token:"))
    except ValueError:
        return None


async def require_live_caller(pool: AsyncConnectionPool[Any]) -> None:
    """`require_live_actor` on a connection of its own, taken only when the caller is a token."""
    if _token_id() is not None:
        async with pool.connection() as conn:
            await require_live_actor(conn)


async def require_live_actor(conn: AsyncConnection[Any]) -> None:
    """Refuse (UNAUTHENTICATED) when the caller (`x-actor`) is an API token that is revoked or
    past its expiry. Other callers (services, operators, actors that name no token of ours) pass."""
    token_id = _token_id()
    if token_id is None:
        return
    cur = await conn.execute(
        "SELECT revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())"
        " FROM api_tokens WHERE id = %s",
        (token_id,),
    )
    row = await cur.fetchone()
    if row is not None and not row[0]:
        raise Unauthenticated(
            f"the calling token {token_id} was revoked or has expired", field="x-actor"
        )


async def caller_token_role(conn: AsyncConnection[Any], organization_id: uuid.UUID) -> str | None:
    """The role of the calling API token (`x-actor`), which must be one of `organization_id`'s;
    None when the caller is no token of ours (a service, an operator), who is trusted. Read in
    the call's transaction, after its locks: what the gateway checked a moment before may have
    changed (a member promoted meanwhile), this may not."""
    token_id = _token_id()
    if token_id is None:
        return None
    cur = await conn.execute(
        "SELECT organization_id, role FROM api_tokens WHERE id = %s", (token_id,)
    )
    row = await cur.fetchone()
    if row is None:
        return None
    if row[0] != organization_id:
        raise PermissionDenied(
            f"the calling token {token_id} acts in another organization", field="x-actor"
        )
    return str(row[1])
