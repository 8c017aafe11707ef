"""The dashboards' arithmetic without servers: periods at month boundaries, % change, trends
with missing days, monthly breakdowns, run rate and the wallet card."""

from __future__ import annotations

import uuid
from datetime import date, timedelta

import pytest

from gpudeck.kit.errors import InvalidArgument
from gpudeck.wallet import readmodels as rm
from gpudeck.wallet.readmodels import DayAmount, Period, Periods


def test_month_start_moves_across_years() -> None:
    assert rm.month_start(date(2026, 1, 31)) == date(2026, 1, 1)
    assert rm.month_start(date(2026, 1, 31), -1) == date(2025, 12, 1)
    assert rm.month_start(date(2026, 1, 31), -2) == date(2025, 11, 1)
    assert rm.month_start(date(2026, 12, 5), 1) == date(2027, 1, 1)
    assert rm.month_start(date(2026, 3, 15), -14) == date(2025, 1, 1)


def test_periods_on_the_first_of_a_month() -> None:
    p = Periods.ending(date(2026, 3, 1))
    assert p.current_month == Period(date(2026, 3, 1), date(2026, 3, 1))
    assert p.last_7_days == Period(date(2026, 2, 23), date(2026, 3, 1))
    assert p.previous_7_days == Period(date(2026, 2, 16), date(2026, 2, 22))
    assert p.last_30_days == Period(date(2026, 1, 31), date(2026, 3, 1))
    assert p.last_month == Period(date(2026, 2, 1), date(2026, 2, 28))
    assert p.month_before == Period(date(2026, 1, 1), date(2026, 1, 31))
    assert p.earliest == date(2026, 1, 1)


def test_periods_in_january_reach_into_last_year() -> None:
    p = Periods.ending(date(2026, 1, 3))
    assert p.last_month == Period(date(2025, 12, 1), date(2025, 12, 31))
    assert p.month_before == Period(date(2025, 11, 1), date(2025, 11, 30))
    assert p.last_7_days.start == date(2025, 12, 28)


def test_leap_february_is_a_whole_last_month() -> None:
    p = Periods.ending(date(2028, 3, 10))
    assert p.last_month == Period(date(2028, 2, 1), date(2028, 2, 29))


def test_earliest_covers_every_period() -> None:
    for offset in range(0, 800, 7):
        today = date(2025, 1, 1) + timedelta(days=offset)
        p = Periods.ending(today)
        for period in (p.previous_7_days, p.last_30_days, p.month_before):
            assert p.earliest <= period.start


def test_change_percent() -> None:
    assert rm.change_percent(150, 100) == 50.0
    assert rm.change_percent(50, 100) == -50.0
    assert rm.change_percent(0, 100) == -100.0
    assert rm.change_percent(100, 0) is None
    assert rm.change_percent(0, 0) is None
    assert rm.change_percent(-50, -100) == 50.0  # refunds: the sign follows the movement


def test_expenditure_sums_each_period_at_a_month_boundary() -> None:
    today = date(2026, 3, 2)
    rows = [
        DayAmount(date(2026, 3, 2), "pod", 10),  # this month, last 7, last 30
        DayAmount(date(2026, 3, 1), "vm", 5),  # this month, last 7, last 30
        DayAmount(date(2026, 2, 24), "pod", 20),  # last month, last 7, last 30
        DayAmount(date(2026, 2, 23), "pod", 40),  # last month, previous 7, last 30
        DayAmount(date(2026, 2, 1), "nfs_volume", 100),  # last month, last 30
        DayAmount(date(2026, 1, 31), "pod", 1000),  # the month before
        DayAmount(date(2026, 1, 1), "pod", 1000),  # the month before
        DayAmount(date(2025, 12, 31), "pod", 99999),  # in no period
    ]
    e = rm.expenditure(Periods.ending(today).totals(rows), today, date(2026, 4, 1))
    assert e.current_period == 15
    assert e.last_7_days == rm.PeriodTotal(35, (35 - 40) * 100 / 40)
    assert e.last_30_days == 175
    assert e.last_month == rm.PeriodTotal(160, (160 - 2000) * 100 / 2000)
    assert e.next_invoice_date == date(2026, 4, 1)


