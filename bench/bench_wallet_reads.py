"""Dashboard reads on a long history, through the wallet's real gRPC server (a child process).

1. "Wallet card load" = GetWalletSummary + GetExpenditure + GetSpendingTrend(7 days), called one
   after the other, for an organization with 1,000,000 ledger entries (1,000,000 transactions on
   its cash account, 2,000,000 postings, over 90 days, five resource types, 2,000 resources, with
   the rollups the ledger keeps) → p50/p95; goal
   p95 < 20 ms. Baseline in the same run: the same calls for an organization with 100 entries;
   the ratio 1M/100 shows whether the read cost grows with history (≈ 1 when it does not).
2. GetUsageAnalytics for an organization with 500,000 usage events (90 days, with the hourly,
   daily and all-time rollups the wallet keeps) vs one with 100 events, the same way (no goal in
   the issue: reported for the record).

History is written with COPY (transactions, postings, usage events) and the rollups are derived
from it with set-based SQL, so the read model matches the ledger it sums. Rounds alternate
between the two organizations so machine noise hits both alike.

Env: GPUDECK_BENCH_DATABASE_URL (a database is created and dropped), GPUDECK_BENCH_NATS_URL,
GPUDECK_BENCH_ENTRIES (default 1,000,000). Run: `python -m bench wallet_reads` or
`python bench/bench_wallet_reads.py`.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from psycopg_pool import AsyncConnectionPool

from bench.wallet_setup import TOKEN, make_orgs, scratch_database, wallet_pool, wallet_process
from gpudeck.kit.grpcclient import channel
from gpudeck.proto.wallet.v1 import wallet_pb2 as pb
from gpudeck.proto.wallet.v1.wallet_pb2_grpc import WalletServiceStub

ENTRIES = int(os.environ.get("GPUDECK_BENCH_ENTRIES", "1000000"))
BASELINE_ENTRIES = 100
USAGE_EVENTS = max(ENTRIES // 2, 100)
DAYS = 90
RESOURCES = 2000
GOAL_P95_MS = 20.0
ROUNDS, LOADS_PER_ROUND, WARMUP = 6, 100, 30
CHUNK = 20_000
TYPES = ("pod", "pod", "pod", "vm", "vm", "nfs_volume", "object_storage", "api")
# model → (provider, region) pairs serving it, and its api: about 15 combinations, like a router.
MODELS = {
    "llama-3-70b": ([("p-alpha", "in-west"), ("p-beta", "us-east")], "chat"),
    "llama-3-8b": ([("p-alpha", "in-west"), ("p-gamma", "eu-central")], "chat"),
    "mistral-large": ([("p-beta", "us-east")], "chat"),
    "qwen-2.5-72b": ([("p-gamma", "eu-central"), ("p-alpha", "in-south")], "chat"),
    "deepseek-v3": ([("p-delta", "in-west"), ("p-beta", "us-west")], "chat"),
    "bge-m3": ([("p-alpha", "in-west")], "embeddings"),
    "whisper-large": ([("p-gamma", "eu-central"), ("p-delta", "in-west")], "audio"),
}


def time_uuid(ms: int, rnd: int) -> str:
    """A version-7 layout UUID for `ms`, as text (like gpudeck.wallet.ids.uuid7, any time)."""
    h = f"{ms:012x}7{(rnd >> 62) & 0xFFF:03x}{(0b10 << 62) | (rnd & ((1 << 62) - 1)):016x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@dataclass
class Chain:
    """An account's running balance, for postings that chain (before → after)."""

    id: int
    balance: int = 0

    def move(self, amount: int) -> tuple[int, int]:
        before = self.balance
        self.balance += amount
        return before, self.balance


