"""``tests/helpers/launch.free_ports``: the ports the multi-process tests launch on are distinct, free, and outside
the kernel's ephemeral range, where an outgoing connection of a test running beside them (a gloo rank) could take one
between the pick and the launch's bind (EADDRINUSE, seen in the stress run of docs/multinode.md)."""

from __future__ import annotations

import socket

import pytest

from tests.helpers.launch import ephemeral_low, free_ports


@pytest.mark.parametrize("count", [1, 2, 8])
def test_ports_are_distinct_free_and_below_the_ephemeral_range(count: int) -> None:
    ports = free_ports(count)
    assert len(set(ports)) == count
    low = ephemeral_low()
    if low - 1024 >= 1024:  # a range that leaves room below it: the kernel's own choice is not taken
        assert all(1024 <= port < low for port in ports), (ports, low)
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # still free once picked


def test_the_global_seed_does_not_repeat_a_pick() -> None:
    """Tests seed the global ``random`` (Lightning's ``seed_everything``), every xdist worker alike: the draws must not
    follow it, or two tests side by side would pick the same ports."""
    import random

    random.seed(0)
    first = free_ports(4)
    random.seed(0)
    second = free_ports(4)
    assert first != second  # equal by chance: (1/16384)^4
