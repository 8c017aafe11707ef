"""Threshold settings: a pair out of order is named by the field the caller changed (it named
critical_amount when only warning_amount was sent, so a console marked an input left alone)."""

from __future__ import annotations

import pytest

from gpudeck.kit.errors import InvalidArgument
from gpudeck.wallet.alert_settings import merge_thresholds
from gpudeck.wallet.alerts import Thresholds

SAVED = Thresholds(warning_amount=50, critical_amount=20, warning_hours=10, critical_hours=5)


@pytest.mark.parametrize(
    ("wanted", "fields", "field", "message"),
    [
        (Thresholds(10, 0, 0, 0), ["warning_amount"], "warning_amount",
         "warning_amount must not be below critical_amount"),
        (Thresholds(0, 60, 0, 0), ["critical_amount"], "critical_amount",
         "critical_amount must not exceed warning_amount"),
        (Thresholds(5, 10, 0, 0), ["warning_amount", "critical_amount"], "critical_amount",
         "critical_amount must not exceed warning_amount"),
        (Thresholds(0, 0, 1, 0), ["warning_hours"], "warning_hours",
         "warning_hours must not be below critical_hours"),
        (Thresholds(0, 0, 0, 20), ["critical_hours"], "critical_hours",
         "critical_hours must not exceed warning_hours"),
        (Thresholds(5, 10, 10, 5), [], "critical_amount",  # all of them: the critical one
         "critical_amount must not exceed warning_amount"),
    ],
)  # fmt: skip
def test_a_pair_out_of_order_names_the_field_that_was_changed(
    wanted: Thresholds, fields: list[str], field: str, message: str
) -> None:
    with pytest.raises(InvalidArgument) as err:
        merge_thresholds(SAVED, wanted, fields)
    assert (err.value.field, err.value.message) == (field, message)


def test_a_pair_in_order_is_kept() -> None:
    assert merge_thresholds(SAVED, Thresholds(30, 0, 0, 0), ["warning_amount"]) == Thresholds(
        30, 20, 10, 5
    )
