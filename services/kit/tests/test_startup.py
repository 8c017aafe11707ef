"""check_free: an address a service cannot listen on is one line naming the setting as written."""

from __future__ import annotations

import socket

import pytest

from gpudeck.kit.startup import StartupError, check_free


@pytest.mark.parametrize(
    ("family", "host"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]
)
def test_an_address_in_use_is_named_as_written(family: socket.AddressFamily, host: str) -> None:
    try:
        taken = socket.socket(family)
        taken.bind((host, 0))
    except OSError:
        pytest.skip(f"no {host} on this machine")
    with taken:
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StartupError) as refused:
            check_free("GPUDECK_WALLET_LISTEN", host, port)
    shown = f"[{host}]" if ":" in host else host
    assert str(refused.value) == f"GPUDECK_WALLET_LISTEN={shown}:{port}: address already in use"


def test_a_free_address_and_any_port_pass() -> None:
    check_free("GPUDECK_WALLET_LISTEN", "127.0.0.1", 0)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    check_free("GPUDECK_WALLET_LISTEN", "127.0.0.1", port)
