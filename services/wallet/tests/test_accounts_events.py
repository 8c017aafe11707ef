"""account.* events: written to the outbox in the transaction of the change, then published."""

from __future__ import annotations

import contextlib
import time
import uuid
from typing import Any

import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from gpudeck.kit.errors import FailedPrecondition
from gpudeck.kit.events import Outbox, parse_event, unpack
from gpudeck.kit.logs import actor
from gpudeck.kit.runtime import RunningService
from gpudeck.proto.events.v1.envelope_pb2 import Event
from gpudeck.proto.wallet.v1 import account_pb2 as pb
from gpudeck.proto.wallet.v1 import events_pb2
from gpudeck.proto.wallet.v1.account_pb2_grpc import AccountServiceStub
from gpudeck.wallet.accounts_store import AccountStore, NewOrganization


class RolledBack(Exception):
    pass


async def outbox_events(conn: AsyncConnection[Any], org: uuid.UUID) -> list[Event]:
    """This organization's events in the outbox as `conn` sees it, in order."""
    cur = await conn.execute("SELECT data FROM wallet.outbox ORDER BY id")
    found = [parse_event(bytes(row[0])) for row in await cur.fetchall()]
    return [e for e in found if e.organization_id == str(org)]


async def test_every_account_change_writes_its_event_in_the_same_transaction(
    wallet_pool: AsyncConnectionPool,
) -> None:
    store = AccountStore(Outbox("wallet"))
    token = actor.set("user:tester")
    try:
        with pytest.raises(RolledBack):
            async with wallet_pool.connection() as conn, conn.transaction():
                made = await store.create_organization(
                    conn, NewOrganization("Evented", "USD", owner_email=f"{uuid.uuid4()}@ex.com")
                )
                org = made.organization.id
                member = await store.invite_member(conn, org, f"{uuid.uuid4()}@ex.com", "admin")
                await store.set_member_role(conn, org, member.user.id, "member")
                project = await store.create_project(conn, org, "ml")
                await store.touch_project(conn, project.id)  # usage, not a change: no event
                await store.delete_project(conn, project.id)
                _, api_token = await store.create_token(conn, org, name="ci", role="viewer")
                await store.revoke_token(conn, org, api_token.id)
                await store.remove_member(conn, org, member.user.id)
                await store.update_organization(conn, org, name="Renamed")
                await store.set_kyc_status(conn, org, "pending")
                seen = await outbox_events(conn, org)
                raise RolledBack
    finally:
        actor.reset(token)

    assert [e.type for e in seen] == [
        "account.organization.created",
        "account.member.created",
        "account.project.created",
        "account.token.created",
        "account.member.created",
        "account.member.updated",
        "account.project.created",
        "account.project.deleted",
        "account.token.created",
        "account.token.deleted",
        "account.member.deleted",
        "account.organization.updated",
        "account.organization.updated",
    ]
    assert {e.actor for e in seen} == {"user:tester"}
    assert {e.source for e in seen} == {"wallet"}
    invited = unpack(seen[4], events_pb2.AccountChanged)
    assert (invited.kind, invited.id, invited.role) == ("member", str(member.user.id), "admin")
    assert seen[6].project_id == str(project.id)
    async with wallet_pool.connection() as conn:  # rolled back: nothing of it is left
        assert await outbox_events(conn, org) == []
        assert await store.find_organization(conn, org) is None


async def test_a_refused_change_writes_no_event(wallet_pool: AsyncConnectionPool) -> None:
    store = AccountStore(Outbox("wallet"))
    async with wallet_pool.connection() as conn, conn.transaction():
        made = await store.create_organization(
            conn, NewOrganization("Alone", "INR", owner_email=f"{uuid.uuid4()}@ex.com")
        )
        org, owner = made.organization.id, made.organization.owner.id
        before = len(await outbox_events(conn, org))
        with pytest.raises(FailedPrecondition):
            async with conn.transaction():  # a savepoint, as a failed call's own transaction
                await store.remove_member(conn, org, owner)
        assert len(await outbox_events(conn, org)) == before


async def test_an_organization_event_for_each_change_of_it_and_none_without(
    wallet_pool: AsyncConnectionPool,
) -> None:
    """A rename to the same name wrote account.organization.updated (a live view redrew for
    nothing); the owner changing (the recorded owner stepping down) wrote none."""
    store = AccountStore(Outbox("wallet"))
    with pytest.raises(RolledBack):
        async with wallet_pool.connection() as conn, conn.transaction():
            made = await store.create_organization(
                conn, NewOrganization("Same", "USD", owner_email=f"{uuid.uuid4()}@ex.com")
            )
            org, first = made.organization.id, made.organization.owner.id
            second = await store.invite_member(conn, org, f"{uuid.uuid4()}@ex.com", "owner")
            before = len(await outbox_events(conn, org))
            await store.update_organization(conn, org, name="Same")
            assert len(await outbox_events(conn, org)) == before
            await store.set_member_role(conn, org, first, "admin")
            changed = (await outbox_events(conn, org))[before:]
            assert sorted(e.type for e in changed) == [
                "account.member.updated",
                "account.organization.updated",  # its owner
                "account.token.deleted",  # the owner token, above an admin
            ]
            now = await store.get_organization(conn, org)
            assert now.owner.id == second.user.id
            raise RolledBack


async def test_account_events_reach_the_stream_with_the_callers_actor(
    account_stub: AccountServiceStub, wallet_service: RunningService
) -> None:
    who = ("x-actor", "user:0000-events")
    created = await account_stub.CreateOrganization(
        pb.CreateOrganizationRequest(
            name="Streamed", currency="USD", owner_email=f"{uuid.uuid4().hex}@example.com"
        ),
        metadata=(who,),
    )
    org = created.organization.id
    await account_stub.InviteMember(
        pb.InviteMemberRequest(
            organization_id=org, email=f"{uuid.uuid4().hex}@ex.com", role="viewer"
        ),
        metadata=(who,),
    )
    published = await stream_events(wallet_service, org, count=5)
    assert sorted(e.type for e in published) == [
        "account.member.created",
        "account.member.created",
        "account.organization.created",
        "account.project.created",
        "account.token.created",
    ]
    assert {e.actor for e in published} == {"user:0000-events"}


async def stream_events(service: RunningService, org: str, *, count: int) -> list[Event]:
    """The organization's account.* events on the stream, once `count` are there (5 s at most)."""
    bus = service.bus
    assert bus is not None
    name = f"accounts-{uuid.uuid4().hex[:8]}"
    sub = await bus.js.pull_subscribe(
        bus.subject_for("account.>"),
        durable=name,
        stream=bus.config.stream,
        config=ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL),
    )
    found: list[Event] = []
    try:
        deadline = time.monotonic() + 5
        while len(found) < count and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                for msg in await sub.fetch(100, timeout=0.3):
                    event = parse_event(msg.data)
                    if event.organization_id == org:
                        found.append(event)
    finally:
        await sub.unsubscribe()
        await bus.js.delete_consumer(bus.config.stream, name)
    return found
