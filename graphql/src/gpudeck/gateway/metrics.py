"""Prometheus metrics of the gateway, served at /metrics: operations by name, type and outcome,
their latency, and the websockets open.

Operation names come from clients, so a name becomes a label only if it is a valid GraphQL name
of at most 64 characters, among the first `MAX_OPERATION_NAMES` distinct ones of operations that
parsed, validated and ran for an authenticated caller; the rest count as "other" (a name that
already has its label keeps it). Otherwise anyone, without a token, could take every label with
made-up names and leave the real operations "other" until a restart.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

from aiohttp import web
from graphql import GraphQLError
from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from strawberry.extensions import SchemaExtension

from gpudeck.gateway.context import Context

MAX_OPERATION_NAMES = 500
_NAME = re.compile(r"^[_A-Za-z][_0-9A-Za-z]{0,63}$")

OPERATIONS = Counter(
    "gpudeck_graphql_operations_total",
    "GraphQL operations handled, by operation name, type and outcome (ok or error).",
    ["operation", "type", "outcome"],
)
LATENCY = Histogram(
    "gpudeck_graphql_operation_seconds",
    "Time to answer a query or mutation, by operation name and type.",
    ["operation", "type"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
SUBSCRIPTION_EVENTS = Counter(
    "gpudeck_graphql_subscription_events_total",
    "Results pushed to subscribers, by operation name.",
    ["operation"],
)
WEBSOCKETS = Gauge(
    "gpudeck_graphql_websockets", "Websocket connections open, by protocol.", ["protocol"]
)

_labelled: set[str] = set()  # the names that have a label of their own


def operation_label(name: str | None, *, may_claim: bool) -> str:
    """The label of operation `name`: its own if it has one, or may take one of the free ones
    (`may_claim`: it parsed, validated and ran for an authenticated caller); else a fixed one."""
    if not name:
        return "anonymous"
    if not _NAME.match(name):
        return "invalid"
    if name not in _labelled:
        if not may_claim or len(_labelled) >= MAX_OPERATION_NAMES:
            return "other"
        _labelled.add(name)
    return name


class OperationMetrics(SchemaExtension):
    """Counts each operation and times queries and mutations (a subscription's lifetime is not
    a latency: its events are counted instead)."""

    ran = False  # parsed and validated: execution started

    def on_execute(self) -> Iterator[None]:
        self.ran = True
        yield

    def on_operation(self) -> Iterator[None]:
        started = time.perf_counter()
        failed = False
        try:
            yield
        except Exception:  # e.g. a syntax error raised by ParserCache; not a cancelled subscription
            failed = True
            raise
        finally:
            self._record(time.perf_counter() - started, failed=failed)

    def on_stream_result(self, result: object) -> Iterator[None]:
        if self._kind() == "subscription":
            SUBSCRIPTION_EVENTS.labels(self._label(failed=False)).inc()
        yield

    def _label(self, *, failed: bool) -> str:
        context = self.execution_context.context
        authenticated = isinstance(context, Context) and context.authenticated
        may_claim = self.ran and not failed and authenticated
        return operation_label(self.execution_context.operation_name, may_claim=may_claim)

    def _kind(self) -> str:
        try:
            return self.execution_context.operation_type.value
        except RuntimeError:  # the document did not parse, or names no such operation
            return "unknown"

    def _record(self, seconds: float, *, failed: bool) -> None:
        ctx = self.execution_context
        kind = self._kind()
        name = self._label(failed=failed)
        errors: list[GraphQLError] | None = getattr(ctx.result, "errors", None)
        if errors is None and ctx.pre_execution_errors:
            errors = ctx.pre_execution_errors
        OPERATIONS.labels(name, kind, "error" if errors or failed else "ok").inc()
        if kind != "subscription":
            LATENCY.labels(name, kind).observe(seconds)


async def handle_metrics(_request: web.Request) -> web.Response:
    """GET /metrics: every metric of this process in the Prometheus text format."""
    return web.Response(
        body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )
