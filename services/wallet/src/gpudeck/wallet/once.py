"""Keyed gRPC answers: with an idempotency key, a call's answer is kept and a retry gets it back
without acting again (the calls whose rows have no lock every caller takes: account changes and
settings; transfers and holds keep their keys under the wallet lock, in ledger_store)."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from google.protobuf.message import Message
from psycopg import AsyncConnection

from gpudeck.kit.logs import actor
from gpudeck.wallet import idempotency
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
    is one request whatever the call: another request with it, of this call or another one
    (the request's type is part of its fingerprint), is ABORTED. The field `secret` of the
    answer is not kept (a retry gets it empty)."""
    key = check_text(request.idempotency_key, "idempotency_key")
    if not key:
        return await act()
    scope = f"{scope}:{actor.get()}"
    # Serializes the calls with this key (the scopes here have no row every caller locks).
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (f"{scope} {key}",))
    payload = type(request)()
    payload.CopyFrom(request)
    payload.idempotency_key = ""
    call = payload.DESCRIPTOR.full_name.encode()
    digest = hashlib.sha256(call + b"\0" + payload.SerializeToString(deterministic=True)).digest()
    earlier = await idempotency.recall(conn, scope, key, digest)
    if earlier is not None:
        return answer_type.FromString(base64.b64decode(earlier["answer"]))
    answer = await act()
    kept = answer_type()
    kept.CopyFrom(answer)
    if secret:
        kept.ClearField(secret)
    stored = {"answer": base64.b64encode(kept.SerializeToString()).decode()}
    await idempotency.remember(conn, scope, key, digest, stored)
    return answer
