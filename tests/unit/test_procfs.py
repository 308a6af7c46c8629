"""procfs: a process's CPU time (which `blip-bench` turns into the gateway's share of the server's CPU) and whether a
process is a live child of another (how the supervisor checks Triton's stubs)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from blip_server import procfs


def test_cpu_seconds_counts_the_time_a_process_computes_and_not_the_time_it_waits():
    before = procfs.cpu_seconds(os.getpid())
    started = time.perf_counter()
    while procfs.cpu_seconds(os.getpid()) - before < 0.3:  # busy until /proc says 0.3 s were used (other load or not)
        assert time.perf_counter() - started < 20, "busy for 20 s and not counted"
    # no more than the time that passed: a thread computes for at most the time it runs (one tick of rounding)
    assert procfs.cpu_seconds(os.getpid()) - before <= time.perf_counter() - started + 2 / procfs.CLOCK_TICKS

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.6)"])
    try:
        time.sleep(0.45)  # it started and now sleeps
        assert procfs.cpu_seconds(sleeper.pid) < 0.3  # its interpreter's start-up, not its 0.6 s of sleep
    finally:
        sleeper.wait()
    assert procfs.cpu_seconds(sleeper.pid) == 0.0  # gone


def test_is_child_sees_a_live_child_and_neither_a_zombie_nor_a_grandchild_nor_a_parent():
    # The child starts a grandchild and prints its pid: three live processes, each the parent of the next.
    child = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys; g = subprocess.Popen([sys.executable, '-c', "
         "'import sys; sys.stdin.read()'], stdin=subprocess.PIPE); print(g.pid, flush=True); sys.stdin.read(); "
         "g.stdin.close(); g.wait()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        grandchild = int(child.stdout.readline())
        assert procfs.is_child(child.pid, os.getpid())
        assert procfs.is_child(grandchild, child.pid)  # any live parent, not only the caller
        assert not procfs.is_child(grandchild, os.getpid())  # a descendant is not a child
        assert not procfs.is_child(os.getpid(), child.pid)  # nor is the parent its child's
        assert not procfs.is_child(child.pid, grandchild)
        child.stdin.close()  # it exits, and stays a zombie until waited for
        deadline = time.monotonic() + 10
        while procfs.is_child(child.pid, os.getpid()) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not procfs.is_child(child.pid, os.getpid())
        assert (procfs._stat(child.pid) or ["gone"])[0] == "Z"  # not reaped: what the supervisor sees of a dead stub
    finally:
        if not child.stdin.closed:  # a failed check above: let it (and its child) exit
            child.stdin.close()
        child.wait()
        child.stdout.close()
    assert not procfs.is_child(child.pid, os.getpid())