def test_expenditure_without_history_has_no_change() -> None:
    today = date(2026, 5, 20)
    e = rm.expenditure(
        Periods.ending(today).totals([DayAmount(today, "pod", 7)]), today, date(2026, 6, 1)
    )
    assert e.last_7_days == rm.PeriodTotal(7, None)
    assert e.last_month == rm.PeriodTotal(0, None)


def test_trend_fills_missing_days_with_zeros_by_type() -> None:
    today = date(2026, 3, 2)
    rows = [
        DayAmount(date(2026, 3, 2), "pod", 10),
        DayAmount(date(2026, 3, 2), "api", 3),
        DayAmount(date(2026, 2, 27), "vm", 7),
        DayAmount(date(2026, 2, 20), "vm", 1000),  # before the window
    ]
    days = rm.trend(rows, today, 5)
    assert [d.start for d in days] == [
        date(2026, 2, 26),
        date(2026, 2, 27),
        date(2026, 2, 28),
        date(2026, 3, 1),
        date(2026, 3, 2),
    ]
    assert [d.total for d in days] == [0, 7, 0, 0, 13]
    types = ("pod", "vm", "nfs_volume", "object_storage", "api")
    assert all(tuple(t for t, _ in d.by_resource_type) == types for d in days)
    assert dict(days[-1].by_resource_type) == {
        "pod": 10,
        "vm": 0,
        "nfs_volume": 0,
        "object_storage": 0,
        "api": 3,
    }


def test_monthly_breakdown_fills_missing_months() -> None:
    rows = [
        DayAmount(date(2026, 1, 1), "pod", 5),
        DayAmount(date(2025, 11, 1), "vm", 9),
    ]
    months = rm.monthly(rows, date(2026, 1, 20), 4)
    assert [m.start for m in months] == [
        date(2025, 10, 1),
        date(2025, 11, 1),
        date(2025, 12, 1),
        date(2026, 1, 1),
    ]
    assert [m.total for m in months] == [0, 9, 0, 5]


@pytest.mark.parametrize(("days", "expected"), [(0, 7), (1, 1), (366, 366)])
def test_trend_days(days: int, expected: int) -> None:
    assert rm.check_days(days) == expected


@pytest.mark.parametrize("days", [-1, 367])
def test_trend_days_out_of_range_name_the_field(days: int) -> None:
    with pytest.raises(InvalidArgument) as err:
        rm.check_days(days)
    assert err.value.field == "days"
    assert err.value.message.endswith(f", got {days}")


def test_run_rate_projections_and_types() -> None:
    rate = rm.run_rate(4_600_000, {"pod": 3_600_000, "vm": 1_000_000})
    assert rate.per_day == 4_600_000 * 24
    assert rate.per_month == 4_600_000 * 24 * 30
    assert rate.by_resource_type == (
        ("pod", 3_600_000),
        ("vm", 1_000_000),
        ("nfs_volume", 0),
        ("object_storage", 0),
    )


def state(balance: int, run_rate: int, level: str = "ok") -> rm.WalletState:
    return rm.WalletState(uuid.uuid4(), "USD", balance, 0, 1_000_000, run_rate, level)


def test_summary_hours_remaining_and_status() -> None:
    s = rm.summary(state(46_000_000, 4_600_000, "warning"), {"pod": 4_600_000})
    assert s.hours_remaining == 10.0
    assert s.service_status == "warning"
    assert s.spendable == 45_000_000


def test_summary_without_running_resources_has_no_hours_remaining() -> None:
    s = rm.summary(state(46_000_000, 0), {})
    assert s.hours_remaining is None
    assert s.service_status == "available"
    assert rm.summary(state(-5, 100, "depleted"), {}).service_status == "paused"
    assert rm.summary(state(-5, 100, "depleted"), {}).hours_remaining == 0.0
