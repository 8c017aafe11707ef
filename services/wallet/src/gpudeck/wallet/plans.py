"""Plans and credits: the catalog's values, billing months, and what a plan change does.

The rule of a plan change (`plan_change`):

- The new plan takes effect at once; changing to the current plan changes nothing.
- An upgrade (to a plan higher in the catalog) charges the new plan's whole monthly fee
  (Kind.CHARGE, resource_type "plan"; no proration) and grants its included credits
  (Kind.CREDIT_GRANT, credit_source "plan") that expire at the end of the billing month. The
  charge is refused with INSUFFICIENT_FUNDS when the wallet cannot pay it, and then nothing
  changes. Credits are spent before cash, so the fee may be paid from credits left over.
- Each plan is paid for at most once per organization per billing month: the fee and the grant
  carry ledger keys made of plan and month, so switching back to a plan already paid for this
  month (or a retry with a new idempotency key) charges and grants nothing again.
- A downgrade takes effect at once without refund and without charge; credits already granted
  stay until they expire. The lower plan's fee applies from the next billing month.

The rule of a renewal (`plan_renewal`): in each billing month an organization on a paid plan is
charged that plan's fee and granted its credits (expiring at the month's end) once, with the
same ledger keys as an upgrade, so a plan paid for this month (an upgrade on the 20th, a renewal
run twice) is not paid again, nor is a lower plan the organization moved down to after paying
for a higher one this month (it pays the lower fee from the next month). A wallet that cannot pay the fee moves to the default plan at once
and is charged nothing: wallet.plan.changed says so, with the system as its actor.

Billing months are UTC calendar months, written YYYY-MM.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from gpudeck.kit.errors import InvalidArgument
from gpudeck.wallet.ledger import Kind, TransferRequest

PLAN_RESOURCE_TYPE = "plan"
DEFAULT_PLAN = "standard"


@dataclass(frozen=True)
class Plan:
    """One plan of the catalog, priced in one currency."""

    code: str
    name: str
    currency: str
    monthly_fee: int  # micro-units
    included_credits: int  # micro-units, granted each paid month
    position: int  # the catalog order: a higher position is an upgrade

    @property
    def paid(self) -> bool:
        return self.monthly_fee > 0 or self.included_credits > 0


def check_plan_code(code: str, *, field: str = "plan_code") -> str:
    """A plan code as stored (lower case); InvalidArgument naming the field when empty."""
    value = code.strip().lower()
    if not value:
        raise InvalidArgument(f"{field} is required", field=field)
    if len(value) > 64:
        raise InvalidArgument(f"{field} is longer than 64 characters", field=field)
    return value


def billing_month(at: datetime) -> str:
    """The billing month of `at` as YYYY-MM (UTC)."""
    utc = at.astimezone(UTC)
    return f"{utc.year:04d}-{utc.month:02d}"


def month_end(at: datetime) -> datetime:
    """The first instant of the month after `at` (UTC): when this month's plan credits expire."""
    utc = at.astimezone(UTC)
    year, month = (utc.year + 1, 1) if utc.month == 12 else (utc.year, utc.month + 1)
    return datetime(year, month, 1, tzinfo=UTC)


def next_month_start(day: date) -> date:
    """The first day of the month after `day`."""
    return date(day.year + 1, 1, 1) if day.month == 12 else date(day.year, day.month + 1, 1)


def fee_key(plan_code: str, month: str) -> str:
    """The ledger idempotency key of a plan's fee for one month (one per organization)."""
    return f"plan:{plan_code}:{month}:fee"


def credits_key(plan_code: str, month: str) -> str:
    """The ledger idempotency key of a plan's credit grant for one month."""
    return f"plan:{plan_code}:{month}:credits"


@dataclass(frozen=True)
class ChangePlanRequest:
    key: str
    organization_id: uuid.UUID
    plan_code: str
    actor: str = ""

    def validate(self) -> ChangePlanRequest:
        if not self.key.strip():
            raise InvalidArgument("idempotency_key is required", field="idempotency_key")
        if len(self.key) > 200:
            raise InvalidArgument(
                "idempotency_key is longer than 200 characters", field="idempotency_key"
            )
        check_plan_code(self.plan_code)
        return self

    def fingerprint(self) -> bytes:
        payload = {
            "op": "change_plan",
            "organization_id": str(self.organization_id),
            "plan_code": check_plan_code(self.plan_code),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).digest()


