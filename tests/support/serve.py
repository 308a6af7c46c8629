"""`blip-serve` and `blip-gateway` as the tests run them (the package's own helper), and process-group checks."""

from __future__ import annotations

import os
import time

from blip_bench.processes import GatewayProcess, ServeProcess

__all__ = ["GatewayProcess", "ServeProcess", "wait_gone"]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def wait_gone(pgid: int, timeout: float = 30) -> bool:
    """Wait for a process group to be gone entirely (the process and any children it left)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _group_alive(pgid):
            return True
        time.sleep(0.2)
    return False
