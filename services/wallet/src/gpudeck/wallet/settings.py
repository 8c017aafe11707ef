"""The wallet's own settings, from the environment (a module of its own, so `gpudeck up` can
check them before it starts anything, without loading the wallet)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from gpudeck.kit.config import ConfigError, number
from gpudeck.wallet.ledger import KycLimits
from gpudeck.wallet.money import CURRENCIES
from gpudeck.wallet.pdf import check_font

DEFAULT_KYC_LIMITS = KycLimits({"USD": 500_000_000, "INR": 40_000_000_000})
KYC_LIMIT = "GPUDECK_KYC_TOPUP_LIMIT"


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
        )


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
    """A limit in whole units (`number`'s checks) as micro-units."""
    return round(number({KYC_LIMIT: amount}, KYC_LIMIT, 0) * 1_000_000)
