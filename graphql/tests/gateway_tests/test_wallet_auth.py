"""Authentication against the real wallet: bearer tokens on HTTP, the viewer, revocation."""

from __future__ import annotations

import asyncio
import json
import time

from gpudeck.proto.wallet.v1 import account_pb2

VIEWER = "{ viewer { id email role organizationId tokenId organizations { id name role } } }"


async def test_without_a_token_every_field_but_health_is_unauthenticated(gql, new_org) -> None:
    org = await new_org()
    for query in (
        VIEWER,
        "{ organization(id: $id) { id } }".replace("$id", f'"{org.id}"'),
        'mutation { createProject(organizationId: "x", name: "p") { id } }',
    ):
        error = await gql.error(query, token=None)
        assert error["extensions"]["code"] == "UNAUTHENTICATED"
    body = await gql("{ health { service status } }")
    assert "errors" not in body
    assert body["data"]["health"] == [{"service": "wallet", "status": "SERVING"}]


async def test_introspection_needs_a_token(gql, new_org) -> None:
    for query in (
        "{ __schema { queryType { name } } }",
        '{ __type(name: "Query") { name } }',
        "{ health { service } ...Meta } fragment Meta on Query { __schema { types { name } } }",
        "query A { health { service } } query B { ... on Query { __schema { queryType { name } } } }",
    ):
        operation = "B" if "query B" in query else None
        error = await gql.error(query, token=None, operation_name=operation)
        assert error["extensions"]["code"] == "UNAUTHENTICATED", query
    error = await gql.error("{ __schema { queryType { name } } }", token="gpd_revoked-or-unknown")
    assert error["extensions"]["code"] == "UNAUTHENTICATED"
    org = await new_org()
    body = await gql("{ __schema { queryType { name } } }", token=org.token)
    assert body == {"data": {"__schema": {"queryType": {"name": "Query"}}}}
    body = await gql("query A { health { service } } query B { __schema { queryType { name } } }",
                     token=None, operation_name="A")  # fmt: skip
    assert "errors" not in body


async def test_a_root_typename_needs_a_token(gql, new_org) -> None:
    """The contract: without a valid token every operation but `health` fails. `__typename`
    has no resolver of ours to refuse it, so the operation asking for it is refused whole."""
    for query in (
        "{ __typename }",
        "mutation { __typename }",
        "{ health { service } __typename }",
        "{ ...Name } fragment Name on Query { __typename }",
    ):
        for token in (None, "gpd_not-a-real-token"):
            error = await gql.error(query, token=token)
            assert error["extensions"]["code"] == "UNAUTHENTICATED", (query, token)
    body = await gql("{ health { __typename service } }")  # not at the root: health's own
    assert "errors" not in body
    org = await new_org()
    assert await gql.data("{ __typename }", token=org.token) == {"__typename": "Query"}
    assert await gql.data("mutation { __typename }", token=org.token) == {"__typename": "Mutation"}


def test_every_root_field_but_health_checks_the_caller() -> None:
    """Why only the meta fields are checked up front: each of the schema's own root fields
    refuses a caller without a valid token through its permission."""
    from strawberry.permission import PermissionExtension

    from gpudeck.gateway.schema import build_schema

    schema = build_schema()
    for root in ("Query", "Mutation", "Subscription"):
        definition = schema.get_type_by_name(root)
        for field in definition.fields:
            if field.python_name == "health":
                continue
            permissions = [e for e in field.extensions if isinstance(e, PermissionExtension)]
            assert permissions, f"{root}.{field.graphql_name or field.python_name}"


async def test_graphiqls_introspection_fits_the_limits(gql, new_org) -> None:
    from graphql import get_introspection_query

    org = await new_org()
    query = get_introspection_query(descriptions=True, input_value_deprecation=True)
    data = await gql.data(query, token=org.token)
    assert data["__schema"]["queryType"]["name"] == "Query"


async def test_a_type_is_looked_up_by_name(gql, new_org) -> None:
    org = await new_org()
    data = await gql.data('{ __type(name: "Money") { fields { name } } }', token=org.token)
    assert {f["name"] for f in data["__type"]["fields"]} == {"amount", "currency"}


