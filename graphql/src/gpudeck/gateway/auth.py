"""Who is calling: the bearer token of a request, and the identity the wallet gives it.

Every GraphQL field but `health` needs an identity (introspection too: see introspection.py). The token comes from
`Authorization: Bearer <token>` on HTTP, or from the websocket's `connection_init` payload
(`{"Authorization": "Bearer <token>"}`, `authorization` too; the handshake's header otherwise).
The wallet's AccountService.Authenticate says who it is; answers are kept in memory for a few
seconds per token (TTL_SECONDS, NEGATIVE_TTL_SECONDS), so a revoked or expired token stops
working within seconds, and concurrent requests with the same token share one call.

Roles, from most to least powerful: owner > admin > billing > member > viewer. The platform's
operators may have one more token, GPUDECK_ADMIN_TOKEN (no organization; exchange rates).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import grpc

from gpudeck.gateway.backends import Backends
from gpudeck.gateway.errors import UNAUTHENTICATED, UNAVAILABLE, GatewayError, rpc_details
from gpudeck.kit.config import MAX_TOKEN_LENGTH, printable_ascii
from gpudeck.proto.wallet.v1 import account_pb2, account_pb2_grpc

log = logging.getLogger(__name__)

ROLES = ("owner", "admin", "billing", "member", "viewer")
RANK = {role: len(ROLES) - i for i, role in enumerate(ROLES)}  # owner 5 … viewer 1
TTL_SECONDS = 4.0
NEGATIVE_TTL_SECONDS = 1.0
MAX_ENTRIES = 10_000
AUTH_TIMEOUT = 2.0
WALLET = "wallet"


def rank(role: str) -> int:
    """How powerful `role` is (0 for an unknown one)."""
    return RANK.get(role, 0)


@dataclass(frozen=True)
class OrganizationRole:
    organization_id: str
    name: str
    role: str


@dataclass(frozen=True)
class Identity:
    """A token's identity: it acts in `organization_id` only, with `role`."""

    token_id: str
    organization_id: str
    role: str
    user_id: str
    email: str
    organizations: tuple[OrganizationRole, ...]
    expires_at: datetime | None = None
    platform_admin: bool = False  # GPUDECK_ADMIN_TOKEN: the operators, in no organization

    @property
    def actor(self) -> str:
        """What the services record as the cause of a change (gRPC metadata `x-actor`)."""
        return "platform-admin" if self.platform_admin else f"token:{self.token_id}"

    @classmethod
    def from_pb(cls, m: account_pb2.Identity) -> Identity:
        return cls(
            token_id=m.token_id,
            organization_id=m.organization_id,
            role=m.role,
            user_id=m.user_id,
            email=m.email,
            organizations=tuple(
                OrganizationRole(o.organization_id, o.name, o.role) for o in m.organizations
            ),
            expires_at=m.expires_at.ToDatetime(UTC) if m.HasField("expires_at") else None,
        )


def bearer(value: str | None) -> str | None:
    """The token of an `Authorization` value; None when there is none. A value that is not
    `Bearer <token>` is refused with UNAUTHENTICATED."""
    if value is None or not value.strip():
        return None
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise GatewayError("Authorization must be 'Bearer <token>'", code=UNAUTHENTICATED)
    return token


def token_from(headers: Mapping[str, str], params: Mapping[str, object] | None) -> str | None:
    """The bearer token of a request: the websocket's connection_init payload first, then the
    `Authorization` header."""
    if params:
        for key in ("Authorization", "authorization"):
            value = params.get(key)
            if isinstance(value, str):
                return bearer(value)
    return bearer(headers.get("Authorization"))


@dataclass
class _Entry:
    expires: float  # monotonic
    identity: Identity | None = None
    refusal: str = ""


# The identity of GPUDECK_ADMIN_TOKEN: no organization (every organization's fields are
# NOT_FOUND to it, as to any other outsider); it may do what only operators may (exchange rates).
PLATFORM_ADMIN = Identity(
    token_id="platform-admin",
    organization_id="",
    role="viewer",
    user_id="",
    email="",
    organizations=(),
    platform_admin=True,
)


