"""Renaming projects and tokens, deleting an organization, and the projects money calls name,
over the real gRPC server, PostgreSQL and the NATS stream."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections import Counter
from collections.abc import Awaitable
from typing import Any

import grpc
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from gpudeck.kit.events import Outbox, parse_event, unpack
from gpudeck.kit.runtime import RunningService
from gpudeck.proto.common.v1.money_pb2 import Money
from gpudeck.proto.events.v1.envelope_pb2 import Event
from gpudeck.proto.wallet.v1 import account_pb2 as apb
from gpudeck.proto.wallet.v1 import events_pb2
from gpudeck.proto.wallet.v1 import wallet_pb2 as wpb
from gpudeck.proto.wallet.v1.account_pb2_grpc import AccountServiceStub
from gpudeck.proto.wallet.v1.wallet_pb2_grpc import WalletServiceStub
from gpudeck.wallet.accounts_store import AccountStore, NewOrganization

USD = 1_000_000
Accounts = AccountServiceStub
Wallet = WalletServiceStub


class RolledBack(Exception):
    pass


# ---------------------------------------------------------------------------------- helpers


async def make_org(accounts: Accounts, name: str = "") -> apb.CreateOrganizationResponse:
    """A new organization (its owner token, wallet and project "default") through the service."""
    made: apb.CreateOrganizationResponse = await accounts.CreateOrganization(
        apb.CreateOrganizationRequest(
            name=name or f"Org {uuid.uuid4().hex[:8]}",
            currency="USD",
            owner_email=f"{uuid.uuid4().hex[:12]}@example.com",
        )
    )
    return made


async def refused(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value


def metadata_of(err: grpc.aio.AioRpcError) -> dict[str, str]:
    return {
        k: (v.decode() if isinstance(v, bytes) else v) for k, v in err.trailing_metadata() or ()
    }


def field_of(err: grpc.aio.AioRpcError) -> str | None:
    return metadata_of(err).get("x-error-field")


def transfer(org: str, kind: int, amount: int, **kw: Any) -> wpb.TransferRequest:
    return wpb.TransferRequest(
        idempotency_key=uuid.uuid4().hex,
        organization_id=org,
        kind=kind,  # type: ignore[arg-type]
        amount=Money(amount=amount),
        **kw,
    )


def hold(org: str, amount: int, **kw: Any) -> wpb.CreateHoldRequest:
    return wpb.CreateHoldRequest(
        idempotency_key=uuid.uuid4().hex,
        organization_id=org,
        amount=amount,
        timeout_seconds=300,
        **kw,
    )


def meter(org: str, **kw: Any) -> wpb.OpenMeterRequest:
    resource = uuid.uuid4().hex
    return wpb.OpenMeterRequest(
        meter_id=f"pod:{resource}",
        organization_id=org,
        resource_id=resource,
        resource_type="pod",
        hourly_rate=USD,
        **kw,
    )


def usage(org: str, **kw: Any) -> wpb.RecordUsageRequest:
    fields: dict[str, Any] = {
        "event_id": uuid.uuid4().hex,
        "organization_id": org,
        "meter": "tokens",
        "quantity": 1000.0,
        "unit_price": USD,  # 1 USD per 1e6 tokens: 1,000 micro-units here
        "success": True,
    }
    fields.update(kw)
    return wpb.RecordUsageRequest(**fields)


async def project_names(accounts: Accounts, org: str) -> list[str]:
    listed = await accounts.ListProjects(apb.ListProjectsRequest(organization_id=org))
    return [p.name for p in listed.projects]


async def stream_events(
    service: RunningService, org: str, *, until: Counter[str], seconds: float = 8
) -> list[Event]:
    """The organization's account.* events on the stream, once those counted in `until` are
    all there (or `seconds` passed)."""
    bus = service.bus
    assert bus is not None
    name = f"deletion-{uuid.uuid4().hex[:8]}"
    sub = await bus.js.pull_subscribe(
        bus.subject_for("account.>"),
        durable=name,
        stream=bus.config.stream,
        config=ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL),
    )
    found: list[Event] = []
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if not until - Counter(e.type for e in found):
                break
            with contextlib.suppress(TimeoutError):
                for msg in await sub.fetch(100, timeout=0.3):
                    event = parse_event(msg.data)
                    if event.organization_id == org:
                        found.append(event)
    finally:
        await sub.unsubscribe()
        await bus.js.delete_consumer(bus.config.stream, name)
    return found


def changed(events: list[Event], event_type: str) -> list[events_pb2.AccountChanged]:
    return [unpack(e, events_pb2.AccountChanged) for e in events if e.type == event_type]


async def outbox_events(conn: AsyncConnection[Any], org: uuid.UUID) -> list[Event]:
    """This organization's events in the outbox as `conn` sees it, in order."""
    cur = await conn.execute("SELECT data FROM wallet.outbox ORDER BY id")
    found = [parse_event(bytes(row[0])) for row in await cur.fetchall()]
    return [e for e in found if e.organization_id == str(org)]


