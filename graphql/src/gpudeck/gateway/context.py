"""What every resolver gets as `info.context`: the request, the caller, the wallet, DataLoaders.

The view builds one per HTTP request or websocket; the `PerOperation` schema extension gives
each operation its own copy (`for_operation`), so an operation authenticates once and its
DataLoaders never outlive it, even on a websocket that runs many. Subscriptions make fresh
DataLoaders per event (`fresh_loaders`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import strawberry
from aiohttp import web
from graphql.pyutils import Path
from strawberry.extensions import SchemaExtension

from gpudeck.gateway.auth import Authenticator, Identity, token_from
from gpudeck.gateway.backends import Backends
from gpudeck.gateway.live import LiveEvents
from gpudeck.gateway.walletclient import Loaders, WalletClient

WALLET = "wallet"


@dataclass
class Context:
    """The request (for a websocket: the handshake), its response, the service channels, how
    callers are authenticated, and the live events (None: this gateway has no NATS)."""

    request: web.Request
    response: web.StreamResponse
    backends: Backends
    auth: Authenticator
    live: LiveEvents | None = None
    connection_params: dict[str, Any] | None = None  # a websocket's connection_init payload
    connection_acknowledged: bool = False  # a websocket's connection_init was taken
    _identity: Identity | None = field(default=None, repr=False)
    # Identities the operation gained in other organizations (createOrganization's new one),
    # by (root field's response key, organization id): see `grant`.
    _grants: dict[tuple[str, str], Identity] = field(default_factory=dict, repr=False)
    _client: WalletClient | None = field(default=None, repr=False)
    loaders: Loaders = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.loaders = Loaders(lambda: self.wallet)

    def for_operation(self) -> Context:
        """A copy for one operation: same request and connection, nobody authenticated yet,
        fresh DataLoaders."""
        return dataclasses.replace(self, _identity=None, _grants={}, _client=None)

    def fresh_loaders(self) -> Loaders:
        """New DataLoaders (e.g. for each event of a subscription), also used from now on."""
        self.loaders = Loaders(lambda: self.wallet)
        return self.loaders

    @property
    def token(self) -> str | None:
        return token_from(self.request.headers, self.connection_params)

    async def identity(self) -> Identity:
        """The caller; GatewayError(UNAUTHENTICATED) without a valid token. Asked once per
        operation (and the authenticator caches across operations for a few seconds)."""
        if self._identity is None:
            self._identity = await self.auth.authenticate(self.token)
        return self._identity

    @property
    def authenticated(self) -> bool:
        """Whether this operation has shown who the caller is (a field needed it and the token
        was valid): `health` alone never asks."""
        return self._identity is not None

    async def identity_in(self, organization_id: str | None, info: Info) -> Identity:
        """Who the caller is in `organization_id` at the field `info` resolves: the identity
        granted there to the root field this field is under (see `grant`), else the caller's
        own."""
        granted = self._grants.get((root_key(info.path), organization_id or ""))
        return granted if granted is not None else await self.identity()

    def grant(self, identity: Identity, info: Info) -> None:
        """Let the root field `info` resolves act as `identity` in its organization, within its
        own selection only: the owner of an organization createOrganization just made, so its
        payload can show the new one. Later root fields of the same document (`createApiToken`
        in the new organization, say) still act as the caller's own token: a retry must not
        hand the caller an owner's powers its token never had."""
        self._grants[(root_key(info.path), identity.organization_id)] = identity

    def forget_identity(self) -> None:
        """Who the caller is, to be asked again (a new connection_init brings a new token)."""
        self._identity = None

    async def reauthenticate(self) -> Identity:
        """The caller again, through the authenticator's short cache: for long subscriptions,
        so a revoked token stops them within seconds."""
        self._identity = await self.auth.authenticate(self.token)
        return self._identity

    @property
    def wallet(self) -> WalletClient:
        """The wallet, called for the authenticated caller (`x-actor`)."""
        actor = self._identity.actor if self._identity is not None else ""
        if self._client is None or self._client.actor != actor:
            self._client = WalletClient(self.backends.channel(WALLET), actor=actor)
        return self._client


def root_key(path: Path) -> str:
    """The response key (alias or name) of the root field `path` is under."""
    while path.prev is not None:
        path = path.prev
    return str(path.key)


class PerOperation(SchemaExtension):
    """Gives each operation its own copy of the context (see `Context.for_operation`)."""

    def on_operation(self) -> Iterator[None]:
        context = self.execution_context.context
        if isinstance(context, Context):
            self.execution_context.context = context.for_operation()
        yield


Info = strawberry.Info[Context, None]