@dataclass(frozen=True)
class PlanChange:
    """What one plan change does: the plans, the month, and the transfers to post (if any)."""

    organization_id: uuid.UUID
    previous: Plan
    plan: Plan
    month: str
    transfers: tuple[TransferRequest, ...]

    @property
    def changes_anything(self) -> bool:
        return self.previous.code != self.plan.code

    @property
    def charged(self) -> int:
        return sum(t.amount for t in self.transfers if t.kind is Kind.CHARGE)

    @property
    def credits_granted(self) -> int:
        return sum(t.amount for t in self.transfers if t.kind is Kind.CREDIT_GRANT)


def plan_change(
    organization_id: uuid.UUID,
    previous: Plan,
    plan: Plan,
    now: datetime,
    *,
    paid_this_month: bool,
    actor: str = "",
) -> PlanChange:
    """Decide what changing from `previous` to `plan` at `now` posts (see the module's rule).

    `paid_this_month`: this organization already paid for `plan` in the month of `now`.
    """
    month = billing_month(now)
    upgrade = plan.position > previous.position
    if plan.code == previous.code or not upgrade or not plan.paid or paid_this_month:
        return PlanChange(organization_id, previous, plan, month, ())
    return PlanChange(
        organization_id, previous, plan, month, plan_transfers(organization_id, plan, now, actor)
    )


def plan_renewal(organization_id: uuid.UUID, plan: Plan, now: datetime) -> PlanChange:
    """What renewing `plan` for the billing month of `now` posts (see the module's rule); the
    caller checks that this month is not paid for yet."""
    transfers = plan_transfers(organization_id, plan, now, "system")
    return PlanChange(organization_id, plan, plan, billing_month(now), transfers)


def plan_transfers(
    organization_id: uuid.UUID, plan: Plan, now: datetime, actor: str = ""
) -> tuple[TransferRequest, ...]:
    """`plan`'s fee and included credits for the billing month of `now` (what is not zero)."""
    month = billing_month(now)
    transfers: list[TransferRequest] = []
    if plan.monthly_fee > 0:
        transfers.append(
            TransferRequest(
                key=fee_key(plan.code, month),
                organization_id=organization_id,
                kind=Kind.CHARGE,
                amount=plan.monthly_fee,
                description=f"{plan.name} plan, {month}",
                resource_type=PLAN_RESOURCE_TYPE,
                resource_id=f"plan:{plan.code}",
                actor=actor,
            )
        )
    if plan.included_credits > 0:
        transfers.append(
            TransferRequest(
                key=credits_key(plan.code, month),
                organization_id=organization_id,
                kind=Kind.CREDIT_GRANT,
                amount=plan.included_credits,
                description=f"{plan.name} plan credits, {month}",
                credit_expires_at=month_end(now),
                credit_source="plan",
                actor=actor,
            )
        )
    return tuple(transfers)


@dataclass(frozen=True)
class CreditGrant:
    """What is left of one grant of credits."""

    available: int
    source: str  # plan, promotion or purchase
    expires_at: datetime | None
    granted_at: datetime


@dataclass(frozen=True)
class PlanStatus:
    """An organization's plan and available credits; after a change, what the change did."""

    plan: Plan
    available_credits: int
    charged: int = 0
    credits_granted: int = 0
    previous_plan_code: str = ""

    def to_json(self) -> dict[str, Any]:
        p = self.plan
        return {
            "plan": [p.code, p.name, p.currency, p.monthly_fee, p.included_credits, p.position],
            "available_credits": self.available_credits,
            "charged": self.charged,
            "credits_granted": self.credits_granted,
            "previous_plan_code": self.previous_plan_code,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PlanStatus:
        code, name, currency, fee, credits, position = data["plan"]
        return cls(
            plan=Plan(code, name, currency, fee, credits, position),
            available_credits=data["available_credits"],
            charged=data["charged"],
            credits_granted=data["credits_granted"],
            previous_plan_code=data["previous_plan_code"],
        )
