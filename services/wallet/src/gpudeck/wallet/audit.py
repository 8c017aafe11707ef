"""Ledger invariants, checked from the rows: what must hold whatever happened before.

`check(conn)` returns a line per violation (empty when the books are sound); the concurrency and
crash tests assert it is empty. Operators run `python -m gpudeck.wallet.audit` (with
GPUDECK_DATABASE_URL): exit 0 when sound, 1 with a line per violation.
"""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection

CHECKS = {
    "postings of a transaction sum to zero": """
        SELECT transaction_id::text FROM postings GROUP BY transaction_id HAVING sum(amount) <> 0
    """,
    "an account's balance equals the sum of its postings": """
        SELECT a.code FROM ledger_accounts a
        LEFT JOIN (SELECT account_id, sum(amount) AS total FROM postings GROUP BY account_id) p
               ON p.account_id = a.id
        WHERE a.balance <> coalesce(p.total, 0)
    """,
    "each posting starts where the account's previous one ended": """
        SELECT account_id::text FROM (
            SELECT account_id, balance_before,
                   lag(balance_after, 1, 0::bigint) OVER (PARTITION BY account_id ORDER BY id) AS prev
            FROM postings) chain
        WHERE balance_before <> prev
    """,
    "a wallet's balance is its cash plus its credits": """
        SELECT w.organization_id::text FROM wallets w
        JOIN (SELECT organization_id, sum(balance) AS total,
                     sum(balance) FILTER (WHERE kind = 'credit') AS credits
              FROM ledger_accounts WHERE organization_id IS NOT NULL GROUP BY organization_id) a
          ON a.organization_id = w.organization_id
        WHERE w.balance <> a.total OR w.credits <> coalesce(a.credits, 0)
    """,
    "a wallet's held balance is the sum of its open holds": """
        SELECT w.organization_id::text FROM wallets w
        LEFT JOIN (SELECT organization_id, sum(amount) AS held FROM holds
                   WHERE status = 'open' GROUP BY organization_id) h
          ON h.organization_id = w.organization_id
        WHERE w.held_balance <> coalesce(h.held, 0)
    """,
    "a hold resolves once: one voided or expired has no capture": """
        SELECT h.id::text FROM holds h
        WHERE h.status IN ('voided', 'expired') AND (h.captured <> 0 OR h.transaction_id IS NOT NULL
           OR EXISTS (SELECT 1 FROM transactions t WHERE t.organization_id = h.organization_id
                      AND t.idempotency_key = 'hold:' || h.id || ':capture'))
    """,
    "a hold's charge is its one capture": """
        SELECT t.id::text FROM transactions t
        JOIN holds h ON t.idempotency_key = 'hold:' || h.id || ':capture'
        WHERE h.status <> 'captured' OR h.transaction_id IS DISTINCT FROM t.id
    """,
    "a transaction has postings": """
        SELECT t.id::text FROM transactions t
        WHERE NOT EXISTS (SELECT 1 FROM postings p WHERE p.transaction_id = t.id)
    """,
    "a captured hold has its charge, no more than it held": """
        SELECT h.id::text FROM holds h LEFT JOIN transactions t ON t.id = h.transaction_id
        WHERE h.status = 'captured' AND h.captured > 0
          AND (t.id IS NULL OR t.amount <> h.captured OR h.captured > h.amount)
    """,
}


async def check(conn: AsyncConnection[Any]) -> list[str]:
    """Every violated invariant with up to five offending rows."""
    problems: list[str] = []
    for name, query in CHECKS.items():
        cur = await conn.execute(query + " LIMIT 5")  # type: ignore[arg-type]
        rows = [str(r[0]) for r in await cur.fetchall()]
        if rows:
            problems.append(f"{name}: violated by {', '.join(rows)}")
    return problems


async def _main() -> int:
    """`python -m gpudeck.wallet.audit`: check the books of GPUDECK_DATABASE_URL's wallet schema;
    exit 0 when sound, 1 with a line per violation, 2 when it cannot be reached or is unset."""
    import os
    import sys

    import psycopg

    from gpudeck.kit.config import ConfigError, database_url

    try:
        url = database_url(os.environ)
        conn = await psycopg.AsyncConnection.connect(url, options="-c search_path=wallet,public")
    except (ConfigError, psycopg.Error) as exc:
        print(f"gpudeck.wallet.audit: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    async with conn:
        cur = await conn.execute("SELECT to_regclass('postings') IS NOT NULL")
        if not (await cur.fetchone() or (False,))[0]:
            print("gpudeck.wallet.audit: this database has no wallet schema", file=sys.stderr)
            return 2
        problems = await check(conn)
    for problem in problems:
        print(problem)
    if not problems:
        print("the books are sound: every invariant holds")
    return 1 if problems else 0


if __name__ == "__main__":
    import asyncio

    raise SystemExit(asyncio.run(_main()))