class Authenticator:
    """Tokens → identities through the wallet, with a small in-process TTL cache.

    A known token is kept TTL_SECONDS (never past its own expiry); an unknown, revoked or
    expired one NEGATIVE_TTL_SECONDS. `forget(token_id)` drops a token at once (this gateway
    revoked it), `forget_members` a member's or an organization's tokens. Failures of the wallet itself are not cached.
    """

    def __init__(
        self,
        backends: Backends,
        *,
        ttl: float = TTL_SECONDS,
        negative_ttl: float = NEGATIVE_TTL_SECONDS,
        max_entries: int = MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
        admin_token: str = "",
    ) -> None:
        self.backends = backends
        self.admin_token = admin_token
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.max_entries = max_entries
        self.clock = clock
        self._entries: dict[bytes, _Entry] = {}
        self._token_keys: dict[str, bytes] = {}
        self._pending: dict[bytes, asyncio.Task[_Entry]] = {}
        self._forgets = 0  # forget() calls so far: a lookup begun before one is not kept

    async def authenticate(self, token: str | None) -> Identity:
        """The identity of `token`; GatewayError(UNAUTHENTICATED) when it has none."""
        if not token:
            raise GatewayError(
                "authentication required: send 'Authorization: Bearer <token>'",
                code=UNAUTHENTICATED,
            )
        # Every token is printable ASCII; bytes that are not UTF-8 reach here as surrogates
        # (which no hash takes: INTERNAL, and a socket acknowledged with one).
        if len(token) > MAX_TOKEN_LENGTH or not printable_ascii(token):
            raise GatewayError("unknown token", code=UNAUTHENTICATED)
        if self.admin_token and hmac.compare_digest(token.encode(), self.admin_token.encode()):
            return PLATFORM_ADMIN
        key = hashlib.sha256(token.encode()).digest()
        entry = self._entries.get(key)
        if entry is None or entry.expires <= self.clock():
            entry = await self._lookup(key, token)
        if entry.identity is None:
            raise GatewayError(entry.refusal, code=UNAUTHENTICATED)
        return entry.identity

    def forget(self, token_id: str) -> None:
        """Drop what is cached for the token `token_id` (e.g. it was just revoked here). A
        lookup already under way may have read it still valid: its answer goes to those waiting
        for it but is not kept, and later callers ask again."""
        key = self._token_keys.pop(token_id, None)
        if key is not None:
            self._entries.pop(key, None)
        self._forgets += 1
        self._pending.clear()

    def forget_members(self, organization_id: str, user_id: str = "") -> None:
        """Drop what is cached for the tokens of `organization_id` (of `user_id` only, when
        given): this gateway changed their role, removed them, or deleted the organization,
        which revokes such tokens."""
        for key, entry in list(self._entries.items()):
            identity = entry.identity
            if (
                identity is not None
                and identity.organization_id == organization_id
                and (not user_id or identity.user_id == user_id)
            ):
                del self._entries[key]
                self._token_keys.pop(identity.token_id, None)
        self._forgets += 1
        self._pending.clear()

    async def _lookup(self, key: bytes, token: str) -> _Entry:
        """One call to the wallet per token at a time, in a task of its own, so a caller that
        goes away does not fail the others waiting for the same answer."""
        task = self._pending.get(key)
        if task is None:
            task = asyncio.create_task(self._ask(token))
            self._pending[key] = task
            begun = self._forgets
            task.add_done_callback(lambda done: self._settle(key, done, begun))
        return await asyncio.shield(task)

    def _settle(self, key: bytes, task: asyncio.Task[_Entry], begun: int) -> None:
        if self._pending.get(key) is task:
            del self._pending[key]
        if begun == self._forgets and not task.cancelled() and task.exception() is None:
            self._store(key, task.result())

    async def _ask(self, token: str) -> _Entry:
        stub = account_pb2_grpc.AccountServiceStub(self.backends.channel(WALLET))
        try:
            answer = await stub.Authenticate(
                account_pb2.AuthenticateRequest(token=token), timeout=AUTH_TIMEOUT
            )
        except grpc.aio.AioRpcError as exc:
            # The wallet names the field `token` when it refuses the token itself; without it
            # the refusal is of the gateway's own service token: a setup error, not the caller's.
            if exc.code() != grpc.StatusCode.UNAUTHENTICATED:
                raise
            if "field" in rpc_details(exc):
                return _Entry(self.clock() + self.negative_ttl, refusal=exc.details() or "")
            log.error("the wallet refuses the gateway's service token: %s", exc.details())
            raise GatewayError(
                "callers cannot be authenticated right now", code=UNAVAILABLE
            ) from None
        identity = Identity.from_pb(answer)
        expires = self.clock() + self.ttl
        if identity.expires_at is not None:
            left = (identity.expires_at - datetime.now(UTC)).total_seconds()
            expires = min(expires, self.clock() + max(left, 0.0))
        return _Entry(expires, identity=identity)

    def _store(self, key: bytes, entry: _Entry) -> None:
        if len(self._entries) >= self.max_entries:
            now = self.clock()
            for stale in [k for k, e in self._entries.items() if e.expires <= now]:
                del self._entries[stale]
            while len(self._entries) >= self.max_entries:
                del self._entries[next(iter(self._entries))]
            self._token_keys = {t: k for t, k in self._token_keys.items() if k in self._entries}
        self._entries[key] = entry
        if entry.identity is not None:
            self._token_keys[entry.identity.token_id] = key
