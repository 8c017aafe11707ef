"""Credentials in the database and NATS URLs never reach a log line or an error message."""

from __future__ import annotations

import logging

import pytest

from gpudeck.kit.config import ConfigError, EventsConfig, database_url, nats_url, redact_url
from gpudeck.kit.events.bus import EventBus


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("nats://app:pw@h:4222", "nats://app:***@h:4222"),
        ("nats://s3cr3t@h:4222,nats://u:pw@h2:1", "nats://***@h:4222,nats://u:***@h2:1"),
        ("tls://s3cr3t@h", "tls://***@h"),
        ("postgresql://u:pw@db:5432/x?password=pw&sslmode=require",
         "postgresql://u:***@db:5432/x?password=***&sslmode=require"),
        ("postgresql://u@db/x", "postgresql://u@db/x"),
    ],
)  # fmt: skip
def test_a_url_is_shown_without_its_secrets(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    ("check", "name", "url"),
    [
        (database_url, "GPUDECK_DATABASE_URL", "postgresql://app:pw-in-url@db.example:5432"),
        (database_url, "GPUDECK_DATABASE_URL", "postgres://app:pw-in-url@db:99999/x"),
        (database_url, "GPUDECK_DATABASE_URL", "mysql://app:pw-in-url@db/x"),
        (nats_url, "GPUDECK_NATS_URL", "nats://app:pw-in-url@h:x"),
        (nats_url, "GPUDECK_NATS_URL", "http://app:pw-in-url@h:4222"),
    ],
)
def test_a_bad_url_is_named_without_its_password(check: object, name: str, url: str) -> None:
    with pytest.raises(ConfigError) as err:
        check({name: url})  # type: ignore[operator]
    assert name in str(err.value) and "pw-in-url" not in str(err.value)


async def test_the_event_bus_logs_no_password(caplog: pytest.LogCaptureFixture) -> None:
    bus = EventBus(
        EventsConfig(nats_url="nats://app:pw-in-url@127.0.0.1:1", stream="S", subject_prefix="p"),
        client_name="redaction",
        connect_timeout=0.2,
        reconnect_wait=0.1,
    )
    with caplog.at_level(logging.DEBUG):
        await bus.start(wait=0.3)
        await bus.close()
    logged = [str(getattr(r, "nats_url", "")) + r.getMessage() for r in caplog.records]
    assert any("app:***@127.0.0.1:1" in line for line in logged), logged
    assert not any("pw-in-url" in line for line in logged), logged
