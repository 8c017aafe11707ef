"""Holds: funds reserved for a pending operation, resolved exactly once.

open ──capture(amount ≤ held)──▶ captured   (the rest is released)
  ├───void──────────────────────▶ voided
  └───timeout───────────────────▶ expired
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from gpudeck.kit.errors import FailedPrecondition, InvalidArgument
from gpudeck.wallet.money import check_amount, format_micro
from gpudeck.wallet.text import check_label, check_text

if TYPE_CHECKING:
    from gpudeck.wallet.ledger import Wallet

MAX_TIMEOUT_SECONDS = 30 * 24 * 3600
DEFAULT_TIMEOUT_SECONDS = 15 * 60


@dataclass(frozen=True)
class Hold:
    id: uuid.UUID
    organization_id: uuid.UUID
    amount: int
    currency: str
    status: str
    captured: int
    description: str
    project_id: uuid.UUID | None
    resource_type: str
    resource_id: str
    created_at: datetime
    expires_at: datetime
    resolved_at: datetime | None
    transaction_id: uuid.UUID | None = None

    def to_json(self) -> dict[str, object]:
        return {
            k: (str(v) if v is not None and not isinstance(v, int) else v)
            for k, v in asdict(self).items()
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Hold:
        def uid(key: str) -> uuid.UUID | None:
            value = data.get(key)
            return uuid.UUID(str(value)) if value else None

        def ts(key: str) -> datetime | None:
            value = data.get(key)
            return datetime.fromisoformat(str(value)) if value else None

        return cls(
            id=uuid.UUID(str(data["id"])),
            organization_id=uuid.UUID(str(data["organization_id"])),
            amount=int(str(data["amount"])),
            currency=str(data["currency"]),
            status=str(data["status"]),
            captured=int(str(data["captured"])),
            description=str(data["description"]),
            project_id=uid("project_id"),
            resource_type=str(data["resource_type"]),
            resource_id=str(data["resource_id"]),
            created_at=ts("created_at"),  # type: ignore[arg-type]
            expires_at=ts("expires_at"),  # type: ignore[arg-type]
            resolved_at=ts("resolved_at"),
            transaction_id=uid("transaction_id"),
        )


@dataclass(frozen=True)
class HoldRequest:
    key: str
    organization_id: uuid.UUID
    amount: int
    timeout_seconds: int = DEFAULT_TIMEOUT_SECONDS
    description: str = ""
    project_id: uuid.UUID | None = None
    resource_type: str = ""
    resource_id: str = ""

    def validate(self) -> HoldRequest:
        if not self.key.strip():
            raise InvalidArgument("idempotency_key is required", field="idempotency_key")
        check_text(self.description, "description", max_length=1000)
        check_text(self.resource_id, "resource_id")
        if self.resource_type:
            check_label(self.resource_type, "resource_type")
        check_amount(self.amount)
        if not 0 < self.timeout_seconds <= MAX_TIMEOUT_SECONDS:
            raise InvalidArgument(
                f"timeout_seconds must be between 1 and {MAX_TIMEOUT_SECONDS}",
                field="timeout_seconds",
            )
        return self

    def fingerprint(self) -> bytes:
        payload = {"op": "hold.create", **{k: str(v) for k, v in asdict(self).items()}}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).digest()


def capture_fingerprint(hold_id: uuid.UUID, amount: int | None) -> bytes:
    return hashlib.sha256(f"hold.capture:{hold_id}:{amount}".encode()).digest()


def void_fingerprint(hold_id: uuid.UUID) -> bytes:
    return hashlib.sha256(f"hold.void:{hold_id}".encode()).digest()


def check_open(hold: Hold, now: datetime) -> None:
    """Refuse to resolve a hold that is resolved, or past its timeout (expired, even if the
    sweep that marks it so has not run yet)."""
    if hold.status != "open":
        raise FailedPrecondition(
            f"hold {hold.id} is already {hold.status}", field="hold_id", reason="HOLD_RESOLVED"
        )
    if hold.expires_at <= now:
        raise FailedPrecondition(
            f"hold {hold.id} expired at {hold.expires_at.isoformat()}",
            field="hold_id",
            reason="HOLD_EXPIRED",
        )


def capture_amount(hold: Hold, amount: int | None, now: datetime) -> int:
    """How much a capture takes: all when unset; never more than held, never 0 or less."""
    check_open(hold, now)
    if amount is None:
        return hold.amount
    if amount <= 0:  # a capture of nothing is a void (VoidHold)
        raise InvalidArgument(
            "amount must be positive (leave it out to capture all; VoidHold releases it all)",
            field="amount",
        )
    if amount > hold.amount:
        raise InvalidArgument(
            f"amount {format_micro(amount)} is more than the hold's {format_micro(hold.amount)}",
            field="amount",
        )
    return amount


def room_for_hold(
    wallet: Wallet, open_holds: Sequence[tuple[int, datetime]], ends: datetime, now: datetime
) -> tuple[int, datetime | None]:
    """How much a new hold ending at `ends` may reserve, and the time whose expiring credits
    made it less than spendable (None when none did).

    Money backs a hold only if it outlives it: cash does, a credit expiring at or before the
    hold's end does not (the sweep takes it while the hold is open). The holds fit when, for
    every time t a hold ends, the holds still open at t (ending at or after it) are no more
    than cash and the credits outliving t: the holds ending later can use fewer credits, so
    those are the only checks needed (Hall's condition for nested sets). A new hold adds itself
    to the checks at the times up to its end; the least room among them is its room. Counting
    every open hold against the credits outliving the new one refused a long hold that the
    cash backed, when a shorter one taken first was backed by credits.
    """
    expired = sum(c.balance for c in wallet.credits if c.expires_at and c.expires_at <= now)
    usable = wallet.balance - expired
    held = sum(a for a, _ in open_holds)
    room, short_at = usable - held, None  # spendable, expired credits aside
    # Only credits expiring by its end can fall short; without any, spendable is the room.
    # Else one pass over the times in order (a wallet may have thousands of open holds).
    expiring = sorted(
        (c.expires_at, c.balance)
        for c in wallet.credits
        if c.expires_at and now < c.expires_at <= ends
    )
    if not expiring:
        return room, short_at
    by_end = sorted((e, a) for a, e in open_holds if e <= ends)
    gone = ended = 0  # credits expired by t; holds ended before t
    c = h = 0
    for t in sorted({ends, *(e for e, _ in by_end)}):
        while c < len(expiring) and expiring[c][0] <= t:
            gone += expiring[c][1]
            c += 1
        while h < len(by_end) and by_end[h][0] < t:
            ended += by_end[h][1]
            h += 1
        at_t = usable - gone - (held - ended)
        if at_t < room:
            room, short_at = at_t, t
    return room, short_at
