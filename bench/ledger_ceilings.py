"""Reference points for bench_ledger, measured in the same run on the same database: what the
database work of a transfer costs with no Python and no gRPC in the way.

- `post_transfer_tps`: the SQL function a lone single transfer runs (`post_transfer`), driven by
  pgbench's C client like the baseline: the ceiling of the single path on this machine.
- `plain_copy_rate`: batches of the same transactions and postings written the plainest way
  (psycopg COPY and one set-based balance update per batch: no locks, checks, keys, rollups or
  events): the ceiling of the batch path, as the issue describes it.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from pathlib import Path

from psycopg_pool import AsyncConnectionPool

from bench import pgbench
from gpudeck.wallet.ids import uuid7

POST_TRANSFER_SCRIPT = """\\set n random(1, {orgs})
SELECT * FROM post_transfer(gen_random_uuid(), (SELECT id FROM public.bench_orgs WHERE n = :n),
    'topup', 1000, '', '', NULL, 'pod', '', '', md5(random()::text), NULL, 'bench', 'funding',
    false, md5(random()::text), 'wallet.topup.completed', '\\x00'::bytea, 'bench', 0);
"""


async def post_transfer_tps(
    pool: AsyncConnectionPool, url: str, orgs: list[uuid.UUID], *, seconds: float
) -> float:
    async with pool.connection() as conn, conn.transaction():
        await conn.execute("CREATE TABLE public.bench_orgs (n int PRIMARY KEY, id uuid NOT NULL)")
        await conn.execute(
            "INSERT INTO public.bench_orgs SELECT i, o FROM unnest(%s::uuid[]) WITH ORDINALITY"
            " AS x (o, i)",
            (orgs,),
        )
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "post_transfer.sql"
        script.write_text(POST_TRANSFER_SCRIPT.format(orgs=len(orgs)))
        tps = pgbench.tps(url, seconds, ["-n", "-f", str(script)], search_path="wallet,public")
    async with pool.connection() as conn, conn.transaction():
        await conn.execute("DROP TABLE public.bench_orgs")
        await conn.execute("DELETE FROM outbox")  # placeholder events: nobody is to get them
    return tps


async def plain_copy_rate(
    pool: AsyncConnectionPool, orgs: list[uuid.UUID], *, seconds: float, batch: int, callers: int
) -> float:
    """Transfers per second written as COPY + one set-based update per batch, `callers` at once
    (each on its own share of the organizations, as the gRPC batch bench does)."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT organization_id, cash_account_id FROM wallets WHERE organization_id = ANY(%s)"
            " ORDER BY organization_id",
            (orgs,),
        )
        cash = await cur.fetchall()
        cur = await conn.execute(
            "SELECT id FROM ledger_accounts WHERE kind = 'platform' AND platform_pool = 'funding:USD'"
            " ORDER BY id LIMIT %s",
            (callers,),
        )
        platforms = [row[0] for row in await cur.fetchall()]
    share = len(cash) // callers
    done = 0
    deadline = time.perf_counter() + seconds

    async def caller(i: int) -> None:
        nonlocal done
        mine, platform = cash[i * share : (i + 1) * share], platforms[i % len(platforms)]
        stamp = "2026-01-01 00:00:00+00"
        async with pool.connection() as conn:
            while time.perf_counter() < deadline:
                transactions, postings, deltas = [], [], dict.fromkeys((a for _, a in mine), 0)
                for j in range(batch):
                    _, account = mine[j % share]
                    org = mine[j % share][0]
                    tx = uuid7()
                    transactions.append(
                        f"{tx}\t{org}\ttopup\t1000\tUSD\t{uuid.uuid4().hex}\t0\t{stamp}\n"
                    )
                    postings.append(
                        f"{tx}\t{account}\t1000\t0\t1000\n{tx}\t{platform}\t-1000\t0\t-1000\n"
                    )
                    deltas[account] += 1000
                async with conn.transaction():
                    async with conn.cursor().copy(
                        "COPY transactions (id, organization_id, kind, amount, currency,"
                        " idempotency_key, balance_after, created_at) FROM STDIN"
                    ) as copy:
                        await copy.write("".join(transactions))
                    async with conn.cursor().copy(
                        "COPY postings (transaction_id, account_id, amount, balance_before,"
                        " balance_after) FROM STDIN"
                    ) as copy:
                        await copy.write("".join(postings))
                    ids = sorted(deltas)
                    await conn.execute(
                        "UPDATE ledger_accounts a SET balance = a.balance + d.x"
                        " FROM unnest(%s::bigint[], %s::bigint[]) AS d (id, x) WHERE a.id = d.id",
                        ([*ids, platform], [*(deltas[a] for a in ids), -1000 * batch]),
                    )
                done += batch

    started = time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(callers)))
    return done / (time.perf_counter() - started)
