"""The Organization: the card's own fields, and one field per domain (wallet, spending, billing,
plan, usage, projects, members, tokens, preferences), each resolved by its domain's module;
`organization(id, displayCurrency)` and `createOrganization`.

Fields of billing data need the owner, admin or billing role; the rest any member. With
`displayCurrency` the amounts of the cards (wallet, spending, billing, plan, usage) are shown in
that currency, and each card's `conversion` says which exchange rate it used.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Annotated

import strawberry

from gpudeck.gateway.auth import OrganizationRole
from gpudeck.gateway.context import Info
from gpudeck.gateway.errors import (
    BAD_USER_INPUT,
    FORBIDDEN,
    Arguments,
    GatewayError,
    from_rpc,
)
from gpudeck.gateway.money import parse_currency
from gpudeck.gateway.permissions import (
    Admin,
    BillingReader,
    Member,
    PlatformAdmin,
    Writer,
    require,
)
from gpudeck.gateway.types import account as accounts
from gpudeck.gateway.types import billing as bills
from gpudeck.gateway.types import usage as usages
from gpudeck.gateway.types import wallet as wallets
from gpudeck.gateway.types.common import Conversion, OptionalKey, when
from gpudeck.proto.wallet.v1 import account_pb2


async def resolve_wallet(root: Organization, info: Info) -> wallets.Wallet | None:
    return await wallets.load_wallet(info, root.organization_id, root.display_currency)


async def resolve_expenditure(root: Organization, info: Info) -> bills.Expenditure | None:
    return await bills.load_expenditure(info, root.organization_id, root.display_currency)


async def resolve_spending_trend(
    root: Organization, info: Info, days: int
) -> list[bills.DaySpend] | None:
    if days < 1:
        raise GatewayError(
            f"days must be at least 1, got {days}", code=BAD_USER_INPUT, field="days"
        )
    return await bills.spending_trend(info, root.organization_id, days, root.display_currency)


async def resolve_monthly_breakdown(
    root: Organization, info: Info, months: int = 6
) -> list[bills.MonthSpend] | None:
    if months < 1:
        raise GatewayError(
            f"months must be at least 1, got {months}", code=BAD_USER_INPUT, field="months"
        )
    return await bills.monthly_breakdown(info, root.organization_id, months, root.display_currency)


async def resolve_resource_costs(
    root: Organization, info: Info, first: int | None = None, resource_ids: list[str] | None = None
) -> bills.ResourceCosts | None:
    return await bills.resource_costs(
        info, root.organization_id, first, resource_ids, root.display_currency
    )


async def resolve_billing(root: Organization, info: Info) -> bills.Billing | None:
    return await bills.load_billing(info, root.organization_id, root.display_currency)


async def resolve_plan(root: Organization, info: Info) -> bills.Plan | None:
    return await bills.load_plan(info, root.organization_id, root.display_currency)


async def resolve_available_plans(root: Organization, info: Info) -> list[bills.PlanOption] | None:
    return await bills.list_plans(info, root.organization_id, root.display_currency)


async def resolve_usage(
    root: Organization, info: Info, top: int = 5, recent: int = 20, meter: str | None = None
) -> usages.Usage | None:
    return await usages.load_usage(
        info, root.organization_id, root.display_currency, top=top, recent=recent, meter=meter
    )


async def resolve_transactions(
    root: Organization,
    info: Info,
    first: int | None = 20,
    before: strawberry.ID | None = None,
    kinds: list[wallets.TransactionKind] | None = None,
) -> list[wallets.Transaction] | None:
    return await wallets.list_transactions(
        info, root.organization_id, first, str(before) if before else None, kinds
    )


async def resolve_transaction(
    root: Organization, info: Info, id: strawberry.ID
) -> wallets.Transaction | None:
    return await wallets.load_transaction(info, root.organization_id, str(id))


async def resolve_holds(
    root: Organization, info: Info, first: int | None = 50
) -> list[wallets.Hold] | None:
    return await wallets.list_holds(info, root.organization_id, first)


async def resolve_meters(
    root: Organization, info: Info, first: int | None = 100, open_only: bool = True
) -> list[wallets.Meter] | None:
    return await wallets.list_meters(info, root.organization_id, first, open_only)


async def resolve_service_status(root: Organization, info: Info) -> str | None:
    return await wallets.load_service_status(info, root.organization_id)


async def resolve_auto_top_up(root: Organization, info: Info) -> wallets.AutoTopUp | None:
    return await wallets.load_auto_topup(info, root.organization_id)


async def resolve_thresholds(root: Organization, info: Info) -> wallets.Thresholds | None:
    return await wallets.load_thresholds(info, root.organization_id)


async def resolve_conversion(root: Organization, info: Info) -> Conversion | None:
    if not root.display_currency:
        return None
    summary = await info.context.loaders.summary.load((root.organization_id, root.display_currency))
    return Conversion.from_pb(summary.conversion) if summary.HasField("conversion") else None


async def resolve_projects(
    root: Organization, info: Info, first: int | None = None
) -> list[accounts.Project] | None:
    return await accounts.list_projects(info, root.organization_id, first)


async def resolve_members(
    root: Organization, info: Info
) -> list[accounts.OrganizationMember] | None:
    return await accounts.list_members(info, root.organization_id)


async def resolve_api_tokens(root: Organization, info: Info) -> list[accounts.ApiToken] | None:
    return await accounts.list_api_tokens(info, root.organization_id)


async def resolve_preferences(root: Organization, info: Info) -> accounts.Preferences | None:
    return await accounts.load_preferences(info, root.organization_id)


@strawberry.type(
    description=(
        "An organization: the card (name, owner, created, team size, wallet currency, KYC "
        "status, plan) and everything it holds."
    )
)
class Organization:
    id: strawberry.ID
    name: str
    created_at: datetime | None
    team_size: int
    owner: accounts.User
    currency: str = strawberry.field(description="The wallet's currency: INR or USD.")
    kyc_status: str = strawberry.field(description="unverified, pending or verified")
    plan_code: str
    display_currency: strawberry.Private[str]

    @property
    def organization_id(self) -> str:
        return str(self.id)

    @classmethod
    def from_pb(cls, m: account_pb2.Organization, display: str = "") -> Organization:
        return cls(
            id=strawberry.ID(m.id),
            name=m.name,
            created_at=when(m.created_at, m.HasField("created_at")),
            team_size=m.team_size,
            owner=accounts.User.from_pb(m.owner),
            currency=m.currency,
            kyc_status=m.kyc_status,
            plan_code=m.plan_code,
            display_currency=display,
        )

    # ------------------------------------------------------------------ billing data

    wallet = strawberry.field(
        resolver=resolve_wallet, description="The wallet card.", extensions=require(BillingReader())
    )

    expenditure = strawberry.field(
        resolver=resolve_expenditure, extensions=require(BillingReader())
    )

    spending_trend = strawberry.field(
        resolver=resolve_spending_trend,
        description="Spending per day for the last `days` days (up to today), oldest first.",
        extensions=require(BillingReader()),
    )

    monthly_breakdown = strawberry.field(
        resolver=resolve_monthly_breakdown,
        description="Spending per calendar month for the last `months` months, oldest first.",
        extensions=require(BillingReader()),
    )

    resource_costs = strawberry.field(
        resolver=resolve_resource_costs,
        description=(
            "Total cost per resource since it was created (or only `resourceIds`), most "
            "recently charged first; `first` at most 1000 (default 100)."
        ),
        extensions=require(BillingReader()),
    )

    billing = strawberry.field(
        resolver=resolve_billing,
        description="The billing card.",
        extensions=require(BillingReader()),
    )

    plan = strawberry.field(
        resolver=resolve_plan, description="The plan card.", extensions=require(BillingReader())
    )

    available_plans = strawberry.field(
        resolver=resolve_available_plans,
        description="The plans this organization may change to.",
        extensions=require(BillingReader()),
    )

    usage = strawberry.field(
        resolver=resolve_usage,
        description="Usage analytics; `meter` limits it to one meter (e.g. tokens).",
        extensions=require(BillingReader()),
    )

    transactions = strawberry.field(
        resolver=resolve_transactions,
        description=(
            "Ledger transactions, newest first, in the wallet currency (top-ups keep what was "
            "paid). `before`: the last id of the previous page."
        ),
        extensions=[*require(BillingReader()), Arguments(before_id="before", limit="first")],
    )

    transaction = strawberry.field(
        resolver=resolve_transaction,
        description="One transaction of the organization (NOT_FOUND for another's).",
        extensions=[*require(BillingReader()), Arguments(transaction_id="id")],
    )

    holds = strawberry.field(
        resolver=resolve_holds,
        description=(
            "The open holds, newest first, in the wallet currency: what `wallet.heldBalance` "
            "is made of."
        ),
        extensions=[*require(BillingReader()), Arguments(limit="first")],
    )

    meters = strawberry.field(
        resolver=resolve_meters,
        description=(
            "What each resource costs: its meter, newest first; the running ones only unless "
            "`openOnly` is false; `first` at most 1000 (default 100)."
        ),
        extensions=[*require(BillingReader()), Arguments(limit="first")],
    )

    auto_top_up = strawberry.field(
        resolver=resolve_auto_top_up,
        description="The auto top-up rule and the request it is waiting on, if any.",
        extensions=require(BillingReader()),
    )

    thresholds = strawberry.field(
        resolver=resolve_thresholds,
        description="Low-balance alert thresholds.",
        extensions=require(BillingReader()),
    )

    conversion = strawberry.field(
        resolver=resolve_conversion,
        description=(
            "The exchange rate the wallet card is converted with for `displayCurrency` (null "
            "when shown in the wallet currency). Each card reads the newest rate when it is "
            "read and names it in its own `conversion`: they differ only when a rate is set, "
            "or a scheduled one comes due, between their reads."
        ),
        extensions=require(BillingReader()),
    )

    # ------------------------------------------------------------------ every member

    service_status = strawberry.field(
        resolver=resolve_service_status,
        description=(
            "available, warning, critical or paused: the wallet card's service status without "
            "its amounts, for every member (e.g. a banner when running resources are paused)."
        ),
        extensions=require(Member()),
    )

    projects = strawberry.field(
        resolver=resolve_projects,
        description="Projects, most recently used first (a use counts within seconds).",
        extensions=require(Member()),
    )

    members = strawberry.field(resolver=resolve_members, extensions=require(Member()))

    api_tokens = strawberry.field(
        resolver=resolve_api_tokens,
        description=(
            "API tokens, newest first: all of them for an owner or admin, the caller's own "
            "for anyone else."
        ),
        extensions=require(Member()),
    )

    preferences = strawberry.field(
        resolver=resolve_preferences,
        description="The caller's own preferences here.",
        extensions=require(Member()),
    )


@strawberry.type(
    description=(
        "A new organization, and an owner token for it: `ownerToken` is its secret, shown "
        "this once (null when a retry returned the first organization). While the caller's "
        "user owns the organization, every field of `organization` can be read here, as its "
        "owner; later operations on it, later root fields of the same document too, need the "
        "owner token (a token acts in its own organization only)."
    )
)
class CreateOrganizationPayload:
    """What createOrganization answers. `organization` and `ownerApiToken` are checked like
    `organization(id:)`: a retry after the caller's user stopped owning the organization (left
    it, was removed) must not show its name, members or tokens to a token that may no longer
    see them."""

    organization: Organization | None = strawberry.field(
        description=(
            "The organization, as its owner. Null with NOT_FOUND, as `organization(id:)` says "
            "of another organization, when a retry comes after the caller's user stopped "
            "owning it."
        ),
        extensions=require(Member()),
    )
    owner_token: str | None
    owner_api_token: accounts.ApiToken | None = strawberry.field(
        description="The owner token made with it; null with NOT_FOUND as `organization`.",
        extensions=require(Member()),
    )
    organization_id: strawberry.Private[str]  # what Member checks `organization` against


async def resolve_organization(
    info: Info, id: strawberry.ID, display_currency: str | None = None
) -> Organization | None:
    found = await info.context.loaders.organization.load(str(id))
    display = await accounts.display_for(info, str(id), display_currency)
    if display in ("", found.currency):
        return Organization.from_pb(found, "")
    missing = await wallets.rate_missing(info, str(id), display)
    if missing is not None:
        if display_currency is None:  # a saved preference: the wallet's own currency instead
            return Organization.from_pb(found, "")
        raise from_rpc(missing) from missing
    return Organization.from_pb(found, display)


@strawberry.type
class Query:
    organization = strawberry.field(
        resolver=resolve_organization,
        description=(
            "The caller's organization (another id is NOT_FOUND). With `displayCurrency` (INR or "
            "USD) the cards' amounts (wallet, spending, billing, plan, usage) are converted; "
            "without it, they are shown in the caller's preferred display currency "
            "(preferences) when a rate converts to it, else in the wallet's. Transactions, "
            "holds, thresholds, auto top-up and invoices stay in the wallet currency."
        ),
        extensions=require(Member("id")),
    )


def _live(created: account_pb2.CreateOrganizationResponse) -> bool:
    """Whether the owner token of a created organization may still act (a first answer's
    always may; a retry's may have been revoked or expired since)."""
    if created.owner_token:
        return True
    token = created.owner_api_token
    if not created.HasField("owner_api_token") or token.HasField("revoked_at"):
        return False
    return not token.HasField("expires_at") or token.expires_at.ToDatetime(UTC) > datetime.now(UTC)


CreateOrganizationKey = Annotated[
    str | None,
    strawberry.argument(
        description=(
            "Optional. A retry by the same token with this key returns the first organization "
            "(without `ownerToken`) and creates nothing; the same key with another name or "
            "currency is a CONFLICT. These keys are the token's own, apart from the keys of "
            "mutations in an organization."
        )
    ),
]


async def resolve_create_organization(
    info: Info, name: str, currency: str, idempotency_key: CreateOrganizationKey = None
) -> CreateOrganizationPayload:
    identity = await info.context.identity()
    if not identity.user_id:
        raise GatewayError(
            "this token belongs to no user who could own an organization", code=FORBIDDEN
        )
    c = info.context.wallet
    request = account_pb2.CreateOrganizationRequest(
        name=name,
        currency=parse_currency(currency),
        owner_user_id=identity.user_id,
        idempotency_key=idempotency_key or "",
        # A retry must come from the same token: another token of the user (a member's, say)
        # sending the key makes its own organization and sees nothing of the first.
        caller_scope=f"token:{identity.token_id}" if identity.token_id else "",
    )
    if identity.expires_at is not None:  # the owner token lives no longer than the caller's
        request.owner_token_expires_at.FromDatetime(identity.expires_at)
    created = await c.accounts.CreateOrganization(request, metadata=c.metadata)
    new = created.organization
    # The caller's user owns it: its payload (only) shows it, as its owner token would. Otherwise
    # (a retry after the user left, or after that token was revoked or expired) the payload's
    # fields are NOT_FOUND to the caller's own token.
    if new.owner.id == identity.user_id and _live(created):
        info.context.grant(
            dataclasses.replace(
                identity,
                token_id=created.owner_api_token.id or identity.token_id,
                organization_id=new.id,
                role="owner",
                organizations=(
                    *identity.organizations,
                    OrganizationRole(new.id, new.name, "owner"),
                ),
                expires_at=identity.expires_at,
            ),
            info,
        )
    return CreateOrganizationPayload(
        organization=Organization.from_pb(new),
        owner_token=created.owner_token or None,
        owner_api_token=accounts.ApiToken.from_pb(created.owner_api_token)
        if created.HasField("owner_api_token")
        else None,
        organization_id=new.id,
    )


async def resolve_rename_organization(
    info: Info, id: strawberry.ID, name: str, idempotency_key: OptionalKey = None
) -> Organization:
    c = info.context.wallet
    request = account_pb2.UpdateOrganizationRequest(
        organization_id=str(id), name=name, idempotency_key=idempotency_key or ""
    )
    return Organization.from_pb(await c.accounts.UpdateOrganization(request, metadata=c.metadata))


async def resolve_set_kyc_status(
    info: Info, organization_id: strawberry.ID, status: str, idempotency_key: OptionalKey = None
) -> Organization:
    c = info.context.wallet
    request = account_pb2.SetKycStatusRequest(
        organization_id=str(organization_id),
        kyc_status=status,
        idempotency_key=idempotency_key or "",
    )
    return Organization.from_pb(await c.accounts.SetKycStatus(request, metadata=c.metadata))


@strawberry.type
class Mutation:
    create_organization = strawberry.mutation(
        resolver=resolve_create_organization,
        description=(
            "A new organization owned by the caller's user, with its wallet and a project "
            '"default". A retry with the same idempotencyKey returns the first. Any token of '
            "a user but a viewer's may create one: the new organization is the user's own, "
            "and the token that asked still acts only where it did."
        ),
        extensions=require(Writer()),
    )

    rename_organization = strawberry.mutation(
        resolver=resolve_rename_organization,
        description="Give the organization a new name (owner or admin).",
        extensions=[*require(Admin("id")), Arguments(organization_id="id")],
    )

    set_kyc_status = strawberry.mutation(
        resolver=resolve_set_kyc_status,
        description=(
            "Record the outcome of a KYC review: unverified, pending or verified (the platform "
            "admin only). Top-ups above the KYC limit need verified."
        ),
        extensions=[*require(PlatformAdmin()), Arguments(kyc_status="status")],
    )
