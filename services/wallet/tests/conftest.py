"""Wallet test fixtures: the wallet schema migrated into this run's database, and organizations."""

from __future__ import annotations

import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from psycopg_pool import AsyncConnectionPool

from gpudeck.kit.config import EventsConfig, ServiceConfig
from gpudeck.kit.db import migrate, open_pool
from gpudeck.kit.grpcclient import channel
from gpudeck.kit.runtime import KIT_MIGRATIONS, RunningService
from gpudeck.proto.wallet.v1 import account_pb2_grpc, wallet_pb2_grpc
from gpudeck.wallet.ledger_store import open_wallet
from gpudeck.wallet.service import SPEC

# The helpers beside the tests (processes.py, workload.py, databases.py) import as top-level
# modules.
sys.path.insert(0, str(Path(__file__).parent))
from databases import MIGRATIONS, wallet_database  # importable only from here on

NewOrg = Callable[..., Awaitable[uuid.UUID]]
TOKEN = "wallet-test-token"


@pytest.fixture(scope="session")
async def wallet_pool(database_url: str) -> AsyncIterator[AsyncConnectionPool]:
    pool = await open_pool(database_url, min_size=1, max_size=8, schema="wallet")
    await migrate(pool, "wallet", KIT_MIGRATIONS, table="kit_migrations")
    await migrate(pool, "wallet", MIGRATIONS)
    yield pool
    await pool.close()


@pytest.fixture(scope="module")
async def own_wallet_pool(
    pg_server_url: str, run_id: str, request: pytest.FixtureRequest
) -> AsyncIterator[AsyncConnectionPool]:
    """A database of the test module's own, with the wallet schema: for tests that change what
    the run's other tests rely on (the demo organization, balances set by hand)."""
    name = f"gpudeck_test_{run_id}_{request.module.__name__.rsplit('.', 1)[-1]}"[:63]
    async with wallet_database(pg_server_url, name) as (_, pool):
        yield pool


@pytest.fixture
def new_org(wallet_pool: AsyncConnectionPool) -> NewOrg:
    """Make an organization with an empty wallet; returns its id."""

    async def make(currency: str = "USD", name: str = "Acme", kyc: str = "verified") -> uuid.UUID:
        org, user = uuid.uuid4(), uuid.uuid4()
        async with wallet_pool.connection() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO users (id, email) VALUES (%s, %s)", (user, f"{user}@example.com")
            )
            await conn.execute(
                "INSERT INTO organizations (id, name, owner_user_id, currency, kyc_status)"
                " VALUES (%s, %s, %s, %s, %s)",
                (org, name, user, currency, kyc),
            )
            await conn.execute(
                "INSERT INTO memberships (organization_id, user_id, role) VALUES (%s, %s, 'owner')",
                (org, user),
            )
            await open_wallet(conn, org, currency)
        return org

    return make


@pytest.fixture(scope="session")
async def wallet_service(
    database_url: str, events_config: EventsConfig, wallet_pool: AsyncConnectionPool
) -> AsyncIterator[RunningService]:
    """The wallet service running in this process on a free port, billing every 0.2 s."""
    config = ServiceConfig(
        service="wallet",
        database_url=database_url,
        events=events_config,
        grpc_listen="127.0.0.1:0",
        metrics_listen="127.0.0.1:0",
        service_token=TOKEN,
        shutdown_grace=2,
    )
    env = {"GPUDECK_BILLING_INTERVAL": "0.2", "GPUDECK_DEPLETION_SECONDS": "10"}
    running = RunningService(SPEC, config, env)
    await running.start()
    yield running
    await running.stop()


@pytest.fixture(scope="session")
async def wallet_stub(
    wallet_service: RunningService,
) -> AsyncIterator[wallet_pb2_grpc.WalletServiceStub]:
    async with channel(f"127.0.0.1:{wallet_service.port}", TOKEN) as ch:
        yield wallet_pb2_grpc.WalletServiceStub(ch)


@pytest.fixture(scope="session")
async def account_stub(
    wallet_service: RunningService,
) -> AsyncIterator[account_pb2_grpc.AccountServiceStub]:
    async with channel(f"127.0.0.1:{wallet_service.port}", TOKEN) as ch:
        yield account_pb2_grpc.AccountServiceStub(ch)
