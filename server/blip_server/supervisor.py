"""Keeps the embedded Triton serving: notices when it died, lost a Python-backend stub or hung, and restarts it.

Triton 2.51 does not restart a Python-backend stub that died: its model stays "ready" and answers every request
with INTERNAL ("Stub process ... is not healthy") for good. So besides the server process itself, the supervisor
watches every stub process (Triton's children) and probes Triton's readiness endpoint with a timeout: a stopped
or deadlocked server fails the probe. On any of these it reports the outage at once (`on_down`: health goes
NOT_SERVING and the gateway holds its calls until Triton is back, within their deadlines), kills the whole process
group, and starts Triton again.

Recovery is as fast as Triton allows: the processes are checked every `interval` seconds (a few /proc reads),
readiness every `probe_every` checks; a fault after Triton has served `stable_after` seconds is restarted at once.
Only deaths that follow their start quickly back off (0, 0, then 1, 2, 4, ... up to 30 s), a start that fails is
one of them, and after `max_restarts` such deaths in a row the supervisor gives up. Each recovery is logged with
its timings: stopping the old Triton, the backoff, starting the new one until it is ready.

The first start is tried again only when Triton crashed while loading (killed by SIGABRT, SIGSEGV or SIGBUS: seen
under load, Triton 2.51's Python backend aborting with boost::interprocess::lock_exception); a Triton that exits
with a status (a model that does not load, a port in use) or is not ready in time fails blip-serve at once, since
a new start would fail the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable

from blip_server import procfs
from blip_server.errors import TritonStartError
from blip_server.triton import EmbeddedTriton, TritonOptions

log = logging.getLogger("blip-serve")

STUB = "triton_python_backend_stub"
CRASHES = (signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS)  # signals a Triton that crashed by itself dies of


def restart_backoff(quick_deaths: int) -> float:
    """Seconds to wait before restarting Triton after `quick_deaths` deaths in a row, each soon after its start:
    none for the first two (a fault under load, then perhaps one more), then 1, 2, 4, ... up to 30."""
    return 0.0 if quick_deaths <= 2 else min(30.0, 2.0 ** (quick_deaths - 3))


def stubs(pid: int) -> dict[int, str]:
    """Triton's Python-backend stubs (pid -> the model.py each runs)."""
    return {child: cmdline.split()[1] if len(cmdline.split()) > 1 else cmdline
            for child, cmdline in procfs.children(pid).items() if STUB in cmdline}


