"""Idempotency of single mutating calls: remember each key's answer, replay it on retry.

The caller holds the lock that serializes the scope (the organization's wallet row), so two
calls with one key cannot both miss the first lookup. Batches of transfers use the same table
in bulk (ledger_store).
"""

from __future__ import annotations

import json
from typing import Any

from psycopg import AsyncConnection

from gpudeck.kit.errors import Conflict


def key_reused(key: str) -> Conflict:
    return Conflict(
        f"idempotency_key {key!r} was already used with a different request",
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


async def remember(
    conn: AsyncConnection[Any], scope: str, key: str, fingerprint: bytes, result: dict[str, Any]
) -> None:
    await conn.execute(
        "INSERT INTO idempotency (scope, key, fingerprint, result) VALUES (%s, %s, %s, %s)",
        (scope, key, fingerprint, json.dumps(result)),
    )
