"""GPUDECK_KYC_TOPUP_LIMIT: one amount for every currency, or one per currency; anything else is
a configuration error that names the variable."""

from __future__ import annotations

import pytest

from gpudeck.kit.config import ConfigError
from gpudeck.wallet.ledger import KycLimits
from gpudeck.wallet.settings import DEFAULT_KYC_LIMITS, kyc_limits

UNIT = 1_000_000


def parsed(value: str) -> KycLimits:
    return kyc_limits({"GPUDECK_KYC_TOPUP_LIMIT": value})


def test_by_default_each_currency_has_its_own_limit() -> None:
    assert kyc_limits({}) == DEFAULT_KYC_LIMITS
    assert DEFAULT_KYC_LIMITS.of("USD") == 500 * UNIT
    assert DEFAULT_KYC_LIMITS.of("INR") == 40_000 * UNIT


def test_one_amount_is_every_currency_s_limit() -> None:
    limits = parsed("250.5")
    assert (limits.of("USD"), limits.of("INR")) == (250_500_000, 250_500_000)
    assert limits.any()


def test_a_limit_per_currency_and_none_for_a_currency_not_named() -> None:
    limits = parsed(" usd:10 , INR : 800")
    assert (limits.of("USD"), limits.of("INR")) == (10 * UNIT, 800 * UNIT)
    only_inr = parsed("INR:800")
    assert (only_inr.of("USD"), only_inr.of("INR")) == (0, 800 * UNIT)


def test_zero_is_no_limit() -> None:
    assert not parsed("0").any()
    assert not parsed("USD:0,INR:0").any()
    assert not parsed("0E+19").any()  # 0 however it is written
    assert parsed("USD:0,INR:5").any()


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("EUR:5", "'EUR:5' is not CURRENCY:AMOUNT"),
        ("USD:5,USD:6", "named once"),
        ("USD:ten", "'ten' is not a number"),
        ("USD:inf", "not a finite number"),
        ("-1", "must be at least 0"),
        ("USD:5,", "'' is not CURRENCY:AMOUNT"),
        ("USD:", "'USD:' is not CURRENCY:AMOUNT"),
        ("USD:0.0000001", "more than 6 decimal places"),  # was 0: no limit at all
        ("99999999999999", "too large"),
        ("USD:1e999999", "too large"),  # was a traceback (the decimal context overflowed)
        ("1e-2000000", "more than 6 decimal places"),  # underflowed to 0: no limit at all
        ("1." + "0" * 40 + "1", "more than 6 decimal places"),  # rounded to 1 in 28 digits
    ],
)
def test_a_bad_limit_is_a_configuration_error_naming_the_variable(value: str, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        parsed(value)
    assert "GPUDECK_KYC_TOPUP_LIMIT=" in str(err.value)
    assert says in str(err.value)


def test_a_limit_is_exact_to_the_micro_unit() -> None:
    """Read as a float, large limits lost micro-units (12345678901.234567 → …568)."""
    assert parsed("USD:12345678901.234567").of("USD") == 12_345_678_901_234_567
    assert parsed("999999999999.999999").of("INR") == 999_999_999_999_999_999
