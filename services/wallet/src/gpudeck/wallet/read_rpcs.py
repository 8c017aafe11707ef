"""gRPC ⇄ domain for what dashboards read, usage records, exchange rates, alerts settings."""

from __future__ import annotations

from gpudeck.wallet.deps import Wallet


class ReadRpcs:
    wallet: Wallet