def history(
    org: uuid.UUID, n: int, cash: Chain, revenue: Chain, funding: Chain
) -> Iterator[tuple[str, str]]:
    """`n` transactions over the last 90 days, oldest first: (transaction line, postings lines)."""
    rng = random.Random(n)
    now_ms = int(time.time() * 1000) - 60_000
    span = DAYS * 86_400_000
    times = sorted(now_ms - rng.randrange(span) for _ in range(n))
    for i, ms in enumerate(times):
        if i == 0 or rng.random() < 0.01:
            kind, amount, rtype, rid = "topup", rng.randrange(10**9, 10**11), "", ""
            other = funding
        else:
            kind = "usage" if rng.random() < 0.96 else "charge"
            rtype = rng.choice(TYPES)
            rid = f"{rtype}-{rng.randrange(RESOURCES)}"
            amount, other = -rng.randrange(1_000, 5_000_000), revenue
        before, after = cash.move(amount)
        o_before, o_after = other.move(-amount)
        tx = time_uuid(ms, rng.getrandbits(74))
        at = datetime.fromtimestamp(ms / 1000, UTC).isoformat()
        tx_line = (
            f"{tx}\t{org}\t{kind}\t{abs(amount)}\tUSD\t\\N\t\\N\t\\N\tbench\t\\N\t{rtype}\t{rid}"
            f"\t\tbench-{i}\tsystem\t{after}\t{at}\n"
        )
        postings = (
            f"{tx}\t{cash.id}\t{amount}\t{before}\t{after}\n"
            f"{tx}\t{other.id}\t{-amount}\t{o_before}\t{o_after}\n"
        )
        yield tx_line, postings


def usage_events(org: uuid.UUID, n: int) -> Iterator[str]:
    rng = random.Random(-n)
    now = time.time() - 60
    names = list(MODELS)
    for i in range(n):
        model = rng.choice(names)
        servers, api = MODELS[model]
        provider, region = rng.choice(servers)
        dims = json.dumps({"model": model, "provider": provider, "region": region, "api": api})
        quantity = float(rng.randrange(50, 8000))
        price = 2_000_000
        at = datetime.fromtimestamp(now - rng.random() * DAYS * 86_400, UTC).isoformat()
        ok = "t" if rng.random() < 0.98 else "f"
        cost = round(quantity * price / 1_000_000)
        yield (
            f"ev-{org}-{i}\t{org}\t\\N\ttokens\t{quantity}\t{price}\t{cost}\t{dims}\t{ok}"
            f"\t{rng.randrange(80, 2500)}\t{at}\t\\N\n"
        )


async def copy_history(pool: AsyncConnectionPool, rows: Iterator[tuple[str, str]]) -> None:
    """COPY transactions and their postings side by side, on two connections."""
    async with (
        pool.connection() as tx_conn,
        pool.connection() as posting_conn,
        tx_conn.transaction(),
        posting_conn.transaction(),
        tx_conn.cursor().copy(COPY_TRANSACTIONS) as transactions,
        posting_conn.cursor().copy(COPY_POSTINGS) as postings,
    ):
        tx_chunk: list[str] = []
        posting_chunk: list[str] = []
        for tx_line, posting_lines in rows:
            tx_chunk.append(tx_line)
            posting_chunk.append(posting_lines)
            if len(tx_chunk) >= CHUNK:
                await transactions.write("".join(tx_chunk))
                await postings.write("".join(posting_chunk))
                tx_chunk.clear()
                posting_chunk.clear()
        await transactions.write("".join(tx_chunk))
        await postings.write("".join(posting_chunk))


async def copy_lines(pool: AsyncConnectionPool, sql: str, lines: Iterator[str]) -> None:
    async with pool.connection() as conn, conn.transaction():
        async with conn.cursor().copy(sql) as copy:
            chunk: list[str] = []
            for line in lines:
                chunk.append(line)
                if len(chunk) >= CHUNK:
                    await copy.write("".join(chunk))
                    chunk.clear()
            if chunk:
                await copy.write("".join(chunk))


