"""The event envelope: what `new_event` fills in and what the readers refuse. No servers."""

from __future__ import annotations

import uuid

import pytest
from google.protobuf.wrappers_pb2 import Int64Value, StringValue

from gpudeck.kit.events import InvalidEvent, consumer_names, new_event, parse_event, unpack


def test_new_event_fills_id_time_and_packed_payload() -> None:
    event = new_event(
        "wallet.topup.completed",
        StringValue(value="10.00"),
        source="wallet",
        organization_id="org-1",
        actor="user:42",
    )
    assert uuid.UUID(event.id).version == 4
    assert event.type == "wallet.topup.completed"
    assert (event.source, event.organization_id, event.project_id, event.actor) == (
        "wallet",
        "org-1",
        "",
        "user:42",
    )
    assert event.time.seconds > 0
    assert unpack(parse_event(event.SerializeToString()), StringValue).value == "10.00"


def test_unpacking_another_payload_type_is_refused() -> None:
    event = new_event("a.b", StringValue(value="x"), source="test")
    with pytest.raises(InvalidEvent, match=r"google\.protobuf\.StringValue"):
        unpack(event, Int64Value)


@pytest.mark.parametrize("event_type", ["", "a..b", "a.*", "a.>", "has space", ".a"])
def test_event_type_must_be_dotted_tokens(event_type: str) -> None:
    with pytest.raises(ValueError, match="dotted tokens"):
        new_event(event_type, StringValue(), source="test")


@pytest.mark.parametrize(
    "data", [b"\xff\xfe garbage", b"", StringValue(value="x").SerializeToString()]
)
def test_bytes_that_are_not_an_event_are_refused(data: bytes) -> None:
    with pytest.raises(InvalidEvent):
        parse_event(data)


def test_consumer_names_one_per_pattern() -> None:
    assert consumer_names("billing", ["wallet.>"]) == {"wallet.>": "billing"}
    assert consumer_names("billing", ["wallet.balance.*", "pod.>"]) == {
        "wallet.balance.*": "billing-wallet_balance_any",
        "pod.>": "billing-pod_all",
    }
    with pytest.raises(ValueError, match="same name"):
        consumer_names("billing", ["a.any", "a.*"])
    with pytest.raises(ValueError, match="subject"):
        consumer_names("billing", ["a.>.b"])


def test_copy_rows_of_events_hex_encode_the_payload() -> None:
    from gpudeck.kit.events.outbox import _copy_text
    from gpudeck.proto.events.v1.envelope_pb2 import Event

    event = Event(id="0a1b-2c", type="wallet.charge.posted")
    assert _copy_text([event], [event.SerializeToString()]) == (
        f"0a1b-2c\twallet.charge.posted\t\\\\x{event.SerializeToString().hex()}\n"
    )
    bad = Event(id="bad\tid", type="wallet.charge.posted")
    with pytest.raises(ValueError, match="event id"):
        _copy_text([bad], [bad.SerializeToString()])


def test_every_exported_name_loads_from_its_module() -> None:
    import gpudeck.kit.events as events

    for name in events.__all__:
        assert getattr(events, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        events.nope  # noqa: B018
