"""The wallet as resolvers see it: its two gRPC services called for one actor, and DataLoaders.

`WalletClient` sends `x-actor` (who the call is for) on every call. `Loaders` are made fresh for
each operation (and each subscription event): within one, the same read is made once however
many fields need it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import TypeVar

import grpc
from strawberry.dataloader import DataLoader

from gpudeck.proto.wallet.v1 import account_pb2, account_pb2_grpc, wallet_pb2, wallet_pb2_grpc

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")

OrgKey = tuple[str, str]  # (organization id, display currency or "")


class WalletClient:
    """AccountService and WalletService over the gateway's channel to the wallet."""

    def __init__(self, channel: grpc.aio.Channel, *, actor: str = "") -> None:
        self.accounts = account_pb2_grpc.AccountServiceStub(channel)
        self.wallet = wallet_pb2_grpc.WalletServiceStub(channel)
        self.actor = actor
        self.metadata: tuple[tuple[str, str], ...] = (("x-actor", actor),) if actor else ()


def _each(
    fetch: Callable[[K], Awaitable[T]],
) -> Callable[[list[K]], Awaitable[Sequence[T | BaseException]]]:
    """A DataLoader batch function for an API without batch calls: one call per distinct key,
    all at once; a failure belongs to its own key only."""

    async def load(keys: list[K]) -> Sequence[T | BaseException]:
        results = await asyncio.gather(*(fetch(k) for k in keys), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, Exception):
                raise result  # cancellation and the like are not a key's answer
        return results

    return load


class Loaders:
    """The wallet reads one operation may need more than once, each made once per key."""

    def __init__(self, client: Callable[[], WalletClient]) -> None:
        self._client = client
        self.organization = DataLoader(_each(self._organization))
        self.summary = DataLoader(_each(self._summary))
        self.expenditure = DataLoader(_each(self._expenditure))
        self.plan = DataLoader(_each(self._plan))
        self.invoices = DataLoader(_each(self._invoices))
        self.members = DataLoader(_each(self._members))
        self.api_tokens = DataLoader(_each(self._api_tokens))
        self.thresholds = DataLoader(_each(self._thresholds))

    async def _organization(self, org: str) -> account_pb2.Organization:
        c = self._client()
        request = account_pb2.GetOrganizationRequest(organization_id=org)
        return await c.accounts.GetOrganization(request, metadata=c.metadata)

    async def _summary(self, key: OrgKey) -> wallet_pb2.WalletSummary:
        c = self._client()
        request = wallet_pb2.GetWalletSummaryRequest(
            organization_id=key[0], display_currency=key[1]
        )
        return await c.wallet.GetWalletSummary(request, metadata=c.metadata)

    async def _expenditure(self, key: OrgKey) -> wallet_pb2.Expenditure:
        c = self._client()
        request = wallet_pb2.GetExpenditureRequest(organization_id=key[0], display_currency=key[1])
        return await c.wallet.GetExpenditure(request, metadata=c.metadata)

    async def _plan(self, org: str) -> wallet_pb2.PlanStatus:
        c = self._client()
        request = wallet_pb2.GetPlanRequest(organization_id=org)
        return await c.wallet.GetPlan(request, metadata=c.metadata)

    async def _invoices(self, key: tuple[str, int]) -> wallet_pb2.ListInvoicesResponse:
        c = self._client()
        request = wallet_pb2.ListInvoicesRequest(organization_id=key[0], limit=key[1])
        return await c.wallet.ListInvoices(request, metadata=c.metadata)

    async def _members(self, org: str) -> list[account_pb2.Member]:
        c = self._client()
        request = account_pb2.ListMembersRequest(organization_id=org)
        return list((await c.accounts.ListMembers(request, metadata=c.metadata)).members)

    async def _api_tokens(self, org: str) -> list[account_pb2.ApiToken]:
        c = self._client()
        request = account_pb2.ListApiTokensRequest(organization_id=org)
        return list((await c.accounts.ListApiTokens(request, metadata=c.metadata)).api_tokens)

    async def _thresholds(self, org: str) -> wallet_pb2.Thresholds:
        c = self._client()
        request = wallet_pb2.GetThresholdsRequest(organization_id=org)
        return await c.wallet.GetThresholds(request, metadata=c.metadata)
