"""Events: each service announces its changes on one JetStream stream and reacts to the others'.

    service transaction ──Outbox.add──▶ <schema>.outbox ──Relay──▶ JetStream stream
                                                                        │
    handler(conn, event) ◀── <schema>.inbox (once per event id) ◀── Consumer

- `new_event` wraps a protobuf payload in the `gpudeck.events.v1.Event` envelope.
- `Outbox(schema).add(conn, event)` writes it in the caller's transaction: published if and only
  if that transaction commits; a NOTIFY wakes the relay at commit.
- `Relay` publishes committed outbox rows in order (`Nats-Msg-Id` = event id), one relay per
  schema at a time across replicas.
- `Consumer` applies a handler exactly once per event id (the `inbox` table), retries with
  backoff, dead-letters (the `dead_letters` table).
- `EventBus` is the NATS connection; NATS being down delays events, it never loses them.

Errors: `InvalidEvent` (bytes that are not an Event, or an unexpected payload type) and
`BusNotConnected` (NATS unreachable right now).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gpudeck.kit.events.bus import DUPLICATE_WINDOW, BusNotConnected, EventBus, Outgoing
    from gpudeck.kit.events.consumer import Consumer, Handler, consumer_names
    from gpudeck.kit.events.envelope import (
        InvalidEvent,
        check_type,
        new_event,
        parse_event,
        unpack,
    )
    from gpudeck.kit.events.outbox import Outbox
    from gpudeck.kit.events.relay import Relay
    from gpudeck.proto.events.v1.envelope_pb2 import Event

# Each name loads its module on first use, so a process that only listens (the gateway) loads
# neither the relay nor the consumer, and its /metrics shows none of their series.
_HOMES = {
    "DUPLICATE_WINDOW": "gpudeck.kit.events.bus",
    "BusNotConnected": "gpudeck.kit.events.bus",
    "EventBus": "gpudeck.kit.events.bus",
    "Outgoing": "gpudeck.kit.events.bus",
    "Consumer": "gpudeck.kit.events.consumer",
    "Handler": "gpudeck.kit.events.consumer",
    "consumer_names": "gpudeck.kit.events.consumer",
    "InvalidEvent": "gpudeck.kit.events.envelope",
    "check_type": "gpudeck.kit.events.envelope",
    "new_event": "gpudeck.kit.events.envelope",
    "parse_event": "gpudeck.kit.events.envelope",
    "unpack": "gpudeck.kit.events.envelope",
    "Outbox": "gpudeck.kit.events.outbox",
    "Relay": "gpudeck.kit.events.relay",
    "Event": "gpudeck.proto.events.v1.envelope_pb2",
}

__all__ = [
    "DUPLICATE_WINDOW",
    "BusNotConnected",
    "Consumer",
    "Event",
    "EventBus",
    "Handler",
    "InvalidEvent",
    "Outbox",
    "Outgoing",
    "Relay",
    "check_type",
    "consumer_names",
    "new_event",
    "parse_event",
    "unpack",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'gpudeck.kit.events' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
