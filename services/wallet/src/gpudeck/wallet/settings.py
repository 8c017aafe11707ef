"""The wallet's own settings, from the environment (a module of its own, so `gpudeck up` can
check them before it starts anything, without loading the wallet)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation, localcontext

from gpudeck.kit.config import ConfigError, check_token, number
from gpudeck.wallet.ledger import KycLimits
from gpudeck.wallet.money import CURRENCIES
from gpudeck.wallet.pdf import check_font

DEFAULT_KYC_LIMITS = KycLimits({"USD": 500_000_000, "INR": 40_000_000_000})
KYC_LIMIT = "GPUDECK_KYC_TOPUP_LIMIT"
INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class WalletSettings:
    """The wallet's own settings (environment variables in brackets)."""

    billing_interval: float = 10.0  # seconds between billing ticks [GPUDECK_BILLING_INTERVAL]
    depletion_seconds: float = 10.0  # [GPUDECK_DEPLETION_SECONDS]
    # What an organization not KYC-verified may add in all, by wallet currency
    # [GPUDECK_KYC_TOPUP_LIMIT: "500" for every currency, or "USD:500,INR:40000"]
    kyc_limits: KycLimits = DEFAULT_KYC_LIMITS
    announce_interval: float = 0.25  # how often wallet.balance.changed is considered
    # An automatic top-up nobody completed within this long fails, so the rule can fire again
    # [GPUDECK_AUTO_TOPUP_TIMEOUT]
    auto_topup_timeout: float = 3600.0
    rates_file: str = ""  # a JSON file of exchange rates to import [GPUDECK_RATES_FILE]
    rates_interval: float = 300.0  # seconds between its imports [GPUDECK_RATES_INTERVAL]
    # A Unicode TrueType font for invoice text outside Latin-1 [GPUDECK_INVOICE_FONT]; by
    # default DejaVu Sans when the system has it (Debian: fonts-dejavu-core); "" for none.
    invoice_font: str = ""
    # Seed the demo organization at start [GPUDECK_DEMO: 1/true/yes; `gpudeck up --demo`], with
    # this owner token [GPUDECK_BOOTSTRAP_TOKEN: only with GPUDECK_DEMO].
    demo: bool = False
    bootstrap_token: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> WalletSettings:
        return cls(
            billing_interval=number(
                env, "GPUDECK_BILLING_INTERVAL", cls.billing_interval, minimum=0.05
            ),
            depletion_seconds=number(env, "GPUDECK_DEPLETION_SECONDS", cls.depletion_seconds),
            auto_topup_timeout=number(  # a database interval: at most about 30 years
                env, "GPUDECK_AUTO_TOPUP_TIMEOUT", cls.auto_topup_timeout, minimum=1, maximum=1e9
            ),
            rates_file=_rates_file(env),
            rates_interval=number(env, "GPUDECK_RATES_INTERVAL", cls.rates_interval, minimum=1),
            invoice_font=_invoice_font(env),
            kyc_limits=kyc_limits(env),
            demo=_demo(env),
            bootstrap_token=_bootstrap_token(env),
        )


DEMO_ON, DEMO_OFF = ("1", "true", "yes"), ("", "0", "false", "no")


def _demo(env: Mapping[str, str]) -> bool:
    raw = env.get("GPUDECK_DEMO", "").strip().lower()
    if raw not in DEMO_ON + DEMO_OFF:
        raise ConfigError(f"GPUDECK_DEMO={raw!r} is not 1, true, yes (seed) or 0, false, no")
    return raw in DEMO_ON


def _bootstrap_token(env: Mapping[str, str]) -> str:
    """The demo owner's token: never without GPUDECK_DEMO (a token left in a production
    Secret must not make a KYC-verified organization with a known owner token)."""
    token = env.get("GPUDECK_BOOTSTRAP_TOKEN", "").strip()
    if not token:
        return ""
    if not _demo(env):
        raise ConfigError(
            "GPUDECK_BOOTSTRAP_TOKEN is the demo organization's owner token: set GPUDECK_DEMO=1"
            " with it (gpudeck up --demo), or unset it"
        )
    return check_token("GPUDECK_BOOTSTRAP_TOKEN", token, spaces=False)


DEFAULT_INVOICE_FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"


def _invoice_font(env: Mapping[str, str]) -> str:
    path = env.get("GPUDECK_INVOICE_FONT")
    if path is None:
        return DEFAULT_INVOICE_FONT if os.path.isfile(DEFAULT_INVOICE_FONT) else ""
    path = path.strip()
    if path and not (os.path.isfile(path) and path.lower().endswith((".ttf", ".otf"))):
        raise ConfigError(f"GPUDECK_INVOICE_FONT={path!r} is not a .ttf or .otf file")
    if path:
        try:
            check_font(path)
        except ValueError as exc:
            raise ConfigError(f"GPUDECK_INVOICE_FONT={exc}") from None
    return path


def _rates_file(env: Mapping[str, str]) -> str:
    path = env.get("GPUDECK_RATES_FILE", "").strip()
    if path and not os.path.isfile(path):
        raise ConfigError(f"GPUDECK_RATES_FILE={path!r} is not a file")
    return path


def kyc_limits(env: Mapping[str, str]) -> KycLimits:
    """GPUDECK_KYC_TOPUP_LIMIT: one amount for every currency ("500"), or one per currency
    ("USD:500,INR:40000"; a currency not named has no limit); 0 is no limit."""
    raw = env.get(KYC_LIMIT, "").strip()
    if not raw:
        return DEFAULT_KYC_LIMITS
    if ":" not in raw:
        return KycLimits(other=_micro(raw))
    limits: dict[str, int] = {}
    for part in raw.split(","):
        currency, sep, amount = (s.strip() for s in part.partition(":"))
        currency = currency.upper()
        if not sep or not amount or currency not in CURRENCIES or currency in limits:
            raise ConfigError(
                f"{KYC_LIMIT}={raw!r}: {part.strip()!r} is not CURRENCY:AMOUNT with a currency"
                f" of {', '.join(CURRENCIES)} named once"
            )
        limits[currency] = _micro(amount)
    return KycLimits(limits)


def _micro(amount: str) -> int:
    """A limit in whole units, a decimal string, as micro-units, exactly (a float made 1e-7 a
    limit of 0, which is no limit at all, and rounded large ones)."""
    try:
        value = Decimal(amount)
    except InvalidOperation:
        raise ConfigError(f"{KYC_LIMIT}={amount!r} is not a number") from None
    if not value.is_finite():
        raise ConfigError(f"{KYC_LIMIT}={amount!r} is not a finite number")
    if value < 0:
        raise ConfigError(f"{KYC_LIMIT}={amount!r} must be at least 0")
    # Bounded before any arithmetic (1e999999 overflowed the decimal context, 1e-2000000
    # underflowed to 0: no limit), then scaled exactly, however many digits it has.
    if value and value.adjusted() > 18:  # ("0E+19" is 0)
        raise ConfigError(f"{KYC_LIMIT}={amount!r} is too large")
    if value and value.adjusted() < -6:
        raise ConfigError(f"{KYC_LIMIT}={amount!r} has more than 6 decimal places")
    with localcontext() as ctx:
        ctx.prec = len(value.as_tuple().digits) + 30
        micro = value.scaleb(6)
        fractional = micro != micro.to_integral_value()
    if fractional:
        raise ConfigError(f"{KYC_LIMIT}={amount!r} has more than 6 decimal places")
    if micro > INT64_MAX:
        raise ConfigError(f"{KYC_LIMIT}={amount!r} is too large")
    return int(micro)
