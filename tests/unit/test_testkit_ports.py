"""The ports tests and benchmarks start services on."""

from __future__ import annotations

import socket

import pytest

from iot_testkit.processes import _ephemeral_low, free_port


@pytest.mark.skipif(_ephemeral_low() <= 11000, reason="no room below this machine's ephemeral range")
def test_a_free_port_is_below_the_ephemeral_range_and_can_be_bound() -> None:
    """Outgoing connections take their local ports from the ephemeral range: a service's port picked
    there could be taken before the service binds it."""
    ports = {free_port() for _ in range(20)}
    assert all(10000 <= port < _ephemeral_low() for port in ports), ports
    assert len(ports) == 20  # never the same port twice in one process
    with socket.socket() as s:
        s.bind(("0.0.0.0", ports.pop()))
