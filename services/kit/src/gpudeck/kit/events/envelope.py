"""The event envelope (`gpudeck.events.v1.Event`): making one, reading one, opening its payload."""

from __future__ import annotations

import re
import uuid
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from gpudeck.proto.events.v1.envelope_pb2 import Event

M = TypeVar("M", bound=Message)

# Dotted tokens without NATS wildcards or spaces: "wallet.topup.completed".
_TYPE = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


class InvalidEvent(ValueError):
    """Bytes that are not a usable Event, or a payload of another type than expected."""


def check_type(event_type: str) -> str:
    """Return `event_type` if it is dotted tokens ("wallet.topup.completed"); raise otherwise."""
    if not _TYPE.match(event_type):
        raise ValueError(f"event type {event_type!r} must be dotted tokens of [A-Za-z0-9_-]")
    return event_type


def new_event(
    event_type: str,
    payload: Message,
    *,
    source: str,
    organization_id: str = "",
    project_id: str = "",
    actor: str = "system",
) -> Event:
    """An Event with a fresh UUID id, the current time and `payload` packed into its Any."""
    event = Event(
        id=str(uuid.uuid4()),
        type=check_type(event_type),
        source=source,
        organization_id=organization_id,
        project_id=project_id,
        actor=actor,
    )
    event.time.GetCurrentTime()
    event.payload.Pack(payload)
    return event


def parse_event(data: bytes) -> Event:
    """The Event serialized in `data`; `InvalidEvent` if it is not one or lacks its id or type."""
    try:
        event = Event.FromString(data)
    except DecodeError as exc:
        raise InvalidEvent(f"not a gpudeck.events.v1.Event: {exc}") from None
    if not event.id or not event.type:
        raise InvalidEvent("not a gpudeck.events.v1.Event: it has no id or no type")
    return event


def unpack(event: Event, message_type: type[M]) -> M:
    """The payload of `event` as a `message_type`; `InvalidEvent` if it holds another type."""
    payload = message_type()
    if not event.payload.Unpack(payload):
        raise InvalidEvent(
            f"event {event.id} of type {event.type} carries {event.payload.TypeName()!r},"
            f" not {payload.DESCRIPTOR.full_name!r}"
        )
    return payload
