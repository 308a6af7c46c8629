"""Free loopback ports, chosen at run time (tests, the benchmark, `blip-demo-evaluate`)."""

from __future__ import annotations

import socket

_HANDED_OUT: set[int] = set()


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports free on `host` now, none handed out before by this process.

    The sockets stay bound until all are chosen, so the kernel cannot give the same port twice; a port handed
    out earlier (its server may not have bound it yet) is skipped.
    """
    sockets, ports = [], []
    try:
        while len(ports) < count:
            s = socket.socket()
            sockets.append(s)
            s.bind((host, 0))
            port = s.getsockname()[1]
            if port not in _HANDED_OUT:
                ports.append(port)
    finally:
        for s in sockets:
            s.close()
    _HANDED_OUT.update(ports)
    return ports
