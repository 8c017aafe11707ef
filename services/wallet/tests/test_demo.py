"""The demo seed in a database of its own (the run's other tests use the demo organization)."""

from __future__ import annotations

import logging

import pytest
from psycopg_pool import AsyncConnectionPool

from gpudeck.wallet import demo


async def test_a_demo_user_removed_or_demoted_gets_no_bootstrap_token_and_the_wallet_starts(
    own_wallet_pool: AsyncConnectionPool, caplog: pytest.LogCaptureFixture
) -> None:
    """The token was made in the demo user's name, refused once they were no longer an owner:
    the wallet exited at every start with --demo and a new GPUDECK_BOOTSTRAP_TOKEN."""
    from gpudeck.kit.events import Outbox
    from gpudeck.wallet.accounts_store import AccountStore

    accounts = AccountStore(Outbox("wallet"))
    await demo.seed(own_wallet_pool, bootstrap_token="first-secret")
    async with own_wallet_pool.connection() as conn, conn.transaction():
        other = await accounts.invite_member(
            conn, demo.DEMO_ORGANIZATION_ID, "owner2@example.com", "owner"
        )
        await accounts.set_member_role(conn, demo.DEMO_ORGANIZATION_ID, demo.DEMO_USER_ID, "member")
    for change in ("demoted", "removed"):
        if change == "removed":
            async with own_wallet_pool.connection() as conn, conn.transaction():
                await accounts.remove_member(conn, demo.DEMO_ORGANIZATION_ID, demo.DEMO_USER_ID)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="gpudeck.wallet.demo"):
            await demo.seed(own_wallet_pool, bootstrap_token=f"secret-after-{change}")
        assert "no longer an owner" in caplog.text
        async with own_wallet_pool.connection() as conn:
            assert await accounts.find_token_by_secret(conn, f"secret-after-{change}") is None
    async with own_wallet_pool.connection() as conn:  # the organization is as it was left
        members = await accounts.list_members(conn, demo.DEMO_ORGANIZATION_ID)
    assert [(m.user.id, m.role) for m in members] == [(other.user.id, "owner")]


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
