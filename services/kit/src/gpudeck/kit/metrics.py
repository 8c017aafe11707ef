"""Prometheus metrics every service exports on its /metrics endpoint."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from gpudeck.kit.config import parse_address

GRPC_REQUESTS = Counter(
    "gpudeck_grpc_requests_total",
    "gRPC calls handled, by method and status code.",
    ["method", "code"],
)
GRPC_LATENCY = Histogram(
    "gpudeck_grpc_request_seconds",
    "gRPC call latency by method.",
    ["method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
OUTBOX_PENDING = Gauge(
    "gpudeck_outbox_pending_events",
    "Events written to the outbox and not yet published to JetStream.",
)
OUTBOX_LAG = Gauge(
    "gpudeck_outbox_lag_seconds",
    "Age of the oldest event still waiting in the outbox.",
)
EVENTS_PUBLISHED = Counter(
    "gpudeck_events_published_total", "Events published to JetStream, by type.", ["type"]
)
EVENTS_HANDLED = Counter(
    "gpudeck_events_handled_total",
    "Events consumed, by consumer and outcome (handled, duplicate, retried, dead).",
    ["consumer", "outcome"],
)


def serve(listen: str) -> int:
    """Serve /metrics on `listen` (host:port) from a background thread; return the port bound."""
    host, port = parse_address("metrics listen address", listen)
    server, _thread = start_http_server(port, addr=host)
    return int(server.server_port)
