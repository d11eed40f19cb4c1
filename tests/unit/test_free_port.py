"""cluster.local.free_port: ports for test and bench apps, kept out of the kernel's ephemeral range."""

import socket

from cluster.local import PORTS, _ephemeral, free_port


def test_free_ports_are_bindable_distinct_and_not_ephemeral():
    eph_lo, eph_hi = _ephemeral()
    ports = [free_port() for _ in range(20)]
    assert len(set(ports)) == len(ports)
    for port in ports:
        assert PORTS[0] <= port < PORTS[1] and not eph_lo <= port <= eph_hi
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free when handed out


def test_a_port_in_use_is_not_handed_out(monkeypatch):
    import cluster.local as local

    held = socket.socket()
    try:
        held.bind(("127.0.0.1", next(p for p in iter(free_port, None) if p + 1 < PORTS[1])))
        held.listen()
        port = held.getsockname()[1]
        monkeypatch.setattr(local, "PORTS", (port, port + 2))  # two candidates, the first one taken
        monkeypatch.setattr(local, "_given", set())
        assert free_port() == port + 1
    finally:
        held.close()