async def state(pool: AsyncConnectionPool, org: str) -> dict[str, Any]:
    """Everything a deletion changes, read from the tables."""
    oid = uuid.UUID(org)
    async with pool.connection() as conn:

        async def rows(query: str) -> list[tuple[Any, ...]]:
            cur = await conn.execute(query, (oid,))
            return list(await cur.fetchall())

        return {
            "organization": await rows("SELECT name, deleted_at FROM organizations WHERE id = %s"),
            "wallet": await rows(
                "SELECT currency, balance, credits, held_balance, run_rate"
                " FROM wallets WHERE organization_id = %s"
            ),
            "accounts": await rows(
                "SELECT id, kind, balance FROM ledger_accounts WHERE organization_id = %s"
                " ORDER BY id"
            ),
            "transactions": await rows(
                "SELECT id, kind, amount FROM transactions WHERE organization_id = %s ORDER BY id"
            ),
            "tokens": await rows(
                "SELECT id, name, revoked_at FROM api_tokens WHERE organization_id = %s ORDER BY id"
            ),
            "projects": await rows(
                "SELECT id, name, deleted_at FROM projects WHERE organization_id = %s ORDER BY id"
            ),
        }


async def delete(accounts: Accounts, org: str, confirm: str) -> apb.Organization:
    deleted: apb.Organization = await accounts.DeleteOrganization(
        apb.DeleteOrganizationRequest(organization_id=org, confirm_name=confirm)
    )
    return deleted


# ---------------------------------------------------------------------------------- projects


async def test_renaming_a_project_publishes_the_new_name(
    account_stub: Accounts, wallet_service: RunningService
) -> None:
    org = (await make_org(account_stub)).organization.id
    made = await account_stub.CreateProject(
        apb.CreateProjectRequest(organization_id=org, name="ml")
    )

    renamed = await account_stub.RenameProject(
        apb.RenameProjectRequest(project_id=made.id, name="  training  ")
    )
    assert (renamed.id, renamed.name, renamed.organization_id) == (made.id, "training", org)
    assert renamed.created_at == made.created_at
    got = await account_stub.GetProject(apb.GetProjectRequest(project_id=made.id))
    assert got.name == "training"
    assert sorted(await project_names(account_stub, org)) == ["default", "training"]

    published = await stream_events(
        wallet_service, org, until=Counter({"account.project.updated": 1})
    )
    [update] = [e for e in published if e.type == "account.project.updated"]
    payload = unpack(update, events_pb2.AccountChanged)
    assert (payload.kind, payload.id, payload.name) == ("project", made.id, "training")
    assert update.project_id == made.id


