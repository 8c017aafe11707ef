"""Idempotency of single mutating calls: remember each key's answer, replay it on retry.

The caller holds the lock that serializes the scope (the organization's wallet row), so two
calls with one key cannot both miss the first lookup. In an organization's own scope a key is
one request whatever the call, transfers included (`recall_in_wallet`). Batches of transfers use the same table
in bulk (ledger_store).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from psycopg import AsyncConnection

from gpudeck.kit.errors import Conflict, echo


def key_reused(key: str) -> Conflict:
    return Conflict(
        f"idempotency_key {echo(key)} was already used with a different request",
        field="idempotency_key",
        reason="IDEMPOTENCY_KEY_REUSED",
    )


async def recall(
    conn: AsyncConnection[Any], scope: str, key: str, fingerprint: bytes
) -> dict[str, Any] | None:
    """The answer first given for (`scope`, `key`), or None; Conflict if the payload differs."""
    cur = await conn.execute(
        "SELECT fingerprint, result FROM idempotency WHERE scope = %s AND key = %s", (scope, key)
    )
    row = await cur.fetchone()
    if row is None:
        return None
    if bytes(row[0]) != fingerprint:
        raise key_reused(key)
    return row[1]  # type: ignore[no-any-return]


async def recall_in_wallet(
    conn: AsyncConnection[Any], organization_id: uuid.UUID, key: str, fingerprint: bytes
) -> dict[str, Any] | None:
    """`recall` in the organization's own scope (holds, plan changes, credit purchases), where
    a transfer's key counts too: one the organization's ledger used for another request is
    Conflict (the transfer side checks this table: migrations/017_one_key_one_request.sql)."""
    earlier = await recall(conn, str(organization_id), key, fingerprint)
    if earlier is not None:
        return earlier
    cur = await conn.execute(
        "SELECT 1 FROM transactions t WHERE t.organization_id = %s AND t.idempotency_key = %s"
        " AND t.fingerprint IS DISTINCT FROM %s",
        (organization_id, key, fingerprint),
    )
    if await cur.fetchone() is not None:
        raise key_reused(key)
    return None


async def remember(
    conn: AsyncConnection[Any], scope: str, key: str, fingerprint: bytes, result: dict[str, Any]
) -> None:
    await conn.execute(
        "INSERT INTO idempotency (scope, key, fingerprint, result) VALUES (%s, %s, %s, %s)",
        (scope, key, fingerprint, json.dumps(result)),
    )


async def refuse_taken(conn: AsyncConnection[Any], organization_id: uuid.UUID, key: str) -> None:
    """Conflict if the organization's key is taken: by a transfer, or in the organization's own
    scope (a hold, plan change, credit purchase, or an account call of any caller: `take`)."""
    cur = await conn.execute(
        "SELECT 1 FROM idempotency WHERE scope = %s AND key = %s"
        " UNION ALL SELECT 1 FROM transactions WHERE organization_id = %s AND idempotency_key = %s",
        (str(organization_id), key, organization_id, key),
    )
    if await cur.fetchone() is not None:
        raise key_reused(key)


async def take(
    conn: AsyncConnection[Any], organization_id: uuid.UUID, key: str, fingerprint: bytes
) -> None:
    """Mark the key used in the organization's own scope, where the money calls look (with no
    answer: an account call's answer is its caller's, kept in its own scope)."""
    await conn.execute(
        "INSERT INTO idempotency (scope, key, fingerprint, result) VALUES (%s, %s, %s, '{}')"
        " ON CONFLICT DO NOTHING",
        (str(organization_id), key, fingerprint),
    )
