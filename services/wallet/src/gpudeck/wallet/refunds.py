"""Where a refund goes: back where the organization's latest spending came from.

Charges and usage spend unexpired credits before cash, the first to expire first. A refund undoes
the latest spending that no earlier refund undid, newest first: the part that came out of cash
goes back to cash, the part that came out of a credit grant goes back to that grant (with its
expiry; a grant that has expired since loses it again at the next sweep). The wallet ends as if
the refunded amount had never been spent, so a refund never turns credits into cash. What no
spending covers goes to cash.

History is a sequence of legs, `(account id, signed amount)` on the organization's own accounts:
negative for what charges and usage drew, positive for what refunds gave back. Newest first, a
transaction's legs in the reverse of the order they were drawn (cash, drawn last, comes first).
"""

from __future__ import annotations

from collections.abc import Iterable

Leg = tuple[int, int]


def unspend(amount: int, history: Iterable[Leg]) -> tuple[list[Leg], int]:
    """The legs (account id, positive amount) a refund of `amount` gives back, by `history`
    (newest first), and what is left over for cash."""
    back: dict[int, int] = {}
    undone = 0  # what later refunds gave back and no spending older than them has matched yet
    left = amount
    for account_id, delta in history:
        if left == 0:
            break
        if delta > 0:
            undone += delta
            continue
        spent = -delta
        matched = min(spent, undone)
        undone -= matched
        take = min(spent - matched, left)
        if take:
            back[account_id] = back.get(account_id, 0) + take
            left -= take
    return list(back.items()), left
