"""free_port picks ports a server can still bind when it starts: free, and outside the range the
kernel gives outgoing connections (which could otherwise take the port first)."""

from __future__ import annotations

import socket

from gpudeck.cli.embedded import _ephemeral_ports, free_port


def test_free_ports_are_bindable_and_below_the_ephemeral_range() -> None:
    first_ephemeral = _ephemeral_ports()[0]
    ports = {free_port() for _ in range(20)}
    assert len(ports) > 1  # picked at random, not one fixed port
    for port in ports:
        assert port < first_ephemeral
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_port_in_use_is_not_picked() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", free_port()))
        taken = held.getsockname()[1]
        assert all(free_port() != taken for _ in range(200))


def test_a_port_is_never_given_twice_in_one_process() -> None:
    # a stack's ports are picked before any server binds them, so a second pick of the same
    # still-free port would hand two services one address
    ports = [free_port() for _ in range(2_000)]
    assert len(set(ports)) == len(ports)
