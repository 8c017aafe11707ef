"""Balance levels and their edges: ok → warning → critical → depleted, and back.

A level is computed from the balance, the run rate and the organization's thresholds; an event is
emitted only when the level changes (edges, not levels): wallet.balance.warning, .critical,
.depleted, or .recovered when it returns to ok.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

SERVICE_STATUS = {
    "ok": "available",
    "warning": "warning",
    "critical": "critical",
    "depleted": "paused",
}


@dataclass(frozen=True)
class Thresholds:
    warning_amount: int = 0  # micro-units; 0 = not set
    critical_amount: int = 0
    warning_hours: float = 0.0  # hours remaining; 0 = not set
    critical_hours: float = 0.0


def hours_remaining(balance: int, run_rate: int) -> float | None:
    """Balance ÷ hourly run rate; None when nothing runs."""
    if run_rate <= 0:
        return None
    return max(balance, 0) / run_rate


def level_for(balance: int, run_rate: int, thresholds: Thresholds, depletion_seconds: float) -> str:
    """The level of a wallet: depleted when the balance covers less than `depletion_seconds` of
    the run rate, or is below zero (overdrawn by metered usage, even with nothing running now);
    critical / warning when under an amount or hours-remaining threshold."""
    if balance < 0 or (run_rate > 0 and balance * 3600 < run_rate * depletion_seconds):
        return "depleted"
    hours = hours_remaining(balance, run_rate)

    def under(amount: int, limit_hours: float) -> bool:
        if amount and balance < amount:
            return True
        return bool(limit_hours and hours is not None and hours < limit_hours)

    if under(thresholds.critical_amount, thresholds.critical_hours):
        return "critical"
    if under(thresholds.warning_amount, thresholds.warning_hours):
        return "warning"
    return "ok"


def edge_event(previous: str, current: str) -> str | None:
    """The event type announcing a move from `previous` to `current`, or None if none moved."""
    if previous == current:
        return None
    return "wallet.balance.recovered" if current == "ok" else f"wallet.balance.{current}"


def crossed_by(moves: Sequence[tuple[int, str]], level_of: Callable[[int], str]) -> str:
    """Who moved a wallet to the level it ends at, of its `moves` in order (balance after,
    who): the one from whose move on the level stays the final one ("" for no moves). Several
    callers' transfers to one wallet may commit together; the edge names the one that crossed."""
    who = ""
    final = None
    for balance, mover in reversed(moves):
        level = level_of(balance)
        if final is None:
            final = level
        elif level != final:
            break
        who = mover
    return who