async def test_a_project_rename_writes_its_event_in_the_same_transaction(
    wallet_pool: AsyncConnectionPool,
) -> None:
    store = AccountStore(Outbox("wallet"))
    with pytest.raises(RolledBack):
        async with wallet_pool.connection() as conn, conn.transaction():
            made = await store.create_organization(
                conn, NewOrganization("Outboxed", "USD", owner_email=f"{uuid.uuid4()}@ex.com")
            )
            org = made.organization.id
            assert made.default_project is not None and made.owner_api_token is not None
            before = len(await outbox_events(conn, org))
            await store.rename_project(conn, made.default_project.id, "renamed")
            await store.rename_project(conn, made.default_project.id, "renamed")  # no change
            await store.rename_token(conn, org, made.owner_api_token.id, "laptop")
            await store.rename_token(conn, org, made.owner_api_token.id, "laptop")  # no change
            seen = (await outbox_events(conn, org))[before:]
            raise RolledBack
    assert [e.type for e in seen] == ["account.project.updated", "account.token.updated"]
    project = unpack(seen[0], events_pb2.AccountChanged)
    assert (project.id, project.name) == (str(made.default_project.id), "renamed")
    token = unpack(seen[1], events_pb2.AccountChanged)
    assert (token.kind, token.id, token.name, token.role) == (
        "token",
        str(made.owner_api_token.id),
        "laptop",
        "owner",
    )