async def test_an_unknown_token_is_unauthenticated(gql) -> None:
    error = await gql.error(VIEWER, token="gpd_not-a-real-token")
    assert error["extensions"]["code"] == "UNAUTHENTICATED"
    assert error["message"] == "unknown token"


async def test_a_malformed_authorization_header_is_unauthenticated(gql, new_org) -> None:
    org = await new_org()
    error = await gql.error(VIEWER, token=None, headers={"Authorization": f"Basic {org.token}"})
    assert error["extensions"]["code"] == "UNAUTHENTICATED"
    assert "Bearer" in error["message"]


async def test_health_works_with_a_bad_token_too(gql) -> None:
    body = await gql("{ health { service } }", token="nonsense")
    assert "errors" not in body


async def test_the_viewer_is_the_owner_of_the_token(gql, new_org) -> None:
    org = await new_org(name="Viewer Co")
    viewer = (await gql.data(VIEWER, token=org.token))["viewer"]
    assert viewer["id"] == org.user_id
    assert viewer["email"] == org.email
    assert viewer["role"] == "owner"
    assert viewer["organizationId"] == org.id
    assert viewer["organizations"] == [{"id": org.id, "name": "Viewer Co", "role": "owner"}]


async def test_a_token_acts_in_its_own_organization_only(gql, new_org) -> None:
    """The same user owns two organizations; each token sees only its own."""
    first = await new_org(name="First")
    data = await gql.data(
        'mutation { createOrganization(name: "Second", currency: "INR") '
        "{ organization { id name currency } ownerToken } }",
        token=first.token,
    )
    second = data["createOrganization"]
    assert second["organization"]["name"] == "Second"
    assert second["organization"]["currency"] == "INR"
    assert second["ownerToken"]
    viewer = (await gql.data(VIEWER, token=second["ownerToken"]))["viewer"]
    assert viewer["email"] == first.email
    assert [o["id"] for o in viewer["organizations"]] == [second["organization"]["id"]]
    query = "query($id: ID!) { organization(id: $id) { id name } }"
    error = await gql.error(query, {"id": first.id}, token=second["ownerToken"])
    assert error["extensions"]["code"] == "NOT_FOUND"
    error = await gql.error(query, {"id": second["organization"]["id"]}, token=first.token)
    assert error["extensions"]["code"] == "NOT_FOUND"


