"""/healthz, /metrics, the query limits, `extensions.code` on errors, and answers too large."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import grpc
import pytest
import strawberry
from aiohttp.test_utils import TestClient, TestServer
from graphql import GraphQLError

from gpudeck.gateway import errors, metrics
from gpudeck.gateway.app import BACKENDS, make_app
from gpudeck.gateway.backends import Backends
from gpudeck.gateway.config import Settings
from gpudeck.gateway.schema import MAX_ALIASES, MAX_DEPTH, GatewaySchema
from gpudeck.kit.errors import NotFound
from gpudeck.proto.wallet.v1 import wallet_pb2

from .conftest import WALLET_TOKEN, Gql


async def post(client, query: str, **extra: Any) -> dict[str, Any]:
    resp = await client.post("/graphql", json={"query": query, **extra})
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


async def test_healthz_says_ok(gateway) -> None:
    resp = await gateway.get("/healthz")
    assert resp.status == 200
    assert resp.content_type == "application/json"
    assert await resp.json() == {"status": "ok"}


async def test_metrics_count_and_time_operations_by_name(gql, new_org, wallet_gateway) -> None:
    org = await new_org()
    await gql("query TeamCard { viewer { id } }", token=org.token)
    await gql("query TeamCard { viewer { nope } }", token=org.token)  # its label, once it has one
    resp = await wallet_gateway.get("/metrics")
    assert resp.status == 200
    assert resp.content_type == "text/plain"
    text = await resp.text()
    ok = 'gpudeck_graphql_operations_total{operation="TeamCard",outcome="ok",type="query"}'
    failed = 'gpudeck_graphql_operations_total{operation="TeamCard",outcome="error",type="query"}'
    assert ok in text
    assert failed in text
    assert 'gpudeck_graphql_operation_seconds_count{operation="TeamCard",type="query"}' in text


async def test_only_valid_operations_of_authenticated_callers_get_a_label_of_their_own(
    gql, new_org, wallet_gateway
) -> None:
    """Operation names come from clients: anonymous ones, and ones that do not validate, count
    as "other" and take none of the MAX_OPERATION_NAMES labels, so a flood of made-up names
    cannot leave the real operations unnamed until a restart."""
    org = await new_org()
    run = uuid.uuid4().hex[:8]
    flood = [
        ("query Junk%s_%d { nope }", None),  # fails validation, anonymous
        ("query Probe%s_%d { health { service } }", None),  # valid, but anonymous
        ("query Bogus%s_%d { health { service } }", "gpd_not-a-token"),
        ("query Typo%s_%d { viewer { nope } }", org.token),  # authenticated, does not validate
    ]
    sent = [
        (template % (run, n), token)
        for n in range(metrics.MAX_OPERATION_NAMES // len(flood) + 5)
        for template, token in flood
    ]
    for batch in range(0, len(sent), 50):
        await asyncio.gather(*(gql(q, token=t) for q, t in sent[batch : batch + 50]))
    await gql(f"query Dashboard{run} {{ viewer {{ id }} }}", token=org.token)
    text = await (await wallet_gateway.get("/metrics")).text()
    assert f'operation="Dashboard{run}"' in text
    assert run not in text.replace(f"Dashboard{run}", "")
    assert (
        'gpudeck_graphql_operations_total{operation="other",outcome="error",type="query"}' in text
    )


def codes(body: dict[str, Any]) -> list[str]:
    return [e["extensions"]["code"] for e in body["errors"]]


async def test_an_unknown_field_is_a_validation_error(gateway) -> None:
    body = await post(gateway, "{ health { nope } }")
    assert codes(body) == ["GRAPHQL_VALIDATION_FAILED"]


async def test_a_syntax_error_is_a_parse_error(gateway) -> None:
    body = await post(gateway, "{ health { ")
    assert codes(body) == ["GRAPHQL_PARSE_FAILED"]


async def test_a_document_of_several_operations_runs_only_the_one_named(gql, new_org) -> None:
    """Without operationName the first one ran: a mutation nobody chose."""
    org = await new_org()
    two = "".join(
        f'mutation {n} {{ createProject(organizationId: "{org.id}", name: "{n}") {{ name }} }}'
        for n in ("A", "B")
    )
    for _ in range(2):  # the second time its validation comes from the cache
        error = await gql.error(two, token=org.token)
        assert error["extensions"] == {"code": "BAD_REQUEST", "field": "operationName"}
        assert "operationName" in error["message"]
    body = await gql(two, token=org.token, operation_name="B")
    assert body == {"data": {"createProject": {"name": "B"}}}
    projects = await gql.data(
        f'{{ organization(id: "{org.id}") {{ projects {{ name }} }} }}', token=org.token
    )
    assert "A" not in {p["name"] for p in projects["organization"]["projects"]}
    one = "query Only { health { service } }"  # one operation needs no name
    assert "errors" not in await gql(one, token=org.token)
    # A subscription first, over a websocket: it was started (a refusal set at execution time
    # is not heeded there).
    watch = f'subscription W {{ walletUpdated(organizationId: "{org.id}") {{ currency }} }}'
    async with gql.client.ws_connect("/graphql", protocols=["graphql-transport-ws"]) as ws:
        await ws.send_json(
            {"type": "connection_init", "payload": {"Authorization": f"Bearer {org.token}"}}
        )
        assert (await ws.receive_json(timeout=5))["type"] == "connection_ack"
        payload = {"query": watch + two}
        await ws.send_json({"id": "1", "type": "subscribe", "payload": payload})
        reply = await ws.receive_json(timeout=5)
        assert reply["type"] == "error", reply
        assert reply["payload"][0]["extensions"]["code"] == "BAD_REQUEST"


async def test_a_subscription_over_plain_http_is_refused(gateway) -> None:
    query = "subscription { health { service } }"
    resp = await gateway.post("/graphql", json={"query": query})
    assert resp.status == 400
    [error] = (await resp.json())["errors"]
    assert error["extensions"]["code"] == "BAD_REQUEST"
    assert "subscriptions are not allowed" in error["message"]


async def test_a_request_that_is_not_proper_http_is_no_error_of_ours(
    gateway, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp logged it at ERROR with a traceback: anyone could fill the error log."""
    import logging

    reader, writer = await asyncio.open_connection(gateway.server.host, gateway.server.port)
    writer.write(b"POST /graphql HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
    status = await reader.readline()
    writer.close()
    assert b" 400 " in status
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    said = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert said and all(r.levelno == logging.INFO for r in said), caplog.text
    assert all("bad HTTP request" in r.getMessage() for r in said)


def test_a_client_gone_mid_request_is_no_error_of_ours() -> None:
    """Gone before its body came (a POST cut short), it was an ERROR with a traceback too."""
    import logging
    import sys

    from gpudeck.gateway.app import ClientsBadHttp

    try:
        raise ConnectionResetError("Connection lost")
    except ConnectionResetError:
        record = logging.LogRecord(
            "aiohttp.server", logging.ERROR, __file__, 1, "Error handling request from %s",
            ("127.0.0.1",), sys.exc_info(),
        )  # fmt: skip
    assert ClientsBadHttp().filter(record)
    assert (record.levelno, record.exc_info) == (logging.INFO, None)
    assert record.getMessage() == "bad HTTP request: Connection lost"


async def test_a_body_that_is_not_json_is_a_graphql_error_too(gateway) -> None:
    resp = await gateway.post(
        "/graphql", data=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert resp.status == 400
    [error] = (await resp.json())["errors"]
    assert error["extensions"]["code"] == "BAD_REQUEST"


async def test_a_body_too_large_is_a_graphql_error_too(gateway) -> None:
    query = 'mutation { createProject(organizationId: "x", name: "%s") { id } }' % ("x" * 1_100_000)
    resp = await gateway.post("/graphql", json={"query": query})
    assert resp.status == 413
    [error] = (await resp.json())["errors"]
    assert error["extensions"]["code"] == "REQUEST_TOO_LARGE"
    assert "larger than" in error["message"]


async def test_too_deep_a_query_is_refused(gateway) -> None:
    # The schema is still shallow, so the deep fields do not exist either: both rules object.
    levels = MAX_DEPTH + 1
    query = "query Deep { " + "health { " * levels + "service" + " }" * (levels + 1)
    body = await post(gateway, query)
    assert set(codes(body)) == {"GRAPHQL_VALIDATION_FAILED"}
    assert any("exceeds maximum operation depth" in e["message"] for e in body["errors"])


async def test_too_many_aliases_are_refused(gateway) -> None:
    fields = " ".join(f"a{i}: __typename" for i in range(MAX_ALIASES + 1))
    body = await post(gateway, "{ " + fields + " }")
    assert codes(body) == ["GRAPHQL_VALIDATION_FAILED"]
    assert "aliases" in body["errors"][0]["message"]


async def test_too_many_tokens_are_refused(gateway) -> None:
    body = await post(gateway, "{ " + " ".join(["__typename"] * 3000) + " }")
    assert codes(body) == ["GRAPHQL_PARSE_FAILED"]


# The error hook on a small schema of its own: resolvers that fail the ways later ones will.


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


@strawberry.type
class Failing:
    @strawberry.field
    def missing(self) -> str:
        raise _rpc_error(grpc.StatusCode.NOT_FOUND, "pod 'p1' not found")

    @strawberry.field
    def invalid(self) -> str:
        raise _rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "gpus must be positive")

    @strawberry.field
    def denied(self) -> str:
        raise _rpc_error(grpc.StatusCode.PERMISSION_DENIED, "not your organization")

    @strawberry.field
    def anonymous(self) -> str:
        raise _rpc_error(grpc.StatusCode.UNAUTHENTICATED, "missing token")

    @strawberry.field
    def down(self) -> str:
        raise _rpc_error(grpc.StatusCode.UNAVAILABLE, "connection refused")

    @strawberry.field
    def too_large(self) -> str:  # the gateway's own receive limit, as gRPC words it
        raise _rpc_error(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "Received message larger than max (5242880 vs. 4194304)",
        )

    @strawberry.field
    def limited(self) -> str:  # a service's own refusal: try again later
        raise _rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many requests: slow down")

    @strawberry.field
    def grpc_internal(self) -> str:
        raise _rpc_error(grpc.StatusCode.INTERNAL, "stack trace with secrets")

    @strawberry.field
    def bug(self) -> str:
        raise RuntimeError("password=hunter2")

    @strawberry.field
    def domain(self) -> str:
        raise NotFound("wallet 'w1' not found")

    @strawberry.field
    def refused(self) -> str:
        raise errors.GatewayError("admins only", code=errors.FORBIDDEN)


@pytest.mark.parametrize(
    ("field", "code", "message"),
    [
        ("missing", "NOT_FOUND", "pod 'p1' not found"),
        ("invalid", "BAD_USER_INPUT", "gpus must be positive"),
        ("denied", "FORBIDDEN", "not your organization"),
        ("anonymous", "UNAUTHENTICATED", "missing token"),
        ("down", "UNAVAILABLE", "connection refused"),
        ("tooLarge", "RESPONSE_TOO_LARGE", "the answer is too large: ask for fewer items"),
        ("limited", "RATE_LIMITED", "too many requests: slow down"),
        ("grpcInternal", "INTERNAL", "internal error"),
        ("bug", "INTERNAL", "internal error"),
        ("domain", "NOT_FOUND", "wallet 'w1' not found"),
        ("refused", "FORBIDDEN", "admins only"),
    ],
)
async def test_errors_carry_a_code_and_hide_internal_details(
    field: str, code: str, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    schema = GatewaySchema(query=Failing)
    result = await schema.execute("{ " + field + " }")
    assert result.errors is not None
    [formatted] = [e.formatted for e in result.errors]
    assert formatted["extensions"] == {"code": code}
    assert formatted["message"] == message
    logged_internal = any("internal error" in r.getMessage() for r in caplog.records)
    assert logged_internal == (code == "INTERNAL")


def test_the_error_hook_is_idempotent() -> None:
    error = GraphQLError("x", original_error=RuntimeError("secret"))
    errors.process([error])
    errors.process([error])
    assert error.formatted["message"] == "internal error"
    assert error.formatted["extensions"] == {"code": "INTERNAL"}


async def test_parsing_and_validation_are_cached_across_requests(gateway) -> None:
    from strawberry.extensions.validation_cache import _get_validate_cache

    from gpudeck.gateway.schema import CACHE_SIZE

    query = "query CacheProbe { health { service } }"
    await post(gateway, query)
    before = _get_validate_cache(CACHE_SIZE).cache_info().hits
    await post(gateway, query)
    assert _get_validate_cache(CACHE_SIZE).cache_info().hits == before + 1


# Answers as large as the wallet sends: the gateway's receive limit is the wallet's, not gRPC's
# default 4 MiB, and an answer above it is RESPONSE_TOO_LARGE (asking again will not help).

RECENT = "query($id: ID!, $n: Int!) { organization(id: $id) { usage(recent: $n) { recent { eventId } } } }"


async def record_big_usage(wallet_stubs, org_id: str, count: int) -> None:
    """`count` usage records of about 21 KB each (32 dimensions at their longest)."""
    dimensions = {f"k{i:02d}".ljust(64, "k"): "漢" * 200 for i in range(32)}
    for start in range(0, count, 25):
        await asyncio.gather(
            *(
                wallet_stubs.wallet.RecordUsage(
                    wallet_pb2.RecordUsageRequest(
                        event_id=f"{org_id}-big-{n}",
                        organization_id=org_id,
                        meter="tokens",
                        quantity=1,
                        unit_price=0,
                        dimensions=dimensions,
                        success=True,
                    )
                )
                for n in range(start, min(start + 25, count))
            )
        )


async def test_an_answer_over_grpcs_default_4_mib_is_received(gql, new_org, wallet_stubs) -> None:
    org = await new_org()
    await record_big_usage(wallet_stubs, org.id, 210)  # about 4.5 MB
    data = await gql.data(RECENT, {"id": org.id, "n": 210}, token=org.token)
    assert len(data["organization"]["usage"]["recent"]) == 210


async def test_an_answer_above_the_receive_limit_is_response_too_large(
    new_org, wallet_stubs, wallet_address
) -> None:
    org = await new_org()
    await record_big_usage(wallet_stubs, org.id, 3)
    settings = Settings(
        service_token=WALLET_TOKEN,
        listen="127.0.0.1:0",
        service_addresses={"wallet": wallet_address},
    )
    backends = Backends(settings.service_addresses, token=WALLET_TOKEN, max_receive_bytes=32_768)
    client = TestClient(TestServer(make_app(settings, backends=backends), host="127.0.0.1"))
    await client.start_server()
    try:
        assert client.app[BACKENDS] is backends
        error = await Gql(client).error(RECENT, {"id": org.id, "n": 3}, token=org.token)
    finally:
        await client.close()
    assert error["extensions"] == {"code": "RESPONSE_TOO_LARGE"}
    assert error["message"] == "the answer is too large: ask for fewer items"