async def test_project_rename_refusals_change_nothing(account_stub: Accounts) -> None:
    org = (await make_org(account_stub)).organization.id
    ml = await account_stub.CreateProject(apb.CreateProjectRequest(organization_id=org, name="ml"))
    web = await account_stub.CreateProject(
        apb.CreateProjectRequest(organization_id=org, name="web")
    )

    err = await refused(
        account_stub.RenameProject(apb.RenameProjectRequest(project_id=ml.id, name="web"))
    )
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS and field_of(err) == "name"
    for blank in ("", "   "):
        err = await refused(
            account_stub.RenameProject(apb.RenameProjectRequest(project_id=ml.id, name=blank))
        )
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and field_of(err) == "name"
    err = await refused(
        account_stub.RenameProject(apb.RenameProjectRequest(project_id=str(uuid.uuid4()), name="x"))
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND and field_of(err) == "project_id"
    err = await refused(
        account_stub.RenameProject(apb.RenameProjectRequest(project_id="not-a-uuid", name="x"))
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and field_of(err) == "project_id"
    assert sorted(await project_names(account_stub, org)) == ["default", "ml", "web"]

    # A deleted project cannot be renamed, and its name is free again.
    await account_stub.DeleteProject(apb.DeleteProjectRequest(project_id=web.id))
    err = await refused(
        account_stub.RenameProject(apb.RenameProjectRequest(project_id=web.id, name="www"))
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND
    reused = await account_stub.RenameProject(
        apb.RenameProjectRequest(project_id=ml.id, name="web")
    )
    assert reused.name == "web"
    assert sorted(await project_names(account_stub, org)) == ["default", "web"]


# ---------------------------------------------------------------------------------- tokens


async def test_renaming_a_token_keeps_its_secret_and_publishes_the_new_name(
    account_stub: Accounts, wallet_service: RunningService
) -> None:
    created = await make_org(account_stub)
    org = created.organization.id
    made = await account_stub.CreateApiToken(
        apb.CreateApiTokenRequest(organization_id=org, name="ci", role="member")
    )

    renamed = await account_stub.RenameApiToken(
        apb.RenameApiTokenRequest(organization_id=org, api_token_id=made.api_token.id, name="cd")
    )
    assert (renamed.id, renamed.name, renamed.role) == (made.api_token.id, "cd", "member")
    listed = await account_stub.ListApiTokens(apb.ListApiTokensRequest(organization_id=org))
    assert {t.id: t.name for t in listed.api_tokens}[made.api_token.id] == "cd"
    who = await account_stub.Authenticate(apb.AuthenticateRequest(token=made.token))
    assert who.token_id == made.api_token.id and who.role == "member"

    published = await stream_events(
        wallet_service, org, until=Counter({"account.token.updated": 1})
    )
    [update] = changed(published, "account.token.updated")
    assert (update.kind, update.id, update.name, update.role) == (
        "token",
        made.api_token.id,
        "cd",
        "member",
    )


async def test_another_organizations_token_cannot_be_renamed(account_stub: Accounts) -> None:
    mine = (await make_org(account_stub)).organization.id
    theirs = await make_org(account_stub)
    their_token = theirs.owner_api_token.id

    err = await refused(
        account_stub.RenameApiToken(
            apb.RenameApiTokenRequest(organization_id=mine, api_token_id=their_token, name="x")
        )
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND and field_of(err) == "api_token_id"
    err = await refused(
        account_stub.RenameApiToken(
            apb.RenameApiTokenRequest(
                organization_id=mine, api_token_id=str(uuid.uuid4()), name="x"
            )
        )
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND and field_of(err) == "api_token_id"
    err = await refused(
        account_stub.RenameApiToken(
            apb.RenameApiTokenRequest(
                organization_id=theirs.organization.id, api_token_id=their_token, name=" "
            )
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and field_of(err) == "name"
    listed = await account_stub.ListApiTokens(
        apb.ListApiTokensRequest(organization_id=theirs.organization.id)
    )
    assert [t.name for t in listed.api_tokens] == ["owner"]


# ---------------------------------------------------------------------------------- refusals


async def test_a_wrong_confirmation_name_is_refused_and_changes_nothing(
    account_stub: Accounts, wallet_stub: Wallet, wallet_pool: AsyncConnectionPool
) -> None:
    created = await make_org(account_stub, name="Precise Co")
    org = created.organization.id
    await wallet_stub.Transfer(transfer(org, wpb.CREDIT_GRANT, 2 * USD, credit_source="promotion"))
    before = await state(wallet_pool, org)

    for wrong in ("", "precise co", "Precise", "Precise Co Ltd"):
        err = await refused(delete(account_stub, org, wrong))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, wrong
        assert field_of(err) == "confirm_name", wrong
    assert await state(wallet_pool, org) == before
    who = await account_stub.Authenticate(apb.AuthenticateRequest(token=created.owner_token))
    assert who.organization_id == org


async def test_the_name_typed_as_at_creation_confirms_the_deletion(account_stub: Accounts) -> None:
    """Names are kept in NFC: "Café" typed with a combining accent no longer matched."""
    created = await make_org(account_stub, name="Cafe\u0301 Ops")
    assert created.organization.name == "Caf\u00e9 Ops"
    gone = await delete(account_stub, created.organization.id, "Cafe\u0301 Ops")
    assert gone.name == "Caf\u00e9 Ops"


async def test_a_name_stored_before_names_were_nfc_still_confirms_its_deletion(
    account_stub: Accounts, wallet_pool: AsyncConnectionPool
) -> None:
    created = await make_org(account_stub, name="Old Name")
    async with wallet_pool.connection() as conn:  # as an older version stored it: as typed
        await conn.execute(
            "UPDATE organizations SET name = %s WHERE id = %s",
            ("Cafe\u0301", uuid.UUID(created.organization.id)),
        )
    gone = await delete(account_stub, created.organization.id, "Caf\u00e9")
    assert gone.id == created.organization.id


async def test_deletion_is_refused_while_a_meter_runs_and_accepted_once_it_is_closed(
    account_stub: Accounts, wallet_stub: Wallet, wallet_pool: AsyncConnectionPool
) -> None:
    created = await make_org(account_stub)
    org, name = created.organization.id, created.organization.name
    await wallet_stub.Transfer(transfer(org, wpb.CREDIT_GRANT, 10 * USD, credit_source="plan"))
    opened = await wallet_stub.OpenMeter(meter(org))

    err = await refused(delete(account_stub, org, name))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert metadata_of(err).get("x-error-reason") == "ORGANIZATION_IN_USE"
    assert field_of(err) == "organization_id"
    assert "metered resource" in (err.details() or "")
    after = await state(wallet_pool, org)
    assert after["organization"][0][1] is None and after["wallet"], after
    assert all(revoked is None for _, _, revoked in after["tokens"])
    assert "credit_expiry" not in {kind for _, kind, _ in after["transactions"]}
    await account_stub.Authenticate(apb.AuthenticateRequest(token=created.owner_token))
    # The meter is still billed: it is open and the wallet is there.
    listed = await wallet_stub.ListMeters(
        wpb.ListMetersRequest(organization_id=org, open_only=True)
    )
    assert [m.id for m in listed.meters] == [opened.id]

    await wallet_stub.CloseMeter(wpb.CloseMeterRequest(meter_id=opened.id))
    deleted = await delete(account_stub, org, name)
    assert deleted.id == org and deleted.name == name
    gone = await state(wallet_pool, org)
    assert gone["wallet"] == [] and gone["organization"][0][1] is not None


async def test_deletion_is_refused_while_a_hold_is_open_and_accepted_once_it_is_voided(
    account_stub: Accounts, wallet_stub: Wallet, wallet_pool: AsyncConnectionPool
) -> None:
    created = await make_org(account_stub)
    org, name = created.organization.id, created.organization.name
    await wallet_stub.Transfer(transfer(org, wpb.CREDIT_GRANT, 5 * USD, credit_source="promotion"))
    held = await wallet_stub.CreateHold(hold(org, 2 * USD))
    before = await state(wallet_pool, org)

    err = await refused(delete(account_stub, org, name))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert metadata_of(err).get("x-error-reason") == "ORGANIZATION_IN_USE"
    assert "hold" in (err.details() or "")
    assert await state(wallet_pool, org) == before
    assert (await wallet_stub.GetHold(wpb.GetHoldRequest(hold_id=held.id))).status == "open"

    await wallet_stub.VoidHold(wpb.VoidHoldRequest(idempotency_key="void", hold_id=held.id))
    await delete(account_stub, org, name)
    forfeited = [
        amount for _, kind, amount in (await state(wallet_pool, org))["transactions"]
        if kind == "credit_expiry"
    ]  # fmt: skip
    assert forfeited == [5 * USD]


@pytest.mark.parametrize("sign", [1, -1], ids=["cash-left", "cash-owed"])
async def test_deletion_is_refused_while_the_cash_balance_is_not_zero(
    account_stub: Accounts, wallet_stub: Wallet, wallet_pool: AsyncConnectionPool, sign: int
) -> None:
    created = await make_org(account_stub)
    org, name = created.organization.id, created.organization.name
    if sign > 0:
        await wallet_stub.Transfer(transfer(org, wpb.TOPUP, 3 * USD))
    else:  # metered usage may take cash below zero
        await wallet_stub.RecordUsage(usage(org, quantity=3_000_000.0))
    before = await state(wallet_pool, org)
    assert before["wallet"][0][1] == sign * 3 * USD

    err = await refused(delete(account_stub, org, name))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert metadata_of(err).get("x-error-reason") == "ORGANIZATION_IN_USE"
    assert "cash" in (err.details() or "")
    assert await state(wallet_pool, org) == before
    got = await account_stub.GetOrganization(apb.GetOrganizationRequest(organization_id=org))
    assert got.name == name
    # Money calls still work.
    await wallet_stub.Transfer(transfer(org, wpb.TOPUP, USD))


# ---------------------------------------------------------------------------------- deletion


async def test_deleting_an_organization_forfeits_credits_revokes_tokens_and_closes_its_wallet(
    account_stub: Accounts,
    wallet_stub: Wallet,
    wallet_pool: AsyncConnectionPool,
    wallet_service: RunningService,
) -> None:
    created = await make_org(account_stub, name=f"Doomed {uuid.uuid4().hex[:6]}")
    org, name = created.organization.id, created.organization.name
    admin = await account_stub.CreateApiToken(
        apb.CreateApiTokenRequest(organization_id=org, name="admin", role="admin")
    )
    project = await account_stub.CreateProject(
        apb.CreateProjectRequest(organization_id=org, name="ml")
    )
    [default] = [
        p
        for p in (
            await account_stub.ListProjects(apb.ListProjectsRequest(organization_id=org))
        ).projects
        if p.id != project.id
    ]
    # Cash in and spent to exactly zero, then credits of which some are spent.
    await wallet_stub.Transfer(transfer(org, wpb.TOPUP, 5 * USD))
    await wallet_stub.Transfer(transfer(org, wpb.CHARGE, 5 * USD, project_id=project.id))
    await wallet_stub.Transfer(transfer(org, wpb.CREDIT_GRANT, 4 * USD, credit_source="promotion"))
    await wallet_stub.Transfer(transfer(org, wpb.CREDIT_GRANT, 3 * USD, credit_source="plan"))
    await wallet_stub.Transfer(transfer(org, wpb.CHARGE, USD, project_id=project.id))
    before = await state(wallet_pool, org)
    assert before["wallet"][0][1:3] == (6 * USD, 6 * USD)  # balance, all of it credits

    deleted = await delete(account_stub, org, f"  {name} ")
    assert (deleted.id, deleted.name) == (org, name)

    after = await state(wallet_pool, org)
    assert after["wallet"] == []
    assert after["organization"][0][1] is not None
    assert len(after["tokens"]) == 2 and all(revoked for _, _, revoked in after["tokens"])
    # The credits left went out as credit expiries; every other transaction stays.
    new = [t for t in after["transactions"] if t not in before["transactions"]]
    assert {kind for _, kind, _ in new} == {"credit_expiry"}
    assert sum(amount for _, _, amount in new) == 6 * USD
    assert [t for t in after["transactions"] if t in before["transactions"]] == before[
        "transactions"
    ]
    assert {kind for _, kind, balance in after["accounts"] if balance} == set()
    async with wallet_pool.connection() as conn:
        cur = await conn.execute(
            "SELECT t.id, sum(p.amount), count(*) FROM transactions t"
            " JOIN postings p ON p.transaction_id = t.id"
            " WHERE t.organization_id = %s GROUP BY t.id",
            (uuid.UUID(org),),
        )
        sums = await cur.fetchall()
        assert len(sums) == len(after["transactions"])
        assert all(total == 0 and n >= 2 for _, total, n in sums), sums
        cur = await conn.execute(
            "SELECT a.id, a.balance, coalesce(sum(p.amount), 0) FROM ledger_accounts a"
            " LEFT JOIN postings p ON p.account_id = a.id"
            " WHERE a.organization_id = %s GROUP BY a.id",
            (uuid.UUID(org),),
        )
        assert all(balance == posted == 0 for _, balance, posted in await cur.fetchall())
        cur = await conn.execute(
            "SELECT description FROM transactions WHERE organization_id = %s"
            " AND kind = 'credit_expiry'",
            (uuid.UUID(org),),
        )
        assert {row[0] for row in await cur.fetchall()} == {
            "Credits forfeited: organization deleted"
        }

    # Its tokens are refused; reads and a second deletion are NOT_FOUND.
    for secret in (created.owner_token, admin.token):
        err = await refused(account_stub.Authenticate(apb.AuthenticateRequest(token=secret)))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    for call in (
        account_stub.GetOrganization(apb.GetOrganizationRequest(organization_id=org)),
        account_stub.ListProjects(apb.ListProjectsRequest(organization_id=org)),
        delete(account_stub, org, name),
    ):
        err = await refused(call)
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert field_of(err) == "organization_id"

    # Every money call is NOT_FOUND for it, and writes nothing.
    for call in (
        wallet_stub.Transfer(transfer(org, wpb.TOPUP, USD)),
        wallet_stub.Transfer(transfer(org, wpb.CREDIT_GRANT, USD, credit_source="promotion")),
        wallet_stub.CreateHold(hold(org, 1)),
        wallet_stub.OpenMeter(meter(org)),
        wallet_stub.RecordUsage(usage(org)),
    ):
        err = await refused(call)
        assert err.code() == grpc.StatusCode.NOT_FOUND, err
        assert field_of(err) == "organization_id", err
    assert await state(wallet_pool, org) == after
    # Its projects went with it: not found, not usable.
    for project_id in (project.id, default.id):
        for call in (
            account_stub.GetProject(apb.GetProjectRequest(project_id=project_id)),
            account_stub.TouchProject(apb.TouchProjectRequest(project_id=project_id)),
        ):
            err = await refused(call)
            assert err.code() == grpc.StatusCode.NOT_FOUND, err
            assert field_of(err) == "project_id"

    # The events: both tokens revoked, both projects deleted, then the organization deleted.
    published = await stream_events(
        wallet_service,
        org,
        until=Counter(
            {
                "account.token.deleted": 2,
                "account.project.deleted": 2,
                "account.organization.deleted": 1,
            }
        ),
    )
    gone = changed(published, "account.organization.deleted")
    assert [(g.kind, g.id, g.name) for g in gone] == [("organization", org, name)]
    revoked = changed(published, "account.token.deleted")
    assert sorted(t.id for t in revoked) == sorted([created.owner_api_token.id, admin.api_token.id])
    projects = changed(published, "account.project.deleted")
    assert sorted(p.id for p in projects) == sorted([project.id, default.id])


async def test_an_organization_with_no_money_is_deleted_without_a_transaction(
    account_stub: Accounts, wallet_stub: Wallet, wallet_pool: AsyncConnectionPool
) -> None:
    created = await make_org(account_stub)
    org, name = created.organization.id, created.organization.name
    await delete(account_stub, org, name)
    after = await state(wallet_pool, org)
    assert after["transactions"] == [] and after["wallet"] == []
    err = await refused(wallet_stub.Transfer(transfer(org, wpb.TOPUP, USD)))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    # Another organization of the same owner is untouched.
    other = await account_stub.CreateOrganization(
        apb.CreateOrganizationRequest(
            name=name, currency="USD", owner_user_id=created.organization.owner.id
        )
    )
    await wallet_stub.Transfer(transfer(other.organization.id, wpb.TOPUP, USD))
    who = await account_stub.Authenticate(apb.AuthenticateRequest(token=other.owner_token))
    assert [o.organization_id for o in who.organizations] == [other.organization.id]


# ---------------------------------------------------------------------------------- projects named by money calls


async def test_money_calls_refuse_a_project_of_another_organization(
    account_stub: Accounts, wallet_stub: Wallet, wallet_pool: AsyncConnectionPool
) -> None:
    org = (await make_org(account_stub)).organization.id
    theirs = (await make_org(account_stub)).organization.id
    [their_project] = (
        await account_stub.ListProjects(apb.ListProjectsRequest(organization_id=theirs))
    ).projects
    await wallet_stub.Transfer(transfer(org, wpb.TOPUP, 10 * USD))
    before, theirs_before = await state(wallet_pool, org), await state(wallet_pool, theirs)

    for project_id in (their_project.id, str(uuid.uuid4())):
        for call in (
            wallet_stub.Transfer(transfer(org, wpb.CHARGE, USD, project_id=project_id)),
            wallet_stub.Transfer(transfer(org, wpb.TOPUP, USD, project_id=project_id)),
            wallet_stub.CreateHold(hold(org, USD, project_id=project_id)),
            wallet_stub.OpenMeter(meter(org, project_id=project_id)),
            wallet_stub.RecordUsage(usage(org, project_id=project_id)),
        ):
            err = await refused(call)
            assert err.code() == grpc.StatusCode.NOT_FOUND, err
            assert field_of(err) == "project_id", err
        batch = await wallet_stub.TransferBatch(
            wpb.TransferBatchRequest(
                transfers=[
                    transfer(org, wpb.CHARGE, USD),
                    transfer(org, wpb.CHARGE, USD, project_id=project_id),
                ]
            )
        )
        assert [r.error_code for r in batch.results] == ["", "NOT_FOUND"]
    listed = await wallet_stub.ListMeters(wpb.ListMetersRequest(organization_id=org))
    assert list(listed.meters) == []
    after = await state(wallet_pool, org)
    assert after["wallet"][0][1] == before["wallet"][0][1] - 2 * USD  # only the two batch charges
    assert after["wallet"][0][3] == 0  # no hold
    assert await state(wallet_pool, theirs) == theirs_before

    # The organization's own project is accepted.
    [own] = (await account_stub.ListProjects(apb.ListProjectsRequest(organization_id=org))).projects
    charged = await wallet_stub.Transfer(transfer(org, wpb.CHARGE, USD, project_id=own.id))
    assert charged.project_id == own.id


async def test_using_a_project_for_money_makes_it_most_recently_used(
    account_stub: Accounts, wallet_stub: Wallet
) -> None:
    org = (await make_org(account_stub)).organization.id
    for name in ("second", "third"):
        await account_stub.CreateProject(apb.CreateProjectRequest(organization_id=org, name=name))
    listed = (
        await account_stub.ListProjects(apb.ListProjectsRequest(organization_id=org))
    ).projects
    ids = {p.name: p.id for p in listed}
    assert [p.name for p in listed] == ["third", "second", "default"]
    await wallet_stub.Transfer(transfer(org, wpb.TOPUP, 10 * USD))

    opened = await wallet_stub.OpenMeter(meter(org, project_id=ids["default"]))
    assert await project_names(account_stub, org) == ["default", "third", "second"]
    await wallet_stub.RecordUsage(usage(org, project_id=ids["second"]))
    assert await project_names(account_stub, org) == ["second", "default", "third"]
    await wallet_stub.CreateHold(hold(org, USD, project_id=ids["third"]))
    assert await project_names(account_stub, org) == ["third", "second", "default"]
    await wallet_stub.CloseMeter(wpb.CloseMeterRequest(meter_id=opened.id))


async def test_money_calls_refuse_a_deleted_project(
    account_stub: Accounts, wallet_stub: Wallet
) -> None:
    """A deleted project is NOT_FOUND everywhere else (GetProject, RenameProject): spend cannot
    be booked to it either."""
    org = (await make_org(account_stub)).organization.id
    gone = await account_stub.CreateProject(apb.CreateProjectRequest(organization_id=org, name="x"))
    await wallet_stub.Transfer(transfer(org, wpb.TOPUP, 10 * USD))
    await account_stub.DeleteProject(apb.DeleteProjectRequest(project_id=gone.id))
    for call in (
        wallet_stub.Transfer(transfer(org, wpb.CHARGE, USD, project_id=gone.id)),
        wallet_stub.CreateHold(hold(org, USD, project_id=gone.id)),
        wallet_stub.OpenMeter(meter(org, project_id=gone.id)),
        wallet_stub.RecordUsage(usage(org, project_id=gone.id)),
    ):
        err = await refused(call)
        assert err.code() == grpc.StatusCode.NOT_FOUND, err
        assert field_of(err) == "project_id", err


async def test_a_hold_taken_before_its_project_was_deleted_is_still_captured(
    account_stub: Accounts, wallet_stub: Wallet
) -> None:
    """What was started in a project before its deletion is settled; only new uses are refused."""
    org = (await make_org(account_stub)).organization.id
    gone = await account_stub.CreateProject(apb.CreateProjectRequest(organization_id=org, name="y"))
    await wallet_stub.Transfer(transfer(org, wpb.TOPUP, 10 * USD))
    held = await wallet_stub.CreateHold(hold(org, 2 * USD, project_id=gone.id))
    await account_stub.DeleteProject(apb.DeleteProjectRequest(project_id=gone.id))
    captured = await wallet_stub.CaptureHold(
        wpb.CaptureHoldRequest(hold_id=held.id, idempotency_key=uuid.uuid4().hex)
    )
    assert captured.hold.status == "captured"
    assert captured.transaction.project_id == gone.id
    assert captured.transaction.amount.amount == 2 * USD
