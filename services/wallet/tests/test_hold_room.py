"""room_for_hold: how much a new hold may reserve when credits expire (Hall's condition over the
times holds end). Worked cases, and a check against brute force on random small wallets."""

from __future__ import annotations

import itertools
import random
import uuid
from datetime import UTC, datetime, timedelta

from gpudeck.wallet.holds import room_for_hold
from gpudeck.wallet.ledger import Account, Wallet

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def at(minutes: int) -> datetime:
    return NOW + timedelta(minutes=minutes)


def wallet(cash: int, credits: list[tuple[int, int | None]], held: int = 0) -> Wallet:
    accounts = [
        Account(i + 2, amount, "credit", at(m) if m is not None else None)
        for i, (amount, m) in enumerate(credits)
    ]
    total = sum(a for a, _ in credits)
    return Wallet(uuid.uuid4(), "USD", Account(1, cash), accounts, cash + total, total, held)


def test_a_long_hold_behind_a_short_one_is_backed_by_cash() -> None:
    w = wallet(100, [(100, 30)], held=100)
    assert room_for_hold(w, [(100, at(10))], at(60), NOW) == (100, None)


def test_credits_expiring_first_do_not_back_it_and_say_when() -> None:
    w = wallet(2, [(4, 5), (3, 24 * 60)])
    assert room_for_hold(w, [], at(60), NOW) == (5, at(60))
    assert room_for_hold(w, [], at(1), NOW) == (9, None)


def test_credits_already_expired_count_for_nothing() -> None:
    w = wallet(10, [(50, -1)])
    assert room_for_hold(w, [], at(1), NOW) == (10, None)


def feasible(cash: int, credits: list[tuple[int, int]], holds: list[tuple[int, int]]) -> bool:
    """Brute force: can each hold be paid by cash and credits expiring after it ends, with no
    unit used twice? (Every unit assignment, for tiny amounts.)"""
    units = ["cash"] * cash + [ends for amount, ends in credits for _ in range(amount)]
    need = [ends for amount, ends in holds for _ in range(amount)]
    if len(need) > len(units):
        return False
    for chosen in itertools.permutations(range(len(units)), len(need)):
        if all(units[u] == "cash" or units[u] > h for u, h in zip(chosen, need, strict=True)):
            return True
    return False


def test_the_room_is_exactly_what_fits() -> None:
    rng = random.Random(3)
    for _ in range(150):
        cash = rng.randrange(0, 3)
        credits = [(rng.randrange(1, 3), rng.choice([10, 20, 30])) for _ in range(rng.randrange(3))]
        holds: list[tuple[int, int]] = []
        for _ in range(rng.randrange(3)):  # holds that fit, taken one by one
            h = (rng.randrange(1, 3), rng.choice([5, 15, 25, 35]))
            if feasible(cash, credits, [*holds, h]):
                holds.append(h)
        ends = rng.choice([5, 15, 25, 35])
        w = wallet(cash, [(a, m) for a, m in credits], held=sum(a for a, _ in holds))
        room, _ = room_for_hold(w, [(a, at(m)) for a, m in holds], at(ends), NOW)
        fits = [n for n in range(0, 7) if feasible(cash, credits, [*holds, (n, ends)])]
        assert room == max(fits), (cash, credits, holds, ends, room)
