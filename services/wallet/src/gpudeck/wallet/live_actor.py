"""The token behind an account change must still be valid when the change is made.

The gateway keeps a token's identity a few seconds (graphql: auth.TTL_SECONDS), so a token
revoked or expired a moment ago may still reach the wallet. For reads that window is harmless;
for account changes it is not: a member demoted (their tokens revoked) could use it to promote
themselves back, or mint a new token, for good. The check runs under the organization's wallet
lock, which revocations take too, so a call ordered after a revocation sees it.
"""

from __future__ import annotations

import uuid
from typing import Any

from psycopg import AsyncConnection

from gpudeck.kit.errors import Unauthenticated
from gpudeck.kit.logs import actor


async def require_live_actor(conn: AsyncConnection[Any]) -> None:
    """Refuse (UNAUTHENTICATED) when the caller (`x-actor`) is an API token that is revoked or
    past its expiry. Other callers (services, operators, actors that name no token of ours) pass."""
    who = actor.get()
    if not who.startswith("token:"):
        return
    try:
        token_id = uuid.UUID(who.removeprefix("token:"))
    except ValueError:
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
