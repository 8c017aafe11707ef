"""Converted cards add up as the wallet-currency ones do: each amount rounded on its own made
perHour × 24 ≠ perDay and a total ≠ the sum of its breakdown (by a few micro-units)."""

from __future__ import annotations

import random
from datetime import UTC, date, datetime
from decimal import Decimal

import pytest

from gpudeck.wallet import read_convert as rc
from gpudeck.wallet import readmodels as rm
from gpudeck.wallet.rates import Conversion, ExchangeRate
from gpudeck.wallet.usage import Analytics, Calls, DimensionUsage

AT = datetime(2026, 1, 1, tzinfo=UTC)


def display(rate: str, *, inverse: bool = False) -> rc.Display:
    stored = ExchangeRate(1, "USD", "INR", Decimal(rate), AT)
    source, target = ("INR", "USD") if inverse else ("USD", "INR")
    return rc.Display(Conversion(source, target, stored, inverse=inverse))


@pytest.mark.parametrize(("rate", "inverse"), [("83.25", False), ("83.25", True), ("0.5", False)])
def test_a_converted_run_rate_adds_up(rate: str, inverse: bool) -> None:
    d = display(rate, inverse=inverse)
    r = rm.RunRate(2_000_002, (("pod", 1_000_001), ("vm", 1_000_001), ("nfs_volume", 0)))
    shown = rc.run_rate(r, d)
    per_hour = shown.per_hour.amount
    assert per_hour == d.conversion.apply(2_000_002)  # the total is the rate converted
    assert shown.per_day.amount == per_hour * 24
    assert shown.per_month.amount == per_hour * 720
    assert sum(t.per_hour.amount for t in shown.by_resource_type) == per_hour
    assert [t.resource_type for t in shown.by_resource_type] == ["pod", "vm", "nfs_volume"]
    assert shown.by_resource_type[2].per_hour.amount == 0


def test_split_moves_each_part_by_at_most_one_micro_unit() -> None:
    d = display("83.251234567891")
    rng = random.Random(7)
    for _ in range(300):
        parts = [rng.randrange(0, 10**9) for _ in range(rng.randrange(1, 8))]
        total, shown = d.split(sum(parts), parts)
        assert sum(m.amount for m in shown) == total.amount == d.conversion.apply(sum(parts))
        for p, m in zip(parts, shown, strict=True):
            assert abs(m.amount - d.conversion.exact(p)) < 1 + Decimal("1e-9")


def test_parts_that_are_not_the_whole_are_each_rounded_alone() -> None:
    d = display("83.25")
    total, shown = d.split(3_000_001, [1_000_001, 1_000_001])  # a third is elsewhere
    assert total.amount == d.conversion.apply(3_000_001)
    assert [m.amount for m in shown] == [d.conversion.apply(1_000_001)] * 2


def test_the_trend_and_todays_usage_add_up_when_converted() -> None:
    d = display("83.25")
    days = [rm.Spend(date(2026, 1, 1), 2_000_002, (("pod", 1_000_001), ("vm", 1_000_001)))]
    day = rc.trend(days, d).days[0]
    assert sum(t.amount.amount for t in day.by_resource_type) == day.total.amount
    month = rc.monthly(days, d).months[0]
    assert sum(t.amount.amount for t in month.by_resource_type) == month.total.amount

    def used(model: str) -> DimensionUsage:
        return DimensionUsage("model", model, 1.0, 1_000_001, 1, 0)

    a = Analytics(2.0, 2_000_002, (used("m1"), used("m2")), (), (), Calls(), (), (), ())
    shown = rc.analytics(a, d)
    assert sum(u.cost.amount for u in shown.today_by_model) == shown.today_cost.amount
