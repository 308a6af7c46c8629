"""The supervisor's restart rule: a fault after Triton served `stable_after` seconds restarts it at once; only
deaths soon after a start back off, and too many of those in a row give up. (The faults themselves, against the
real Triton: tests/integration/test_faults.py.)"""

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
        self._ready_at = 1000.0  # started (and ready) at the test clock's 1000

    async def start(self) -> None:
        self.events.append("start")
        if self.failing_starts:
            self.failing_starts -= 1
            raise TritonStartError("tritonserver exited with status -6 while starting:\nterminate called ...")
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
