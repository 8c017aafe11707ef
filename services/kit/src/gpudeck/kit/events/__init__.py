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

from gpudeck.kit.events.bus import DUPLICATE_WINDOW, BusNotConnected, EventBus, Outgoing
from gpudeck.kit.events.consumer import Consumer, Handler, consumer_names
from gpudeck.kit.events.envelope import InvalidEvent, check_type, new_event, parse_event, unpack
from gpudeck.kit.events.outbox import Outbox
from gpudeck.kit.events.relay import Relay
from gpudeck.proto.events.v1.envelope_pb2 import Event

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
