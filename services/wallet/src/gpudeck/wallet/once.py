"""Keyed gRPC answers: with an idempotency key, a call's answer is kept and a retry gets it back
without acting again (the calls whose rows have no lock every caller takes: account changes and
settings; transfers and holds keep their keys under the wallet lock, in ledger_store)."""

from __future__ import annotations

import base64
import hashlib
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from google.protobuf.message import Message
from psycopg import AsyncConnection

from gpudeck.kit.logs import actor
from gpudeck.wallet import idempotency
from gpudeck.wallet.live_actor import require_live_actor
from gpudeck.wallet.organizations_store import lock_wallet_rows
from gpudeck.wallet.text import check_text

Answer = TypeVar("Answer", bound=Message)


async def once(
    conn: AsyncConnection[Any],
    scope: str,
    request: Any,
    answer_type: type[Answer],
    act: Callable[[], Awaitable[Answer]],
    *,
    secret: str = "",
) -> Answer:
    """`act`'s answer, or with `request.idempotency_key` the answer first given for it by this
    caller (`x-actor`) in `scope` (an organization: `org:<id>`): a retry changes nothing. A key
    is one request in its organization whatever the call and whoever sends it: another request
    with it (the request's type is part of its fingerprint), a transfer's, a hold's or a plan
    change's key too, is ABORTED; only its sender gets the first answer back. The field
    `secret` of the answer is not kept (a retry gets it empty). A token that calls must still be
    valid (live_actor), replays included."""
    key = check_text(request.idempotency_key, "idempotency_key")
    organization = scope.removeprefix("org:") if scope.startswith("org:") else ""
    mine = f"{scope}:{actor.get()}"
    # Serializes the calls with this key in the scope. In an organization's, its wallet row
    # does, with its money calls too, which hold it while they look at its keys (lock order:
    # the wallet, then the organization, as everywhere); elsewhere, a lock on the key. The
    # wallet row also orders the call after any revocation of its token (they take it too).
    if organization:
        await lock_wallet_rows(conn, [uuid.UUID(organization)])
    elif key:
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (f"{scope} {key}",)
        )
    await require_live_actor(conn)
    if not key:
        return await act()
    digest = _digest(request)
    earlier = await idempotency.recall(conn, mine, key, digest)
    if earlier is not None:
        return answer_type.FromString(base64.b64decode(earlier["answer"]))
    if organization:  # taken by another caller, or by the money calls (transfers, holds …)
        await idempotency.refuse_taken(conn, uuid.UUID(organization), key)
    answer = await act()
    kept = answer_type()
    kept.CopyFrom(answer)
    if secret:
        kept.ClearField(secret)
    stored = {"answer": base64.b64encode(kept.SerializeToString()).decode()}
    await idempotency.remember(conn, mine, key, digest, stored)
    if organization:  # the money calls see it taken (their keys live in this scope)
        await idempotency.take(conn, uuid.UUID(organization), key, digest)
    return answer


async def earlier_answer(
    conn: AsyncConnection[Any], scope: str, request: Any, answer_type: type[Answer]
) -> Answer | None:
    """The answer `once` kept for `request` (by this caller, its key) in `scope`, if any: for
    a call whose scope changed, so a retry of a request answered under the old one still gets
    that answer. ABORTED if the key was used there for another request."""
    key = request.idempotency_key
    if not key:
        return None
    earlier = await idempotency.recall(conn, f"{scope}:{actor.get()}", key, _digest(request))
    return answer_type.FromString(base64.b64decode(earlier["answer"])) if earlier else None


def _digest(request: Any) -> bytes:
    """What identifies a request's payload: its call and fields, its key left out."""
    payload = type(request)()
    payload.CopyFrom(request)
    payload.idempotency_key = ""
    call = payload.DESCRIPTOR.full_name.encode()
    return hashlib.sha256(call + b"\0" + payload.SerializeToString(deterministic=True)).digest()
