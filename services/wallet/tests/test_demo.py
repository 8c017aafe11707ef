"""The demo seed in a database of its own (the run's other tests use the demo organization)."""

from __future__ import annotations

import logging

import pytest
from psycopg_pool import AsyncConnectionPool

from gpudeck.wallet import demo


async def test_a_deleted_demo_organization_is_not_seeded_again_and_the_wallet_starts(
    own_wallet_pool: AsyncConnectionPool, caplog: pytest.LogCaptureFixture
) -> None:
    """Its id stays taken by the deleted row: seeding it again failed every later start of a
    stack run with --demo or a bootstrap token."""
    await demo.seed(own_wallet_pool, bootstrap_token="demo-secret")
    async with own_wallet_pool.connection() as conn:  # as DeleteOrganization leaves it
        await conn.execute(
            "UPDATE organizations SET deleted_at = now() WHERE id = %s",
            (demo.DEMO_ORGANIZATION_ID,),
        )
    with caplog.at_level(logging.WARNING, logger="gpudeck.wallet.demo"):
        await demo.seed(own_wallet_pool, bootstrap_token="demo-secret")
    assert "demo organization was deleted" in caplog.text
    async with own_wallet_pool.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM organizations WHERE id = %s AND deleted_at IS NULL",
            (demo.DEMO_ORGANIZATION_ID,),
        )
        assert await cur.fetchone() == (0,)
