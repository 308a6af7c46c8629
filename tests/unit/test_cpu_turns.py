"""The encoder and the decoder take turns on the CPU cores: while one model holds the turn, the other waits."""

from __future__ import annotations

import math
import multiprocessing
import os
import subprocess
import sys
import threading

import pytest

from blip_server.shared.cpu_turns import CpuTurns, available_cores, turns_path
from blip_server.triton import remove_stale_turn_files


def _hold(path, events, entered, release):
    with CpuTurns(path):
        events.put("first in")
        entered.set()
        release.wait(30)
        events.put("first out")


def _take(path, events, waiting):
    turns = CpuTurns(path)
    waiting.set()
    with turns:
        events.put("second in")


def test_a_process_waits_for_the_turn_another_holds(tmp_path):
    path = tmp_path / "turns"
    context = multiprocessing.get_context("spawn")
    events, entered, release, waiting = context.Queue(), context.Event(), context.Event(), context.Event()
    first = context.Process(target=_hold, args=(path, events, entered, release))
    first.start()
    assert entered.wait(60)
    second = context.Process(target=_take, args=(path, events, waiting))
    second.start()
    assert waiting.wait(60)
    release.set()  # the second can only enter after the first has left
    first.join(60)
    second.join(60)
    assert [events.get(timeout=10) for _ in range(3)] == ["first in", "first out", "second in"]
    assert first.exitcode == 0 and second.exitcode == 0


def test_a_turn_held_by_a_process_that_dies_is_given_back(tmp_path):
    path = tmp_path / "turns"
    code = (f"import os; from blip_server.shared.cpu_turns import CpuTurns; t = CpuTurns({str(path)!r}); "
            "t.__enter__(); os._exit(0)")  # dies holding the turn
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    with CpuTurns(path):
        pass


def test_the_files_of_servers_that_are_gone_are_removed(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # its pid names no process now (or, reused, not a tritonserver)
    for pid in (child.pid, os.getpid()):  # gone; alive but not a tritonserver
        turns_path(pid, tmp_path).touch()
    (tmp_path / "unrelated").touch()
    assert sorted(remove_stale_turn_files(tmp_path)) == sorted(turns_path(p, tmp_path).name
                                                               for p in (child.pid, os.getpid()))
    assert [p.name for p in tmp_path.iterdir()] == ["unrelated"]


def test_turns_switched_off_never_wait(tmp_path):
    path = tmp_path / "turns"
    held = CpuTurns(path)
    with held:  # another model's turn, held all along
        entered = threading.Event()

        def take():
            with CpuTurns(path, enabled=False):
                entered.set()

        thread = threading.Thread(target=take, daemon=True)
        thread.start()
        assert entered.wait(30)


def _cgroup(root, files: dict[str, str], own: str = "0::/\n"):
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "self-cgroup").write_text(own)
    return dict(cgroup=root / "fs", self_cgroup=root / "self-cgroup")


@pytest.mark.parametrize("files, own, quota", [
    ({"fs/cpu.max": "50000 100000\n"}, "0::/\n", 0.5),  # cgroup v2, in a container's namespace
    ({"fs/cpu.max": "150000 100000\n"}, "0::/\n", 1.5),  # rounded up
    ({"fs/kubepods/pod1/cpu.max": "100000 100000\n"}, "0::/kubepods/pod1\n", 1.0),  # v2, seen from the host
    ({"fs/cpu.max": "max 100000\n"}, "0::/\n", None),
    ({"fs/cpu/cpu.cfs_quota_us": "50000\n", "fs/cpu/cpu.cfs_period_us": "100000\n"}, "1:cpu:/\n", 0.5),  # v1
    ({"fs/cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "fs/cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, "", None),
    ({}, "", None),  # nothing to read
])
def test_threads_follow_the_cgroups_cpu_limit_within_the_affinity(tmp_path, files, own, quota):
    cores = len(os.sched_getaffinity(0))
    expected = cores if quota is None else max(1, min(cores, math.ceil(quota)))
    assert available_cores(**_cgroup(tmp_path, files, own)) == expected


def test_a_limit_above_the_affinity_leaves_the_affinity(tmp_path):
    cores = len(os.sched_getaffinity(0))
    assert available_cores(**_cgroup(tmp_path, {"fs/cpu.max": f"{(cores + 3) * 100000} 100000"})) == cores
