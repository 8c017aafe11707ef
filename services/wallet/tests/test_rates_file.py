"""Exchange rates from a file an operator keeps (GPUDECK_RATES_FILE): parsed strictly, imported
by the running wallet when the file changes, and a missing file is a one-line configuration
error with exit code 2."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
from processes import start_wallet, wait_serving, wallet_env
from psycopg_pool import AsyncConnectionPool

from gpudeck.kit.config import EventsConfig
from gpudeck.wallet.deps import Wallet
from gpudeck.wallet.rates_file import FileRateProvider, RatesFileError, parse
from gpudeck.wallet.readmodels_store import import_rates
from gpudeck.wallet.workers import import_provider_rates

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_a_rates_file_is_parsed_with_its_time_or_the_files() -> None:
    [rate] = parse(
        '{"as_of": "2020-05-01T10:00:00Z", "rates": {"USD/INR": "83.25"}}', default_as_of=NOW
    )
    assert (rate.base, rate.quote, rate.rate) == ("USD", "INR", Decimal("83.25"))
    assert rate.as_of == datetime(2020, 5, 1, 10, tzinfo=UTC)
    [rate] = parse('{"rates": {"INR/USD": 0.012}}', default_as_of=NOW)
    assert rate.as_of == NOW and rate.rate == Decimal("0.012")


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("not json", "not JSON"),
        ('{"USD/INR": "83"}', "expected"),
        ('{"rates": {"USD/EUR": "1"}}', "USD/EUR"),
        ('{"rates": {"USD/INR": "-1"}}', "USD/INR"),
        ('{"rates": {"USD/INR": "abc"}}', "'abc' is not a number"),  # said ConversionSyntax
        ("[" * 100_000, "nested too deep"),  # a RecursionError: a traceback every interval
        ('{"rates": {"USD/INR": ' + "9" * 5000 + "}}", "not JSON"),  # past 4,300 digits
        ('{"as_of": "yesterday", "rates": {}}', "as_of"),
        ('{"as_of": "2020-01-01T00:00:00", "rates": {}}', "time zone"),
    ],
)
def test_a_bad_rates_file_says_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(RatesFileError, match=says):
        parse(text, default_as_of=NOW)


async def test_the_provider_quotes_a_file_once_per_change(tmp_path: Path) -> None:
    path = tmp_path / "rates.json"
    path.write_text('{"rates": {"USD/INR": "80", "INR/USD": "0.0125"}}')
    provider = FileRateProvider(path)
    assert [(r.base, r.quote) for r in await provider.fetch([("USD", "INR")])] == [("USD", "INR")]
    provider.stored()
    assert await provider.fetch([]) == []  # unchanged
    path.write_text('{"rates": {"USD/INR": "81"}}')
    os.utime(path, (time.time() + 5, time.time() + 5))
    assert [r.rate for r in await provider.fetch([])] == [Decimal("81")]
    # Not stored (say its transaction failed): the same version is quoted again next time.
    assert [r.rate for r in await provider.fetch([])] == [Decimal("81")]
    provider.stored()
    assert await provider.fetch([]) == []
    path.unlink()
    with pytest.raises(RatesFileError, match="cannot read"):
        await provider.fetch([])
    path.write_bytes(b"\xff\xfe{}")  # a UnicodeDecodeError: a traceback every interval
    with pytest.raises(RatesFileError, match="not UTF-8"):
        await provider.fetch([])
    path.unlink()
    path.mkdir()  # an OSError reading it (not its stat)
    with pytest.raises(RatesFileError, match="cannot read"):
        await provider.fetch([])


async def test_a_version_is_quoted_again_until_its_import_commits(
    tmp_path: Path, wallet_pool: AsyncConnectionPool
) -> None:
    """An import whose transaction fails leaves the version to the next check; one that commits
    is not imported twice."""
    path = tmp_path / "rates.json"
    path.write_text(json.dumps({"as_of": "2001-02-03T04:05:06Z", "rates": {"USD/INR": "66.6"}}))
    provider = FileRateProvider(path)
    with pytest.raises(psycopg.errors.QueryCanceled):  # the database fails the import
        async with wallet_pool.connection() as conn, conn.transaction():
            assert len(await import_rates(conn, provider, [])) == 1
            await conn.execute("SET LOCAL statement_timeout = 1")
            await conn.execute("SELECT pg_sleep(1)")
    assert await import_provider_rates(Wallet(wallet_pool), provider) == 1
    assert await import_provider_rates(Wallet(wallet_pool), provider) == 0
    async with wallet_pool.connection() as conn:
        cur = await conn.execute(
            "DELETE FROM exchange_rates WHERE source = 'file:rates.json' AND rate = 66.6"
            " RETURNING id"
        )
        assert len(await cur.fetchall()) == 1  # stored once


async def test_the_running_wallet_imports_the_file(
    tmp_path: Path, database_url: str, events_config: EventsConfig
) -> None:
    path = tmp_path / "rates.json"
    # Dated long ago, so it never becomes the latest rate other tests of this run convert with.
    path.write_text(json.dumps({"as_of": "2001-02-03T04:05:06Z", "rates": {"USD/INR": "77.7"}}))
    env = wallet_env(
        database_url, events_config, GPUDECK_RATES_FILE=str(path), GPUDECK_RATES_INTERVAL="1"
    )
    proc = start_wallet(env)
    try:
        await wait_serving(env["GPUDECK_WALLET_LISTEN"])
        found: list[tuple[str, Decimal]] = []
        deadline = time.monotonic() + 15
        while not found and time.monotonic() < deadline:
            with psycopg.connect(database_url) as conn:
                found = conn.execute(
                    "SELECT source, rate FROM wallet.exchange_rates"
                    " WHERE base = 'USD' AND quote = 'INR' AND as_of = '2001-02-03T04:05:06Z'"
                ).fetchall()
            await asyncio.sleep(0.2)
        assert found == [("file:rates.json", Decimal("77.7"))]
    finally:
        proc.terminate()
        proc.wait(20)


def test_a_missing_rates_file_is_a_one_line_config_error(
    tmp_path: Path, database_url: str, events_config: EventsConfig
) -> None:
    env = wallet_env(database_url, events_config, GPUDECK_RATES_FILE=str(tmp_path / "nope.json"))
    result = subprocess.run(
        [sys.executable, "-m", "gpudeck.wallet"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "GPUDECK_RATES_FILE" in lines[0], result.stderr