class TritonSupervisor:
    """Runs EmbeddedTriton and restarts it when it dies, loses a stub or hangs."""

    def __init__(self, options: TritonOptions, *, on_down: Callable[[str], Awaitable[None]] | None = None,
                 on_up: Callable[[], Awaitable[None]] | None = None, max_restarts: int = 5,
                 stable_after: float = 10.0, interval: float = 0.1, probe_every: int = 5,
                 probe_timeout: float = 2.0, hung_after: int = 4,
                 backoff: Callable[[int], float] = restart_backoff):
        self.options = options
        self.on_down = on_down
        self.on_up = on_up
        self.max_restarts = max_restarts  # quick deaths in a row before giving up
        self.stable_after = stable_after  # seconds of serving after which a death is not a quick one
        self.interval = interval
        self.probe_every = probe_every  # process checks per readiness probe
        self.probe_timeout = probe_timeout
        self.hung_after = hung_after  # consecutive failed readiness probes
        self.backoff = backoff  # quick deaths in a row -> seconds before the next start
        self.triton: EmbeddedTriton | None = None
        self.stubs: dict[int, str] = {}
        self._quick_deaths = 0
        self._ready_at = 0.0
        self.recoveries: list[dict[str, float]] = []  # each restart's timings (seconds), as logged

    async def start(self) -> None:
        """Start Triton and wait until it is ready; start it again when it crashed while loading, up to
        `max_restarts` times with the backoff of quick deaths. Any other failure is raised at once."""
        crashes = 0
        while True:
            try:
                await self._start_once()
                return
            except TritonStartError as exc:
                if not self._crashed() or crashes >= self.max_restarts:
                    raise
                crashes += 1
                log.error("Triton crashed while starting (status %s): starting it again (%d of %d): %s",
                          self.triton.returncode, crashes, self.max_restarts, str(exc).splitlines()[0])
                await self._discard()
                await asyncio.sleep(self.backoff(crashes))

    async def _discard(self) -> None:
        """Kill the Triton that died or failed to start (with its stubs) and remove its working folder."""
        await asyncio.to_thread(self.triton.kill)
        self.triton.cleanup()

    def _crashed(self) -> bool:
        code = self.triton.returncode if self.triton is not None else None
        return code is not None and -code in CRASHES

    async def _start_once(self) -> None:
        self.triton = EmbeddedTriton(self.options)
        self.triton.start()
        await asyncio.to_thread(self.triton.wait_ready)
        self.stubs = stubs(self.triton.pid)
        self._ready_at = time.monotonic()

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
        failed_probes, checks = 0, 0
        while not stop.is_set():
            if checks % self.probe_every == 0:
                ready = await asyncio.to_thread(self.triton.is_ready, self.probe_timeout)
                failed_probes = 0 if ready else failed_probes + 1
            checks += 1
            problem = self.problem(failed_probes)
            if problem is None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self.interval)
                continue
            noticed = time.monotonic()
            log.error("%s", problem)
            if self.on_down is not None:
                await self.on_down(problem.splitlines()[0])
            await self._restart(stop, noticed)
            failed_probes, checks = 0, 0

    async def _restart(self, stop: asyncio.Event, noticed: float) -> None:
        quick = noticed - self._ready_at < self.stable_after
        self._quick_deaths = self._quick_deaths + 1 if quick else 0
        await self._discard()
        stopped = time.monotonic()
        while True:
            if self._quick_deaths > self.max_restarts:
                raise TritonStartError(f"Triton failed {self._quick_deaths} times in a row, each within "
                                       f"{self.stable_after:.0f} s of its start; giving up")
            backoff = self.backoff(self._quick_deaths)
            if backoff:
                log.info("Triton died %d times in a row soon after starting: restarting in %g s",
                         self._quick_deaths, backoff)
            try:
                await asyncio.wait_for(stop.wait(), timeout=backoff)
                return  # stopping: no restart
            except asyncio.TimeoutError:
                pass
            log.info("restarting Triton")
            began = time.monotonic()
            try:
                await self._start_once()
                break
            except TritonStartError as exc:
                # Triton exited (or never got ready) while loading the models: one more quick death, not the end
                # of the service. Seen under load: Triton 2.51's Python backend aborting at start with
                # boost::interprocess::lock_exception, an upstream fault of its shared-memory setup.
                log.error("Triton failed while starting again: %s", str(exc).splitlines()[0])
                self._quick_deaths += 1
                await self._discard()
        ready = time.monotonic()
        if self.on_up is not None:
            await self.on_up()
        timings = {"stop": stopped - noticed, "backoff": began - stopped, "start": ready - began,
                   "reach": time.monotonic() - ready, "total": time.monotonic() - noticed}
        self.recoveries.append(timings)
        log.info("Triton is ready again: %.2f s after the fault was noticed (stopping the old one %.2f s, backoff "
                 "%.2f s, starting until ready %.2f s, the gateway reaching it %.2f s)", timings["total"],
                 timings["stop"], timings["backoff"], timings["start"], timings["reach"])

    def kill(self) -> None:
        """Stop Triton and its stubs now (SIGKILL), e.g. on a second signal."""
        if self.triton is not None:
            self.triton.kill()

    def stop(self) -> None:
        if self.triton is not None:
            self.triton.stop()
            self.triton.cleanup()
