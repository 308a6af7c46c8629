"""Keeps the embedded Triton serving: notices when it died, lost a Python-backend stub or hung, and restarts it.

Triton 2.51 does not restart a Python-backend stub that died: its model stays "ready" and answers every request
with INTERNAL ("Stub process ... is not healthy") for good. So besides the server process itself, the supervisor
watches every stub process (Triton's children) and probes Triton's readiness endpoint with a timeout: a stopped
or deadlocked server fails the probe. On any of these it reports the outage at once (`on_down`: the gateway
answers UNAVAILABLE meanwhile, health NOT_SERVING), kills the whole process group, and starts Triton again,
backing off when it keeps failing; after `max_restarts` within `window` seconds it gives up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from blip_server import procfs
from blip_server.errors import TritonStartError
from blip_server.triton import EmbeddedTriton, TritonOptions

log = logging.getLogger("blip-serve")

STUB = "triton_python_backend_stub"


def stubs(pid: int) -> dict[int, str]:
    """Triton's Python-backend stubs (pid -> the model.py each runs)."""
    return {child: cmdline.split()[1] if len(cmdline.split()) > 1 else cmdline
            for child, cmdline in procfs.children(pid).items() if STUB in cmdline}


class TritonSupervisor:
    """Runs EmbeddedTriton and restarts it when it dies, loses a stub or hangs."""

    def __init__(self, options: TritonOptions, *, on_down: Callable[[str], Awaitable[None]] | None = None,
                 on_up: Callable[[], Awaitable[None]] | None = None, max_restarts: int = 5, window: float = 300.0,
                 interval: float = 0.5, probe_timeout: float = 2.0, hung_after: int = 4):
        self.options = options
        self.on_down = on_down
        self.on_up = on_up
        self.max_restarts = max_restarts
        self.window = window
        self.interval = interval
        self.probe_timeout = probe_timeout
        self.hung_after = hung_after  # consecutive failed readiness probes
        self.triton: EmbeddedTriton | None = None
        self.stubs: dict[int, str] = {}
        self._deaths: list[float] = []

    async def start(self) -> None:
        self.triton = EmbeddedTriton(self.options)
        self.triton.start()
        await asyncio.to_thread(self.triton.wait_ready)
        self.stubs = stubs(self.triton.pid)

    def problem(self, failed_probes: int) -> str | None:
        """What is wrong with the running Triton, if anything."""
        if not self.triton.is_running():
            return f"Triton exited unexpectedly (status {self.triton.returncode}):\n{self.triton.log_tail()}"
        # The stubs found at start, looked up one by one: scanning every process's /proc entry twice a second
        # cost 5 ms of CPU a check on a machine running 66 processes, and grows with the processes a host runs.
        dead = [model for pid, model in self.stubs.items() if not procfs.is_child(pid, self.triton.pid)]
        if dead:
            return f"the Python-backend stub of {', '.join(dead)} died"
        if failed_probes >= self.hung_after:
            return f"Triton did not answer {failed_probes} readiness checks in a row (hung or stopped)"
        return None

    async def watch(self, stop: asyncio.Event) -> None:
        """Return when `stop` is set; raise TritonStartError when Triton keeps failing."""
        failed_probes = 0
        while not stop.is_set():
            ready = await asyncio.to_thread(self.triton.is_ready, self.probe_timeout)
            failed_probes = 0 if ready else failed_probes + 1
            problem = self.problem(failed_probes)
            if problem is None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self.interval)
                continue
            log.error("%s", problem)
            if self.on_down is not None:
                await self.on_down(problem.splitlines()[0])
            await self._restart(stop)
            failed_probes = 0

    async def _restart(self, stop: asyncio.Event) -> None:
        now = time.monotonic()
        self._deaths = [t for t in self._deaths if now - t < self.window] + [now]
        await asyncio.to_thread(self.triton.kill)
        self.triton.cleanup()
        if len(self._deaths) > self.max_restarts:
            raise TritonStartError(f"Triton failed {len(self._deaths)} times in {self.window:.0f} s; giving up")
        try:
            await asyncio.wait_for(stop.wait(), timeout=min(30.0, 2.0 ** (len(self._deaths) - 1)))
            return  # stopping: no restart
        except asyncio.TimeoutError:
            pass
        log.info("restarting Triton")
        await self.start()
        log.info("Triton is ready again")
        if self.on_up is not None:
            await self.on_up()

    def kill(self) -> None:
        """Stop Triton and its stubs now (SIGKILL), e.g. on a second signal."""
        if self.triton is not None:
            self.triton.kill()

    def stop(self) -> None:
        if self.triton is not None:
            self.triton.stop()
            self.triton.cleanup()
