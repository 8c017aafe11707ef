"""The rules of plans without servers: billing months and what a plan change posts."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta, timezone

import pytest

from gpudeck.kit.errors import InvalidArgument
from gpudeck.wallet.ledger import Kind
from gpudeck.wallet.plans import (
    ChangePlanRequest,
    Plan,
    PlanStatus,
    billing_month,
    credits_key,
    fee_key,
    month_end,
    next_month_start,
    plan_change,
    plan_renewal,
)

USD = 1_000_000
STANDARD = Plan("standard", "Standard", "USD", 0, 0, 1)
PREMIUM = Plan("premium", "Premium", "USD", 49 * USD, 60 * USD, 2)
ENTERPRISE = Plan("enterprise", "Enterprise", "USD", 499 * USD, 650 * USD, 3)
ORG = uuid.UUID(int=7)
NOW = datetime(2025, 6, 14, 10, 30, tzinfo=UTC)


def test_billing_month_is_the_utc_calendar_month() -> None:
    assert billing_month(NOW) == "2025-06"
    # 01:00 on July 1st in UTC+05:30 is still June 30th in UTC.
    ist = timezone(timedelta(hours=5, minutes=30))
    assert billing_month(datetime(2025, 7, 1, 1, 0, tzinfo=ist)) == "2025-06"


def test_month_end_is_the_first_instant_of_the_next_month() -> None:
    assert month_end(NOW) == datetime(2025, 7, 1, tzinfo=UTC)
    assert month_end(datetime(2025, 12, 31, 23, 59, tzinfo=UTC)) == datetime(2026, 1, 1, tzinfo=UTC)
    assert next_month_start(date(2024, 12, 5)) == date(2025, 1, 1)


def test_an_upgrade_charges_the_fee_and_grants_credits_expiring_at_month_end() -> None:
    change = plan_change(ORG, STANDARD, PREMIUM, NOW, paid_this_month=False, actor="user:x")
    fee, grant = change.transfers
    assert (fee.kind, fee.amount, fee.resource_type) == (Kind.CHARGE, 49 * USD, "plan")
    assert fee.key == fee_key("premium", "2025-06")
    assert (grant.kind, grant.amount, grant.credit_source) == (Kind.CREDIT_GRANT, 60 * USD, "plan")
    assert grant.key == credits_key("premium", "2025-06")
    assert grant.credit_expires_at == datetime(2025, 7, 1, tzinfo=UTC)
    assert (change.charged, change.credits_granted) == (49 * USD, 60 * USD)
    assert {fee.actor, grant.actor} == {"user:x"}


def test_a_plan_already_paid_this_month_posts_nothing() -> None:
    change = plan_change(ORG, STANDARD, PREMIUM, NOW, paid_this_month=True)
    assert change.transfers == ()
    assert change.changes_anything


def test_a_downgrade_takes_effect_without_refund_or_charge() -> None:
    change = plan_change(ORG, ENTERPRISE, PREMIUM, NOW, paid_this_month=False)
    assert change.transfers == ()
    assert change.changes_anything
    assert (change.charged, change.credits_granted) == (0, 0)


def test_changing_to_the_current_plan_changes_nothing() -> None:
    change = plan_change(ORG, PREMIUM, PREMIUM, NOW, paid_this_month=False)
    assert change.transfers == ()
    assert not change.changes_anything


def test_a_plan_with_credits_but_no_fee_only_grants() -> None:
    trial = Plan("trial", "Trial", "USD", 0, 5 * USD, 2)
    change = plan_change(ORG, STANDARD, trial, NOW, paid_this_month=False)
    assert [t.kind for t in change.transfers] == [Kind.CREDIT_GRANT]


def test_fee_keys_differ_per_plan_and_month() -> None:
    keys = {fee_key(p, m) for p in ("premium", "enterprise") for m in ("2025-06", "2025-07")}
    assert len(keys) == 4


@pytest.mark.parametrize(
    ("key", "plan_code", "field"),
    [
        ("", "premium", "idempotency_key"),
        ("k", "", "plan_code"),
        ("k" * 201, "x", "idempotency_key"),
    ],
)
def test_bad_change_requests_name_the_field(key: str, plan_code: str, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        ChangePlanRequest(key, ORG, plan_code).validate()
    assert err.value.field == field


def test_the_fingerprint_ignores_the_case_of_the_plan_code() -> None:
    a = ChangePlanRequest("k", ORG, "Premium").fingerprint()
    assert a == ChangePlanRequest("k", ORG, "premium").fingerprint()
    assert a != ChangePlanRequest("k", ORG, "enterprise").fingerprint()


def test_plan_status_survives_its_idempotency_record() -> None:
    status = PlanStatus(PREMIUM, 60 * USD, 49 * USD, 60 * USD, "standard")
    assert PlanStatus.from_json(status.to_json()) == status


def test_a_renewal_posts_what_an_upgrade_in_that_month_would_so_neither_pays_twice() -> None:
    renewal = plan_renewal(ORG, PREMIUM, NOW)
    upgrade = plan_change(ORG, STANDARD, PREMIUM, NOW, paid_this_month=False)
    assert [(t.key, t.fingerprint) for t in renewal.transfers] == [
        (t.key, t.fingerprint) for t in upgrade.transfers
    ]
    assert {t.actor for t in renewal.transfers} == {"system"}
    assert (renewal.charged, renewal.credits_granted) == (49 * USD, 60 * USD)
    assert plan_renewal(ORG, STANDARD, NOW).transfers == ()  # a free plan posts nothing
