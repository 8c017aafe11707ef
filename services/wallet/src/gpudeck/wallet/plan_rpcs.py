"""gRPC ⇄ domain for plans, credits and invoices."""

from __future__ import annotations

from gpudeck.wallet.deps import Wallet


class PlanRpcs:
    wallet: Wallet
