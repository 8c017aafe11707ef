"""Alert settings, as values: low-balance thresholds and the auto top-up rule ("when the balance
falls below X, add Y") with the top-up it requests. The levels themselves are alerts.py's."""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from gpudeck.kit.errors import InvalidArgument
from gpudeck.wallet.alerts import Thresholds
from gpudeck.wallet.money import MAX_AMOUNT, check_amount
from gpudeck.wallet.text import chosen_fields

MAX_HOURS = 24 * 366
# Automatic top-ups that may fail in a row (declined, or never completed) before the rule turns
# itself off: a card that keeps failing is not charged again every billing tick.
MAX_AUTO_TOPUP_FAILURES = 3


@dataclass(frozen=True)
class ThresholdSettings:
    organization_id: uuid.UUID
    thresholds: Thresholds
    level: str  # the wallet's current level: ok, warning, critical, depleted


@dataclass(frozen=True)
class PendingTopUp:
    id: uuid.UUID
    organization_id: uuid.UUID
    amount: int
    currency: str
    status: str  # pending, completed, failed
    created_at: datetime
    transaction_id: uuid.UUID | None


@dataclass(frozen=True)
class AutoTopUp:
    organization_id: uuid.UUID
    enabled: bool
    below: int
    amount: int
    currency: str
    pending: PendingTopUp | None
    disabled_reason: str = ""  # why the rule turned itself off ("" when it did not)


def gives_up(failures_in_a_row: int) -> bool:
    """Whether the rule should turn itself off after this many failed top-ups in a row."""
    return failures_in_a_row >= MAX_AUTO_TOPUP_FAILURES


def give_up_reason() -> str:
    return f"turned off after {MAX_AUTO_TOPUP_FAILURES} automatic top-ups in a row failed"


THRESHOLD_FIELDS = ("warning_amount", "critical_amount", "warning_hours", "critical_hours")


def merge_thresholds(current: Thresholds, wanted: Thresholds, fields: list[str]) -> Thresholds:
    """`current` with the `fields` of `wanted` (all when empty), checked."""
    names = chosen_fields(fields, THRESHOLD_FIELDS, "threshold")
    chosen = {name: getattr(wanted, name) for name in names}
    return check_thresholds(replace(current, **chosen), changed=names)


def check_thresholds(t: Thresholds, changed: Sequence[str] = THRESHOLD_FIELDS) -> Thresholds:
    """Amounts and hours ≥ 0 (0: unset); a critical limit no looser than the warning one. A pair
    out of order is named by the one of them `changed` (the caller sent), the critical first."""
    for name in ("warning_amount", "critical_amount"):
        value = getattr(t, name)
        if not 0 <= value <= MAX_AMOUNT:
            raise InvalidArgument(f"{name} must be between 0 and 1e15 micro-units", field=name)
    for name in ("warning_hours", "critical_hours"):
        value = getattr(t, name)
        if not math.isfinite(value) or not 0 <= value <= MAX_HOURS:
            raise InvalidArgument(f"{name} must be between 0 and {MAX_HOURS}", field=name)
    for kind in ("amount", "hours"):
        warning, critical = f"warning_{kind}", f"critical_{kind}"
        if getattr(t, warning) and getattr(t, critical) > getattr(t, warning):
            if critical in changed or warning not in changed:
                raise InvalidArgument(f"{critical} must not exceed {warning}", field=critical)
            raise InvalidArgument(f"{warning} must not be below {critical}", field=warning)
    return t


def check_auto_topup(*, enabled: bool, below: int, amount: int) -> None:
    """An enabled rule needs a positive `below` and `amount`; a disabled one may keep zeros."""
    if enabled:
        check_amount(below, field="below")
        check_amount(amount, field="amount")
        return
    for name, value in (("below", below), ("amount", amount)):
        if not 0 <= value <= MAX_AMOUNT:
            raise InvalidArgument(f"{name} must be between 0 and 1e15 micro-units", field=name)
