"""Databases of a test's own, on the run's PostgreSQL server (for tests that change what the
run's other tests rely on, or that the run's wallet service must not see)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg_pool import AsyncConnectionPool

import gpudeck.wallet
from gpudeck.kit.db import migrate, open_pool
from gpudeck.kit.runtime import KIT_MIGRATIONS

MIGRATIONS = Path(gpudeck.wallet.__file__).parent / "migrations"


@contextmanager
def fresh_database(server_url: str, name: str) -> Iterator[str]:
    """An empty database `name` on the server of `server_url`: its URL; dropped after."""
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@asynccontextmanager
async def wallet_database(
    server_url: str, name: str, *, max_size: int = 8
) -> AsyncIterator[tuple[str, AsyncConnectionPool]]:
    """A fresh database with the wallet schema migrated: its URL, and a pool on it."""
    with fresh_database(server_url, name) as url:
        pool = await open_pool(url, min_size=1, max_size=max_size, schema="wallet")
        try:
            await migrate(pool, "wallet", KIT_MIGRATIONS, table="kit_migrations")
            await migrate(pool, "wallet", MIGRATIONS)
            yield url, pool
        finally:
            await pool.close()
