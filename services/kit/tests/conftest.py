"""Fixtures of the kit's event tests: a pool, a fresh schema with the kit's tables, a bus."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from psycopg_pool import AsyncConnectionPool

from gpudeck.kit.config import EventsConfig
from gpudeck.kit.db import migrate, open_pool
from gpudeck.kit.events import EventBus
from gpudeck.kit.runtime import KIT_MIGRATIONS


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[AsyncConnectionPool]:
    pool = await open_pool(database_url, min_size=1, max_size=4)
    yield pool
    await pool.close()


@pytest.fixture
async def kit_schema(pool: AsyncConnectionPool, unique: str) -> str:
    """A service schema of its own holding the kit's tables (outbox, inbox, dead letters)."""
    await migrate(pool, unique, KIT_MIGRATIONS, table="kit_migrations")
    return unique


@pytest.fixture
async def bus(events_config: EventsConfig) -> AsyncIterator[EventBus]:
    bus = EventBus(events_config, client_name="kit-tests")
    await bus.start()
    assert bus.connected
    yield bus
    await bus.close()
