"""Loopback ports chosen at run time."""

from blip_server.ports import free_ports


def free_port() -> int:
    return free_ports(1)[0]
