"""What the wallet's servicers and workers share: the pool, the stores and the settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from psycopg_pool import AsyncConnectionPool

from gpudeck.wallet.group_commit import GroupCommit
from gpudeck.wallet.holds_store import HoldStore
from gpudeck.wallet.ledger_store import LedgerStore, Policy
from gpudeck.wallet.metering_store import MeterStore
from gpudeck.wallet.settings import WalletSettings


@dataclass
class Wallet:
    pool: AsyncConnectionPool
    settings: WalletSettings = field(default_factory=WalletSettings)
    ledger: LedgerStore = field(init=False)
    holds: HoldStore = field(init=False)
    meters: MeterStore = field(init=False)
    transfers: GroupCommit = field(init=False)

    def __post_init__(self) -> None:
        self.ledger = LedgerStore(
            policy=Policy(
                depletion_seconds=self.settings.depletion_seconds,
                kyc_limits=self.settings.kyc_limits,
            )
        )
        self.holds = HoldStore(self.ledger)
        self.meters = MeterStore(self.ledger)
        self.transfers = GroupCommit(self.pool, self.ledger)
