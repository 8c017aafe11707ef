"""Migration 023 on a database with usage recorded before it: quantities kept as exact decimals,
without changing what an event said (a retry of it is still a replay)."""

from __future__ import annotations

import shutil
import uuid
from decimal import Decimal
from pathlib import Path

from databases import MIGRATIONS, fresh_database

from gpudeck.kit.db import migrate, open_pool
from gpudeck.kit.runtime import KIT_MIGRATIONS
from gpudeck.wallet.ledger_store import LedgerStore, open_wallet
from gpudeck.wallet.usage import UsageEvent
from gpudeck.wallet.usage_store import UsageStore

THIRD = 1 / 3  # 0.3333333333333333: 16 digits, one more than a cast of double precision keeps


async def test_an_event_recorded_before_023_is_still_replayed_after_it(
    pg_server_url: str, run_id: str, tmp_path: Path
) -> None:
    before = tmp_path / "before"
    before.mkdir()
    for path in sorted(MIGRATIONS.glob("*.sql")):
        if int(path.name.split("_", 1)[0]) < 23:
            shutil.copy(path, before / path.name)
    with fresh_database(pg_server_url, f"gpudeck_test_{run_id}_usage_023") as url:
        pool = await open_pool(url, min_size=1, max_size=2, schema="wallet")
        try:
            await migrate(pool, "wallet", KIT_MIGRATIONS, table="kit_migrations")
            await migrate(pool, "wallet", before)
            org, user = uuid.uuid4(), uuid.uuid4()
            async with pool.connection() as conn, conn.transaction():
                await conn.execute("INSERT INTO users (id, email) VALUES (%s, 'u@x')", (user,))
                await conn.execute(
                    "INSERT INTO organizations (id, name, owner_user_id, currency)"
                    " VALUES (%s, 'Acme', %s, 'USD')",
                    (org, user),
                )
                await open_wallet(conn, org, "USD")
                # As the code before 023 recorded them: quantities as double precision, their
                # hourly sum drifting (0.1 + 0.2).
                await conn.execute(
                    "INSERT INTO usage_events (event_id, organization_id, meter, quantity,"
                    " unit_price, cost, at) VALUES ('old', %s, 'tokens', %s, 0, 0, now())",
                    (org, THIRD),
                )
                await conn.execute(
                    "INSERT INTO usage_hourly (organization_id, hour, meter, model, calls,"
                    " quantity) VALUES (%s, date_trunc('hour', now()), 'tokens', 'm', 2, %s)",
                    (org, 0.1 + 0.2),
                )
            assert await migrate(pool, "wallet", MIGRATIONS) == [23]
            async with pool.connection() as conn:
                cur = await conn.execute("SELECT quantity FROM usage_events")
                assert await cur.fetchall() == [(Decimal(repr(THIRD)),)]
                cur = await conn.execute("SELECT quantity FROM usage_daily")
                assert await cur.fetchall() == [(Decimal("0.3"),)]  # the drift undone
            retry = UsageEvent("old", org, "tokens", THIRD, 0)
            async with pool.connection() as conn, conn.transaction():
                first = await UsageStore(LedgerStore()).record(conn, retry)
            assert first.event.quantity == THIRD  # a replay, not "already used"
        finally:
            await pool.close()
