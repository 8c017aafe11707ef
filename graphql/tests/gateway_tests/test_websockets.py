"""GraphQL over real websockets, in both protocols: graphql-transport-ws and legacy graphql-ws."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType

from gpudeck.gateway import websockets

TRANSPORT_WS = "graphql-transport-ws"
LEGACY_WS = "graphql-ws"
WATCH = "subscription { health(intervalSeconds: 1) { service status } }"


async def receive(ws: aiohttp.ClientWebSocketResponse, *, skip: tuple[str, ...] = ()) -> Any:
    """The next JSON message, skipping keep-alives of the types in `skip`."""
    while True:
        msg = await asyncio.wait_for(ws.receive(), timeout=5)
        assert msg.type == WSMsgType.TEXT, msg
        data = msg.json()
        if data["type"] not in skip:
            return data


def statuses(payload: dict[str, Any]) -> dict[str, str]:
    return {h["service"]: h["status"] for h in payload["data"]["health"]}


async def test_transport_ws_subscription_pushes_health_when_it_changes(fleet, gateway) -> None:
    async with gateway.ws_connect("/graphql", protocols=[TRANSPORT_WS]) as ws:
        assert ws.protocol == TRANSPORT_WS
        await ws.send_json({"type": "connection_init", "payload": {}})
        assert (await receive(ws))["type"] == "connection_ack"
        await ws.send_json({"id": "1", "type": "subscribe", "payload": {"query": WATCH}})
        first = await receive(ws, skip=("ping",))
        assert first["type"] == "next" and first["id"] == "1"
        assert set(statuses(first["payload"]).values()) == {"SERVING"}

        await fleet.set_status("compute", serving=False)
        second = await receive(ws, skip=("ping",))
        assert statuses(second["payload"])["compute"] == "NOT_SERVING"

        await fleet.stop("wallet")
        third = await receive(ws, skip=("ping",))
        assert statuses(third["payload"])["wallet"] == "UNREACHABLE"

        await ws.send_json({"id": "1", "type": "complete"})
        await ws.send_json({"type": "ping"})
        assert (await receive(ws))["type"] == "pong"  # still open after completing one


async def test_transport_ws_runs_a_query(gateway) -> None:
    async with gateway.ws_connect("/graphql", protocols=[TRANSPORT_WS]) as ws:
        await ws.send_json({"type": "connection_init"})
        assert (await receive(ws))["type"] == "connection_ack"
        query = "{ health { service status } }"
        await ws.send_json({"id": "q", "type": "subscribe", "payload": {"query": query}})
        result = await receive(ws, skip=("ping",))
        assert result["type"] == "next"
        assert len(statuses(result["payload"])) == 5
        assert (await receive(ws, skip=("ping",))) == {"id": "q", "type": "complete"}


async def test_legacy_graphql_ws_subscription(fleet, gateway) -> None:
    async with gateway.ws_connect("/graphql", protocols=[LEGACY_WS]) as ws:
        assert ws.protocol == LEGACY_WS
        await ws.send_json({"type": "connection_init", "payload": {}})
        assert (await receive(ws))["type"] == "connection_ack"
        await ws.send_json({"id": "7", "type": "start", "payload": {"query": WATCH}})
        first = await receive(ws, skip=("ka",))
        assert first["type"] == "data" and first["id"] == "7"
        assert set(statuses(first["payload"]).values()) == {"SERVING"}

        await fleet.set_status("activity", serving=False)
        second = await receive(ws, skip=("ka",))
        assert statuses(second["payload"])["activity"] == "NOT_SERVING"

        await ws.send_json({"id": "7", "type": "stop"})
        assert (await receive(ws, skip=("ka", "data"))) == {"id": "7", "type": "complete"}
        await ws.send_json({"type": "connection_terminate"})
        msg = await asyncio.wait_for(ws.receive(), timeout=5)
        assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING)


@pytest.mark.parametrize("interval", [0, 0.5, 301])
async def test_a_bad_interval_is_refused_with_bad_user_input(gateway, interval: float) -> None:
    """At least a second between checks: a socket may hold many subscriptions."""
    async with gateway.ws_connect("/graphql", protocols=[TRANSPORT_WS]) as ws:
        await ws.send_json({"type": "connection_init"})
        await receive(ws)
        query = f"subscription {{ health(intervalSeconds: {interval}) {{ service }} }}"
        await ws.send_json({"id": "1", "type": "subscribe", "payload": {"query": query}})
        reply = await receive(ws, skip=("ping",))
        errors = reply["payload"]["errors"] if reply["type"] == "next" else reply["payload"]
        assert errors[0]["extensions"] == {"code": "BAD_USER_INPUT", "field": "intervalSeconds"}
        assert "intervalSeconds" in errors[0]["message"]


@pytest.mark.parametrize(
    ("payload", "headers"),
    [
        ({"Authorization": "Basic x"}, {}),
        ({"authorization": "Bearer"}, {}),
        ({}, {"Authorization": "Basic x"}),  # the handshake's header, none in the payload
    ],
)
async def test_a_malformed_authorization_is_refused_not_a_crash(
    gateway, caplog: pytest.LogCaptureFixture, payload: dict[str, str], headers: dict[str, str]
) -> None:
    """Refused as an unknown token is: 4403 on graphql-transport-ws, connection_error on
    graphql-ws; never a dropped socket with a traceback in the log."""
    async with gateway.ws_connect("/graphql", protocols=[TRANSPORT_WS], headers=headers) as ws:
        await ws.send_json({"type": "connection_init", "payload": payload})
        msg = await asyncio.wait_for(ws.receive(), timeout=5)
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, 4403)
    async with gateway.ws_connect("/graphql", protocols=[LEGACY_WS], headers=headers) as ws:
        await ws.send_json({"type": "connection_init", "payload": payload})
        refused = await receive(ws)
        assert refused["type"] == "connection_error"
        assert "Bearer" in refused["payload"]["message"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_an_unknown_subprotocol_is_refused(gateway) -> None:
    async with gateway.ws_connect("/graphql", protocols=["nonsense"]) as ws:
        msg = await asyncio.wait_for(ws.receive(), timeout=5)
        assert msg.type == WSMsgType.CLOSE
        assert msg.data == 4406


async def test_a_page_on_another_origin_may_not_open_a_websocket(gateway) -> None:
    resp = await gateway.get(
        "/graphql",
        headers={
            "Origin": "http://evil.example",
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Protocol": TRANSPORT_WS,
        },
    )
    assert resp.status == 403


async def test_shutdown_closes_open_websockets_with_going_away(fleet, start_gateway) -> None:
    client = await start_gateway(fleet.addresses)
    session = aiohttp.ClientSession()
    try:
        ws = await session.ws_connect(client.make_url("/graphql"), protocols=[TRANSPORT_WS])
        await ws.send_json({"type": "connection_init"})
        assert (await receive(ws))["type"] == "connection_ack"
        await ws.send_json({"id": "1", "type": "subscribe", "payload": {"query": WATCH}})
        assert (await receive(ws, skip=("ping",)))["type"] == "next"
        closing = asyncio.create_task(client.close())
        msg = await asyncio.wait_for(ws.receive(), timeout=5)
        assert msg.type == WSMsgType.CLOSE
        assert msg.data == aiohttp.WSCloseCode.GOING_AWAY
        await asyncio.wait_for(closing, timeout=5)
    finally:
        await session.close()


async def test_a_legacy_socket_that_never_initialises_is_closed(
    gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """graphql-transport-ws closes a socket with no connection_init in time (4408); the legacy
    graphql-ws kept it open for as long as its client answered pings."""
    monkeypatch.setattr(websockets, "CONNECTION_INIT_TIMEOUT", timedelta(seconds=0.5))
    async with gateway.ws_connect("/graphql", protocols=[LEGACY_WS]) as ws:
        msg = await asyncio.wait_for(ws.receive(), timeout=5)
        assert msg.type == WSMsgType.CLOSE and msg.data == 4408, msg


@pytest.mark.parametrize("protocol", [TRANSPORT_WS, LEGACY_WS])
async def test_an_operation_past_the_limit_is_rate_limited(gateway, protocol: str) -> None:
    """Past MAX_OPERATIONS at once on one socket, an operation is an error with a code (it had
    none); the socket and the others go on."""
    start = "subscribe" if protocol == TRANSPORT_WS else "start"
    quiet = "subscription { health(intervalSeconds: 300) { service } }"
    async with gateway.ws_connect("/graphql", protocols=[protocol]) as ws:
        await ws.send_json({"type": "connection_init", "payload": {}})
        assert (await receive(ws))["type"] == "connection_ack"
        for n in range(websockets.MAX_OPERATIONS + 1):
            await ws.send_json({"id": str(n), "type": start, "payload": {"query": quiet}})
        while True:
            message = await receive(ws, skip=("ping", "ka", "next", "data"))
            if message["type"] == "error":
                break
        assert message["id"] == str(websockets.MAX_OPERATIONS)
        [error] = message["payload"] if protocol == TRANSPORT_WS else [message["payload"]]
        assert error["extensions"] == {"code": "RATE_LIMITED"}
        assert f"at most {websockets.MAX_OPERATIONS}" in error["message"]
