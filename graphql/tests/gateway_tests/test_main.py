"""`python -m gpudeck.gateway` as a person runs it: starts, serves, stops on SIGTERM; a bad
setting or a port in use is one line on stderr and exit code 2."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator

import pytest

pytestmark = pytest.mark.slow
LIVE_LOGGERS = ("gpudeck.gateway.live", "gpudeck.kit.events.bus")


def gateway_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUDECK_")}
    env.update(GPUDECK_SERVICE_TOKEN="t0ken", GPUDECK_GATEWAY_LISTEN="127.0.0.1:0")
    env.update(overrides)
    return env


def run_gateway(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpudeck.gateway"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ({"GPUDECK_GATEWAY_LISTEN": "localhost"}, "GPUDECK_GATEWAY_LISTEN"),
        ({"GPUDECK_GATEWAY_LISTEN": "127.0.0.1:99999"}, "GPUDECK_GATEWAY_LISTEN"),
        ({"GPUDECK_SERVICE_TOKEN": ""}, "GPUDECK_SERVICE_TOKEN"),
        ({"GPUDECK_WALLET_ADDR": "wallet"}, "GPUDECK_WALLET_ADDR"),
        ({"GPUDECK_LOG_LEVEL": "LOUD"}, "GPUDECK_LOG_LEVEL"),
    ],
)
def test_a_bad_setting_is_one_line_and_exit_2(overrides: dict[str, str], names: str) -> None:
    result = run_gateway(gateway_env(**overrides))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gpudeck: ") and names in lines[0]
    assert "Traceback" not in result.stderr


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_port_in_use_is_one_line_and_exit_2(busy_port: int) -> None:
    result = run_gateway(gateway_env(GPUDECK_GATEWAY_LISTEN=f"127.0.0.1:{busy_port}"))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"gpudeck: GPUDECK_GATEWAY_LISTEN=127.0.0.1:{busy_port}: ")
    assert "in use" in lines[0]


def test_serves_then_stops_cleanly_on_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpudeck.gateway"],
        env=gateway_env(GPUDECK_LOG_LEVEL="INFO"),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        first = json.loads(proc.stderr.readline())
        while first["logger"] in LIVE_LOGGERS:  # NATS may be reached before or after
            first = json.loads(proc.stderr.readline())
        assert first["message"] == "serving" and first["service"] == "gateway"
        port = first["port"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
            assert json.load(resp) == {"status": "ok"}
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = [json.loads(line) for line in rest.splitlines()]
    messages = [line["message"] for line in lines if line["logger"] not in LIVE_LOGGERS]
    assert messages == ["shutting down", "stopped"]
