"""Calls that set a value take an optional idempotency key, over the real gRPC server: a retry
with the key gets the first answer and changes nothing, so a late retry cannot undo a newer
change; the key with another request is ABORTED."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from psycopg_pool import AsyncConnectionPool

from gpudeck.proto.wallet.v1 import account_pb2 as apb
from gpudeck.proto.wallet.v1 import wallet_pb2 as wpb
from gpudeck.proto.wallet.v1.account_pb2_grpc import AccountServiceStub
from gpudeck.proto.wallet.v1.wallet_pb2_grpc import WalletServiceStub

USD = 1_000_000


@dataclass
class Stubs:
    accounts: AccountServiceStub
    wallet: WalletServiceStub


@dataclass
class Setting:
    """One settable value of a fresh organization: `set(value, key)` calls the RPC (its answer),
    `read()` reads the value now."""

    set: Callable[[str, str], Awaitable[Any]]
    read: Callable[[], Awaitable[str]]


async def _organization(stubs: Stubs) -> apb.CreateOrganizationResponse:
    request = apb.CreateOrganizationRequest(
        name="Keyed", currency="USD", owner_email=f"{uuid.uuid4().hex[:10]}@example.com"
    )
    made: apb.CreateOrganizationResponse = await stubs.accounts.CreateOrganization(request)
    return made


async def organization_name(stubs: Stubs) -> Setting:
    org = (await _organization(stubs)).organization.id
    a = stubs.accounts

    async def read() -> str:
        found = await a.GetOrganization(apb.GetOrganizationRequest(organization_id=org))
        return str(found.name)

    return Setting(
        lambda v, k: a.UpdateOrganization(
            apb.UpdateOrganizationRequest(organization_id=org, name=v, idempotency_key=k)
        ),
        read,
    )


async def kyc_status(stubs: Stubs) -> Setting:
    org = (await _organization(stubs)).organization.id
    a = stubs.accounts

    async def read() -> str:
        found = await a.GetOrganization(apb.GetOrganizationRequest(organization_id=org))
        return str(found.kyc_status)

    return Setting(
        lambda v, k: a.SetKycStatus(
            apb.SetKycStatusRequest(organization_id=org, kyc_status=v, idempotency_key=k)
        ),
        read,
    )


async def member_role(stubs: Stubs) -> Setting:
    org = (await _organization(stubs)).organization.id
    a = stubs.accounts
    invited = await a.InviteMember(
        apb.InviteMemberRequest(organization_id=org, email="m@example.com", role="viewer")
    )
    user = invited.user.id

    async def read() -> str:
        listed = await a.ListMembers(apb.ListMembersRequest(organization_id=org))
        return next(str(m.role) for m in listed.members if m.user.id == user)

    return Setting(
        lambda v, k: a.SetMemberRole(
            apb.SetMemberRoleRequest(organization_id=org, user_id=user, role=v, idempotency_key=k)
        ),
        read,
    )


async def project_name(stubs: Stubs) -> Setting:
    org = (await _organization(stubs)).organization.id
    a = stubs.accounts
    listed = await a.ListProjects(apb.ListProjectsRequest(organization_id=org))
    project = listed.projects[0].id

    async def read() -> str:
        return str((await a.GetProject(apb.GetProjectRequest(project_id=project))).name)

    return Setting(
        lambda v, k: a.RenameProject(
            apb.RenameProjectRequest(project_id=project, name=v, idempotency_key=k)
        ),
        read,
    )


async def token_name(stubs: Stubs) -> Setting:
    made = await _organization(stubs)
    org, token = made.organization.id, made.owner_api_token.id
    a = stubs.accounts

    async def read() -> str:
        listed = await a.ListApiTokens(apb.ListApiTokensRequest(organization_id=org))
        return next(str(t.name) for t in listed.api_tokens if t.id == token)

    return Setting(
        lambda v, k: a.RenameApiToken(
            apb.RenameApiTokenRequest(
                organization_id=org, api_token_id=token, name=v, idempotency_key=k
            )
        ),
        read,
    )


async def theme(stubs: Stubs) -> Setting:
    made = await _organization(stubs)
    org, owner = made.organization.id, made.organization.owner.id
    a = stubs.accounts

    async def read() -> str:
        found = await a.GetPreferences(
            apb.GetPreferencesRequest(organization_id=org, user_id=owner)
        )
        return str(found.theme)

    return Setting(
        lambda v, k: a.UpdatePreferences(
            apb.UpdatePreferencesRequest(
                preferences=apb.Preferences(organization_id=org, user_id=owner, theme=v),
                fields=["theme"],
                idempotency_key=k,
            )
        ),
        read,
    )


async def warning_amount(stubs: Stubs) -> Setting:
    org = (await _organization(stubs)).organization.id
    w = stubs.wallet

    async def read() -> str:
        found = await w.GetThresholds(wpb.GetThresholdsRequest(organization_id=org))
        return str(found.warning_amount // USD)

    return Setting(
        lambda v, k: w.SetThresholds(
            wpb.SetThresholdsRequest(
                organization_id=org,
                warning_amount=int(v) * USD,
                fields=["warning_amount"],
                idempotency_key=k,
            )
        ),
        read,
    )


async def auto_topup_amount(stubs: Stubs) -> Setting:
    org = (await _organization(stubs)).organization.id
    w = stubs.wallet

    async def read() -> str:
        found = await w.GetAutoTopUp(wpb.GetAutoTopUpRequest(organization_id=org))
        return str(found.amount // USD)

    return Setting(
        lambda v, k: w.SetAutoTopUp(
            wpb.SetAutoTopUpRequest(
                organization_id=org,
                enabled=False,
                below=USD,
                amount=int(v) * USD,
                idempotency_key=k,
            )
        ),
        read,
    )


# Each setting with three values: first (set with the key), newer (set without), other (the key
# with another request).
CASES = {
    "organization name": (organization_name, "First", "Newer", "Other"),
    "KYC status": (kyc_status, "pending", "verified", "unverified"),
    "member role": (member_role, "admin", "billing", "member"),
    "project name": (project_name, "first", "newer", "other"),
    "token name": (token_name, "first", "newer", "other"),
    "preferences": (theme, "dark", "light", "system"),
    "low-balance threshold": (warning_amount, "5", "7", "9"),
    "auto top-up rule": (auto_topup_amount, "5", "7", "9"),
}


@pytest.fixture
def stubs(account_stub: AccountServiceStub, wallet_stub: WalletServiceStub) -> Stubs:
    return Stubs(account_stub, wallet_stub)


@pytest.mark.parametrize("case", list(CASES))
async def test_a_late_keyed_retry_gets_the_first_answer_and_keeps_the_newer_value(
    stubs: Stubs, case: str
) -> None:
    make, first, newer, other = CASES[case]
    setting = await make(stubs)
    answer = await setting.set(first, "set-1")
    assert await setting.read() == first
    await setting.set(newer, "")  # a newer change, say from another tab
    assert await setting.set(first, "set-1") == answer  # the late retry of the first call
    assert await setting.read() == newer, "a retry must not undo the newer change"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await setting.set(other, "set-1")
    assert err.value.code() == grpc.StatusCode.ABORTED
    assert "idempotency_key" in (err.value.details() or "")
    assert await setting.read() == newer


async def test_a_keyed_revocation_answers_its_retry_with_the_first_answer(stubs: Stubs) -> None:
    made = await _organization(stubs)
    org = made.organization.id
    extra = await stubs.accounts.CreateApiToken(
        apb.CreateApiTokenRequest(organization_id=org, name="ci", role="member")
    )
    request = apb.RevokeApiTokenRequest(
        organization_id=org, api_token_id=extra.api_token.id, idempotency_key="revoke-1"
    )
    first = await stubs.accounts.RevokeApiToken(request)
    assert first.HasField("revoked_at")
    assert await stubs.accounts.RevokeApiToken(request) == first
    another = apb.RevokeApiTokenRequest(
        organization_id=org, api_token_id=made.owner_api_token.id, idempotency_key="revoke-1"
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs.accounts.RevokeApiToken(another)
    assert err.value.code() == grpc.StatusCode.ABORTED
    owner = await stubs.accounts.Authenticate(apb.AuthenticateRequest(token=made.owner_token))
    assert owner.organization_id == org, "the refused call revoked nothing"


async def test_a_keyed_exchange_rate_is_stored_once(
    stubs: Stubs, wallet_pool: AsyncConnectionPool
) -> None:
    as_of = Timestamp()
    as_of.FromDatetime(datetime(2001, 2, 3, 4, 5, 6, tzinfo=UTC))  # history: today's rate stays
    request = wpb.SetExchangeRateRequest(
        base="USD", quote="INR", rate="48.25", as_of=as_of, idempotency_key=uuid.uuid4().hex
    )
    first = await stubs.wallet.SetExchangeRate(request)
    assert await stubs.wallet.SetExchangeRate(request) == first
    # The pair spelled otherwise is the same request; another pair is another (it set both).
    spelled = wpb.SetExchangeRateRequest()
    spelled.CopyFrom(request)
    spelled.base, spelled.quote = "usd", " inr"
    assert await stubs.wallet.SetExchangeRate(spelled) == first
    request.rate = "48.5"
    inverse = wpb.SetExchangeRateRequest()
    inverse.CopyFrom(request)
    inverse.base, inverse.quote, inverse.rate = "INR", "USD", "0.02"
    for other in (request, inverse):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stubs.wallet.SetExchangeRate(other)
        assert err.value.code() == grpc.StatusCode.ABORTED
    async with wallet_pool.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM exchange_rates WHERE as_of = %s", (as_of.ToDatetime(UTC),)
        )
        assert await cur.fetchone() == (1,)


async def test_thresholds_left_out_of_fields_keep_their_values(stubs: Stubs) -> None:
    org = (await _organization(stubs)).organization.id
    w = stubs.wallet
    await w.SetThresholds(
        wpb.SetThresholdsRequest(organization_id=org, warning_amount=9 * USD, critical_hours=2.0)
    )
    changed = await w.SetThresholds(
        wpb.SetThresholdsRequest(
            organization_id=org, critical_amount=3 * USD, fields=["critical_amount"]
        )
    )
    assert (changed.warning_amount, changed.critical_amount, changed.critical_hours) == (
        9 * USD, 3 * USD, 2.0,
    )  # fmt: skip
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await w.SetThresholds(
            wpb.SetThresholdsRequest(organization_id=org, critical_amount=10 * USD,
                                     fields=["critical_amount"])
        )  # fmt: skip
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # above the kept warning
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await w.SetThresholds(wpb.SetThresholdsRequest(organization_id=org, fields=["warning"]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "fields" in (err.value.details() or "")


async def test_a_rate_answered_under_the_old_per_pair_keys_is_answered_again_not_stored_again(
    stubs: Stubs, wallet_pool: AsyncConnectionPool
) -> None:
    """Rate keys were kept per pair as sent; a retry after the change looked in the new scope
    only and stored the rate a second time, dated now: it could outdate a newer rate."""
    from gpudeck.wallet import read_convert
    from gpudeck.wallet import readmodels_store as store
    from gpudeck.wallet.once import once
    from gpudeck.wallet.rates import NewRate, parse_rate

    as_of = Timestamp()
    as_of.FromDatetime(datetime(2001, 3, 4, 5, 6, 7, tzinfo=UTC))
    request = wpb.SetExchangeRateRequest(
        base="usd", quote="inr", rate="47.5", as_of=as_of, idempotency_key=uuid.uuid4().hex
    )
    async with wallet_pool.connection() as conn, conn.transaction():  # as the old code kept it
        new = NewRate("USD", "INR", parse_rate("47.5"), as_of.ToDatetime(UTC), "test")

        async def add() -> wpb.ExchangeRate:
            return read_convert.exchange_rate(await store.add_rate(conn, new))

        first = await once(conn, "rate:usd:inr", request, wpb.ExchangeRate, add)
    assert await stubs.wallet.SetExchangeRate(request) == first
    async with wallet_pool.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM exchange_rates WHERE as_of = %s", (as_of.ToDatetime(UTC),)
        )
        assert await cur.fetchone() == (1,)