async def test_a_token_revoked_in_the_wallet_is_refused_within_seconds(
    gql, new_org, wallet_stubs
) -> None:
    org = await new_org()
    made = await gql.data(
        'mutation($org: ID!) { createApiToken(organizationId: $org, name: "ci", role: MEMBER)'
        " { token apiToken { id } } }",
        {"org": org.id},
        token=org.token,
    )
    token, token_id = made["createApiToken"]["token"], made["createApiToken"]["apiToken"]["id"]
    assert (await gql.data(VIEWER, token=token))["viewer"]["tokenId"] == token_id
    await wallet_stubs.accounts.RevokeApiToken(
        account_pb2.RevokeApiTokenRequest(organization_id=org.id, api_token_id=token_id)
    )
    started = time.monotonic()
    while True:
        body = await gql(VIEWER, token=token)
        if body.get("errors"):
            assert body["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
            assert body["errors"][0]["message"] == "token was revoked"
            break
        assert time.monotonic() - started < 6, "a revoked token still works after 6 s"
        await asyncio.sleep(0.2)


async def test_a_token_revoked_through_this_gateway_is_refused_at_once(gql, new_org) -> None:
    org = await new_org()
    made = await gql.data(
        'mutation($org: ID!) { createApiToken(organizationId: $org, name: "tmp", role: VIEWER)'
        " { token apiToken { id } } }",
        {"org": org.id},
        token=org.token,
    )
    token, token_id = made["createApiToken"]["token"], made["createApiToken"]["apiToken"]["id"]
    await gql.data(VIEWER, token=token)  # cached now
    revoked = await gql.data(
        "mutation($id: ID!) { revokeApiToken(id: $id) { id revokedAt } }",
        {"id": token_id},
        token=org.token,
    )
    assert revoked["revokeApiToken"]["revokedAt"]
    error = await gql.error(VIEWER, token=token)
    assert error["extensions"]["code"] == "UNAUTHENTICATED"


async def test_the_wallet_records_the_token_as_the_actor(gql, new_org) -> None:
    org = await new_org()
    topped = await gql.data(
        'mutation($org: ID!) { topUpWallet(organizationId: $org, amount: "1", currency: "USD",'
        ' idempotencyKey: "actor-1") { transaction { actor } } }',
        {"org": org.id},
        token=org.token,
    )
    viewer = (await gql.data(VIEWER, token=org.token))["viewer"]
    assert topped["topUpWallet"]["transaction"]["actor"] == f"token:{viewer['tokenId']}"


def authenticate_calls() -> float:
    from prometheus_client import REGISTRY

    labels = {"method": "/gpudeck.wallet.v1.AccountService/Authenticate", "code": "OK"}
    return REGISTRY.get_sample_value("gpudeck_grpc_requests_total", labels) or 0.0


async def test_concurrent_requests_with_one_token_authenticate_once(gql, new_org) -> None:
    org = await new_org()
    before = authenticate_calls()
    bodies = await asyncio.gather(*(gql(VIEWER, token=org.token) for _ in range(8)))
    assert all("errors" not in body for body in bodies)
    assert authenticate_calls() == before + 1
    await gql.data(VIEWER, token=org.token)  # within the TTL: from the cache
    assert authenticate_calls() == before + 1


async def test_a_gateway_the_wallet_does_not_trust_says_unavailable(
    start_gateway, wallet_address, new_org
) -> None:
    """A wrong service token is the operator's problem: not blamed on the caller's token."""
    org = await new_org()
    client = await start_gateway({"wallet": wallet_address})  # the fleet's token, not the wallet's
    resp = await client.post(
        "/graphql", json={"query": VIEWER}, headers={"Authorization": f"Bearer {org.token}"}
    )
    [error] = (await resp.json())["errors"]
    assert error["extensions"]["code"] == "UNAVAILABLE"


async def test_a_token_that_is_not_text_is_unauthenticated_everywhere(
    wallet_gateway, caplog
) -> None:
    """Bytes that are not UTF-8 reach the gateway as surrogates, which no hash takes: the query
    was INTERNAL (a traceback per request, for anyone), the invoice a plain 500, and a socket
    with such a token in its connection_init was acknowledged."""
    import logging

    from aiohttp import WSMsgType

    async def raw(request: bytes) -> tuple[bytes, bytes]:  # a client may send any bytes
        reader, writer = await asyncio.open_connection(
            wallet_gateway.server.host, wallet_gateway.server.port
        )
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        body = await reader.readexactly(length)
        writer.close()
        return head.split(b"\r\n")[0], body

    query = json.dumps({"query": VIEWER}).encode()
    status, body = await raw(
        b"POST /graphql HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n"
        b"Content-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(query), query)
    )
    [error] = json.loads(body)["errors"]
    assert (error["extensions"]["code"], error["message"]) == ("UNAUTHENTICATED", "unknown token")
    status, body = await raw(
        b"GET /invoices/00000000-0000-4000-8000-000000000000.pdf HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer \xff\xfe\r\nConnection: close\r\n\r\n"
    )
    assert b" 401 " in status and json.loads(body)["error"]["code"] == "UNAUTHENTICATED"
    payload = {"Authorization": "Bearer \ud800"}  # sent as JSON's "\ud800"
    async with wallet_gateway.ws_connect("/graphql", protocols=["graphql-transport-ws"]) as ws:
        await ws.send_json({"type": "connection_init", "payload": payload})
        msg = await asyncio.wait_for(ws.receive(), timeout=5)
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, 4403)
    async with wallet_gateway.ws_connect("/graphql", protocols=["graphql-ws"]) as ws:
        await ws.send_json({"type": "connection_init", "payload": payload})
        refused = await asyncio.wait_for(ws.receive_json(), timeout=5)
        assert refused["type"] == "connection_error"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
