from __future__ import annotations

import asyncio
from datetime import date, timedelta
from pathlib import Path

import pytest

from gpudeck.kit.db import DatabaseUnavailable, migrate, open_pool, refused_for_good


def write(folder: Path, name: str, text: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)


async def test_migrations_apply_once_in_order(
    database_url: str, unique: str, tmp_path: Path
) -> None:
    write(tmp_path, "001_things.sql", "CREATE TABLE things (id int PRIMARY KEY);")
    write(tmp_path, "002_more.sql", "ALTER TABLE things ADD COLUMN name text;")
    pool = await open_pool(database_url, min_size=1, max_size=2)
    try:
        assert await migrate(pool, unique, tmp_path) == [1, 2]
        assert await migrate(pool, unique, tmp_path) == []
        async with pool.connection() as conn:
            await conn.execute(f"INSERT INTO {unique}.things (id, name) VALUES (1, 'a')")
    finally:
        await pool.close()


async def test_two_replicas_migrating_at_once_apply_each_file_once(
    database_url: str, unique: str, tmp_path: Path
) -> None:
    write(tmp_path, "001_things.sql", "CREATE TABLE things (id int PRIMARY KEY);")
    pools = [await open_pool(database_url, min_size=1, max_size=1) for _ in range(2)]
    try:
        results = await asyncio.gather(*(migrate(p, unique, tmp_path) for p in pools))
        assert sorted(results) == [[], [1]]
    finally:
        for p in pools:
            await p.close()


async def test_a_failing_migration_leaves_nothing_applied(
    database_url: str, unique: str, tmp_path: Path
) -> None:
    write(tmp_path, "001_ok.sql", "CREATE TABLE ok (id int);")
    write(tmp_path, "002_bad.sql", "CREATE TABLE broken (id nosuchtype);")
    pool = await open_pool(database_url, min_size=1, max_size=1)
    try:
        with pytest.raises(Exception, match="nosuchtype"):
            await migrate(pool, unique, tmp_path)
        async with pool.connection() as conn:
            cur = await conn.execute(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = %s", (unique,)
            )
            assert (await cur.fetchone()) == (0,)
    finally:
        await pool.close()


async def test_unreachable_database_names_the_cause() -> None:
    with pytest.raises(DatabaseUnavailable, match=r"127\.0\.0\.1"):
        await open_pool("postgresql://postgres@127.0.0.1:1/none", timeout=2)


async def test_times_come_back_in_utc_whatever_the_client_s_time_zone(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The services print times as UTC (an invoice's dates): a session in another time zone
    (PGTZ here; a server's own setting alike) dated a 01:30 UTC invoice the day before."""
    monkeypatch.setenv("PGTZ", "America/New_York")
    pool = await open_pool(database_url, min_size=1, max_size=1)
    try:
        async with pool.connection() as conn:
            cur = await conn.execute("SELECT '2025-07-01 01:30:00+00'::timestamptz")
            row = await cur.fetchone()
    finally:
        await pool.close()
    assert row is not None
    assert row[0].utcoffset() == timedelta(0) and row[0].date() == date(2025, 7, 1)


@pytest.mark.parametrize(
    ("reason", "for_good"),
    [
        ('connection failed: ... failed: FATAL:  database "x" does not exist', True),
        ('connection failed: ... failed: FATAL:  role "x" does not exist', True),
        ("connection failed: ... failed: FATAL:  password authentication failed", True),
        ("connection failed: connection timeout expired", True),
        ("connection failed: ... failed: Connection refused", False),
        ("connection failed: ... failed: FATAL:  the database system is starting up", False),
        ("connection failed: ... failed: FATAL:  sorry, too many clients already", False),
        # A standby being promoted (hot_standby off), or not yet consistent
        ("connection failed: ... FATAL:  the database system is not accepting connections", False),
        (
            "connection failed: ... FATAL:  the database system is not yet accepting connections",
            False,
        ),
        # A role that is no superuser, at the limit (it exited 2 where it waited for a slot)
        (
            "connection failed: ... failed: FATAL:  remaining connection slots are reserved for"
            " non-replication superuser connections",
            False,
        ),
    ],
)
def test_what_no_retry_mends_fails_at_once(reason: str, for_good: bool) -> None:
    assert refused_for_good(reason) is for_good