COPY_TRANSACTIONS = (
    "COPY transactions (id, organization_id, kind, amount, currency, payment_amount,"
    " payment_currency, exchange_rate, description, project_id, resource_type, resource_id,"
    " reference, idempotency_key, actor, balance_after, created_at) FROM STDIN"
)
COPY_POSTINGS = (
    "COPY postings (transaction_id, account_id, amount, balance_before, balance_after) FROM STDIN"
)
# The rollups as the ledger keeps them, derived from what was written.
DAILY_SPEND = """
INSERT INTO daily_spend (organization_id, day, resource_type, amount)
SELECT organization_id, (created_at AT TIME ZONE 'UTC')::date, resource_type, sum(amount)
FROM transactions WHERE organization_id = %(org)s AND kind IN ('usage', 'charge')
GROUP BY 1, 2, 3
"""
RESOURCE_COSTS = """
INSERT INTO resource_costs (organization_id, resource_id, resource_type, total,
                            first_charged_at, last_charged_at)
SELECT organization_id, resource_id, min(resource_type), sum(amount), min(created_at),
       max(created_at)
FROM transactions WHERE organization_id = %(org)s AND kind IN ('usage', 'charge')
GROUP BY 1, 2
"""
USAGE_HOURLY = """
INSERT INTO usage_hourly (organization_id, hour, meter, model, provider, region, api, calls,
                          errors, quantity, cost, latency_ms_sum, latency_calls)
SELECT organization_id, date_trunc('hour', at), meter, dimensions->>'model',
       dimensions->>'provider', dimensions->>'region', dimensions->>'api', count(*),
       count(*) FILTER (WHERE NOT success), sum(quantity), sum(cost), sum(latency_ms),
       count(*) FILTER (WHERE latency_ms > 0)
FROM usage_events WHERE organization_id = %(org)s
GROUP BY 1, 2, 3, 4, 5, 6, 7
"""
# What the trigger on usage_hourly (migration 006) adds up row by row, derived in one pass each;
# the trigger is off while the history is loaded.
USAGE_DAILY = """
INSERT INTO usage_daily (organization_id, day, meter, model, calls, errors, quantity, cost)
SELECT organization_id, (hour AT TIME ZONE 'UTC')::date, meter, model, sum(calls), sum(errors),
       sum(quantity), sum(cost)
FROM usage_hourly WHERE organization_id = %(org)s
GROUP BY 1, 2, 3, 4
"""
USAGE_TOTALS = """
INSERT INTO usage_totals (organization_id, meter, dimension, value, calls, errors, quantity, cost)
SELECT h.organization_id, h.meter, v.dimension, v.value, sum(h.calls), sum(h.errors),
       sum(h.quantity), sum(h.cost)
FROM usage_hourly h
CROSS JOIN LATERAL (VALUES ('api', h.api), ('model', h.model), ('provider', h.provider),
                           ('region', h.region)) AS v (dimension, value)
WHERE h.organization_id = %(org)s AND v.value <> ''
GROUP BY 1, 2, 3, 4
"""


