"""The supervisor's restart rule: a fault after Triton served `stable_after` seconds restarts it at once; only
deaths soon after a start back off, and too many of those in a row give up. Its first start is tried again only
when Triton crashed (killed by a signal of its own making). (The faults themselves, against the real Triton:
tests/integration/test_faults.py.)"""

from __future__ import annotations

import asyncio

import pytest

from blip_server.errors import TritonStartError
from blip_server.supervisor import TritonSupervisor, restart_backoff
from blip_server.triton import TritonOptions


def test_the_backoff_waits_only_from_the_third_quick_death_and_is_capped():
    assert [restart_backoff(n) for n in range(1, 10)] == [0, 0, 1, 2, 4, 8, 16, 30, 30]


class _Triton:
    """Stands in for EmbeddedTriton: what _restart does to the old one."""

    def __init__(self, events: list[str]):
        self.events = events
        self.returncode: int | None = None

    def kill(self) -> None:
        self.events.append("kill")

    def cleanup(self) -> None:
        self.events.append("cleanup")


class _Supervisor(TritonSupervisor):
    """A supervisor whose Triton starts at once; the clock is the test's: each death comes `served` seconds after
    the last start."""

    def __init__(self, tmp_path, **options):
        self.events: list[str] = []
        self.waits: list[int] = []
        super().__init__(TritonOptions(model_repository=tmp_path), stable_after=10.0, max_restarts=3,
                         backoff=lambda deaths: self.waits.append(deaths) or 0.0, **options)
        self.triton = _Triton(self.events)
        self.failing_starts = 0  # the next starts that fail (Triton exits while loading)
        self.failing_status = -6  # how they end: SIGABRT, as Triton 2.51's lock_exception abort
        self._ready_at = 1000.0  # started (and ready) at the test clock's 1000

    async def _start_once(self) -> None:
        self.events.append("start")
        self.triton.returncode = None
        if self.failing_starts:
            self.failing_starts -= 1
            self.triton.returncode = self.failing_status
            raise TritonStartError(f"tritonserver exited with status {self.failing_status} while starting:\n...")
        self._ready_at = 1000.0

    def die_after(self, served: float) -> None:
        asyncio.run(self._restart(asyncio.Event(), noticed=1000.0 + served))


def test_a_fault_after_serving_a_while_restarts_at_once_however_many_came_before(tmp_path):
    supervisor = _Supervisor(tmp_path)
    for _ in range(10):  # more than max_restarts: none of them quick
        supervisor.die_after(served=10.0)
    assert supervisor.waits == [0] * 10  # never a quick death in a row: the backoff asked for 0 of them
    assert supervisor.events == ["kill", "cleanup", "start"] * 10
    assert len(supervisor.recoveries) == 10


def test_quick_deaths_in_a_row_back_off_and_then_give_up_and_a_stable_run_resets_them(tmp_path):
    supervisor = _Supervisor(tmp_path)
    supervisor.die_after(served=1.0)
    supervisor.die_after(served=9.9)
    supervisor.die_after(served=30.0)  # served long enough: the count starts over
    supervisor.die_after(served=0.5)
    supervisor.die_after(served=0.5)
    supervisor.die_after(served=0.5)
    assert supervisor.waits == [1, 2, 0, 1, 2, 3]
    with pytest.raises(TritonStartError, match="failed 4 times in a row, each within 10 s of its start"):
        supervisor.die_after(served=0.5)
    assert supervisor.events[-2:] == ["kill", "cleanup"]  # the old one stopped, no new start
    assert supervisor.events.count("start") == 6


def test_a_start_that_fails_is_a_quick_death_and_is_tried_again(tmp_path):
    supervisor = _Supervisor(tmp_path)
    supervisor.failing_starts = 2
    supervisor.die_after(served=60.0)  # after serving a while: restarted at once; the two starts that fail are
    assert supervisor.waits == [0, 1, 2]  # quick deaths in a row, each backed off as one
    assert supervisor.events == ["kill", "cleanup", "start", "kill", "cleanup", "start", "kill", "cleanup", "start"]
    assert len(supervisor.recoveries) == 1
    supervisor.failing_starts = 10
    with pytest.raises(TritonStartError, match="failed 4 times in a row"):  # max_restarts 3: then it gives up
        supervisor.die_after(served=60.0)


def test_a_first_start_that_crashes_is_tried_again_with_the_backoff(tmp_path):
    supervisor = _Supervisor(tmp_path)
    supervisor.failing_starts = 2
    asyncio.run(supervisor.start())
    assert supervisor.events == ["start", "kill", "cleanup", "start", "kill", "cleanup", "start"]
    assert supervisor.waits == [1, 2]
    assert supervisor.triton.returncode is None  # the third one runs


@pytest.mark.parametrize("signum", [6, 11, 7])  # SIGABRT, SIGSEGV, SIGBUS (Linux numbers)
def test_a_first_start_that_keeps_crashing_gives_up_after_max_restarts(tmp_path, signum):
    supervisor = _Supervisor(tmp_path)
    supervisor.failing_starts, supervisor.failing_status = 10, -signum
    with pytest.raises(TritonStartError, match=f"exited with status -{signum}"):
        asyncio.run(supervisor.start())
    assert supervisor.events.count("start") == 4  # max_restarts 3: the first start and three more
    assert supervisor.waits == [1, 2, 3]


@pytest.mark.parametrize("status", [1, -9, -15])  # an error (a model that does not load), killed, told to stop
def test_a_first_start_that_fails_otherwise_is_not_tried_again(tmp_path, status):
    supervisor = _Supervisor(tmp_path)
    supervisor.failing_starts, supervisor.failing_status = 1, status
    with pytest.raises(TritonStartError, match=f"exited with status {status}"):
        asyncio.run(supervisor.start())
    assert supervisor.events == ["start"]
    assert supervisor.waits == []
