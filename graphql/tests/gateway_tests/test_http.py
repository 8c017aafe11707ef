"""/healthz, /metrics, the query limits and `extensions.code` on errors."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
import strawberry
from graphql import GraphQLError

from gpudeck.gateway import errors
from gpudeck.gateway.schema import MAX_ALIASES, MAX_DEPTH, GatewaySchema
from gpudeck.kit.errors import NotFound


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


async def test_metrics_count_and_time_operations_by_name(gateway) -> None:
    await post(gateway, "query FleetHealth { health { service } }")
    await post(gateway, "query FleetHealth { health { nope } }")
    resp = await gateway.get("/metrics")
    assert resp.status == 200
    assert resp.content_type == "text/plain"
    text = await resp.text()
    ok = 'gpudeck_graphql_operations_total{operation="FleetHealth",outcome="ok",type="query"}'
    failed = (
        'gpudeck_graphql_operations_total{operation="FleetHealth",outcome="error",type="query"}'
    )
    assert ok in text
    assert failed in text
    assert 'gpudeck_graphql_operation_seconds_count{operation="FleetHealth",type="query"}' in text


def codes(body: dict[str, Any]) -> list[str]:
    return [e["extensions"]["code"] for e in body["errors"]]


async def test_an_unknown_field_is_a_validation_error(gateway) -> None:
    body = await post(gateway, "{ health { nope } }")
    assert codes(body) == ["GRAPHQL_VALIDATION_FAILED"]


async def test_a_syntax_error_is_a_parse_error(gateway) -> None:
    body = await post(gateway, "{ health { ")
    assert codes(body) == ["GRAPHQL_PARSE_FAILED"]


async def test_a_subscription_over_plain_http_is_refused(gateway) -> None:
    query = "subscription { health { service } }"
    resp = await gateway.post("/graphql", json={"query": query})
    assert resp.status == 400
    [error] = (await resp.json())["errors"]
    assert error["extensions"]["code"] == "BAD_REQUEST"
    assert "subscriptions are not allowed" in error["message"]


async def test_a_body_that_is_not_json_is_a_graphql_error_too(gateway) -> None:
    resp = await gateway.post(
        "/graphql", data=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert resp.status == 400
    [error] = (await resp.json())["errors"]
    assert error["extensions"]["code"] == "BAD_REQUEST"


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