async def build(pool: AsyncConnectionPool, org: uuid.UUID, entries: int, events: int) -> None:
    """Give `org` a ledger of `entries` transactions, `events` usage events, and their rollups."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT a.id, a.balance FROM wallets w"
            " JOIN ledger_accounts a ON a.id = w.cash_account_id WHERE w.organization_id = %s",
            (org,),
        )
        row = await cur.fetchone()
        assert row is not None
        cash = Chain(row[0], row[1])
        platform: dict[str, Chain] = {}
        for name in ("revenue", "funding"):
            cur = await conn.execute(
                "SELECT id, balance FROM ledger_accounts WHERE platform_pool = %s"
                " ORDER BY id LIMIT 1",
                (f"{name}:USD",),
            )
            found = await cur.fetchone()
            assert found is not None
            platform[name] = Chain(found[0], found[1])
    await copy_history(pool, history(org, entries, cash, platform["revenue"], platform["funding"]))
    await copy_lines(
        pool,
        "COPY usage_events (event_id, organization_id, project_id, meter, quantity, unit_price,"
        " cost, dimensions, success, latency_ms, at, transaction_id) FROM STDIN",
        usage_events(org, events),
    )
    async with pool.connection() as conn, conn.transaction():
        await conn.execute("ALTER TABLE usage_hourly DISABLE TRIGGER usage_hourly_rolls_up")
        for rollup in (DAILY_SPEND, RESOURCE_COSTS, USAGE_HOURLY, USAGE_DAILY, USAGE_TOTALS):
            await conn.execute(rollup, {"org": org})
        await conn.execute("ALTER TABLE usage_hourly ENABLE TRIGGER usage_hourly_rolls_up")
        for chain in (cash, *platform.values()):
            await conn.execute(
                "UPDATE ledger_accounts SET balance = %s WHERE id = %s", (chain.balance, chain.id)
            )
        await conn.execute(
            "UPDATE wallets SET balance = %s WHERE organization_id = %s", (cash.balance, org)
        )


async def open_meters(stub: WalletServiceStub, org: uuid.UUID) -> None:
    for i, (rtype, rate) in enumerate([("pod", 3_600_000), ("vm", 900_000), ("nfs_volume", 5_000)]):
        await stub.OpenMeter(
            pb.OpenMeterRequest(
                meter_id=f"bench:{org}:{i}",
                organization_id=str(org),
                resource_id=f"{rtype}-{i}",
                resource_type=rtype,
                hourly_rate=rate,
            ),
            timeout=10,
        )


Load = Callable[[WalletServiceStub, str], Awaitable[None]]


async def wallet_card(stub: WalletServiceStub, org: str) -> None:
    await stub.GetWalletSummary(pb.GetWalletSummaryRequest(organization_id=org), timeout=5)
    await stub.GetExpenditure(pb.GetExpenditureRequest(organization_id=org), timeout=5)
    await stub.GetSpendingTrend(pb.GetSpendingTrendRequest(organization_id=org, days=7), timeout=5)


async def usage_dashboard(stub: WalletServiceStub, org: str) -> None:
    await stub.GetUsageAnalytics(pb.GetUsageAnalyticsRequest(organization_id=org), timeout=5)


async def measure(
    stub: WalletServiceStub, load: Load, orgs: dict[str, uuid.UUID]
) -> dict[str, list[float]]:
    """Milliseconds per load for each organization, rounds alternating between them."""
    for org in orgs.values():
        for _ in range(WARMUP):
            await load(stub, str(org))
    times: dict[str, list[float]] = {name: [] for name in orgs}
    for _ in range(ROUNDS):
        for name, org in orgs.items():
            for _ in range(LOADS_PER_ROUND):
                started = time.perf_counter()
                await load(stub, str(org))
                times[name].append((time.perf_counter() - started) * 1000)
    return times


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def report(title: str, times: dict[str, list[float]], goal: float | None) -> None:
    small, big = times["small"], times["big"]
    print(f"{title} — {len(big)} loads per organization")
    for name, entries in (("small", BASELINE_ENTRIES), ("big", ENTRIES)):
        t = times[name]
        print(f"  {entries:>9,} entries : p50 {p(t, 50):6.2f} ms   p95 {p(t, 95):6.2f} ms")
    ratio50, ratio95 = p(big, 50) / p(small, 50), p(big, 95) / p(small, 95)
    print(
        f"  ratio big/small     : p50 {ratio50:5.2f}x   p95 {ratio95:5.2f}x  "
        + ("(about 1: no growth)" if ratio95 < 1.5 else "(grows with history)")
    )
    if goal is not None:
        verdict = "meets" if p(big, 95) < goal else "MISSES"
        print(
            f"  p95 / goal          : {p(big, 95):.2f} / {goal:.0f} ms = {p(big, 95) / goal:.2f}"
            f"  ({verdict} p95 < {goal:.0f} ms)"
        )


async def run() -> None:
    async with scratch_database("gpudeck_bench_reads") as url:
        pool = await wallet_pool(url)
        try:
            big, small = await make_orgs(pool, 2)
            started = time.perf_counter()
            await build(pool, big, ENTRIES, USAGE_EVENTS)
            await build(pool, small, BASELINE_ENTRIES, BASELINE_ENTRIES)
            async with pool.connection() as conn:
                await conn.execute("ANALYZE")
            print(
                f"history: {ENTRIES:,} + {BASELINE_ENTRIES} transactions, {USAGE_EVENTS:,} +"
                f" {BASELINE_ENTRIES} usage events written in {time.perf_counter() - started:.1f} s"
            )
            async with wallet_process(url) as address, channel(address, TOKEN) as ch:
                stub = WalletServiceStub(ch)
                for org in (big, small):
                    await open_meters(stub, org)
                orgs = {"big": big, "small": small}
                report(
                    "wallet card (summary + expenditure + 7-day trend)",
                    await measure(stub, wallet_card, orgs),
                    GOAL_P95_MS,
                )
                report("usage analytics", await measure(stub, usage_dashboard, orgs), None)
        finally:
            await pool.close()


def main() -> None:
    asyncio.run(run())


if __name__ == "__main__":
    main()
