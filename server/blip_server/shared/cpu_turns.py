"""Turns on the CPU cores for the models of one Triton server that compute on them.

The vision encoder (ONNX Runtime) and the text decoder (torch) each run fastest with a thread on every core. Run
at the same time on the same cores, they are slower together than one after the other: ONNX Runtime's threads
wait at every operator for the one the decoder's thread preempted, and the decoder, left one core, reads its
weights at half the memory's speed. So they take turns: a model holds the turn for one encoder run or one decode
step, with every core, and the other waits (an exclusive `flock` on one file per server, which the kernel gives
back if its holder dies). A decode step is short, so a new image waits for at most one step; decode steps wait for
an encoder run, and meanwhile more requests join the decode loop, whose next step then decodes them together.

`available_cores()` is how many threads a model starts when its `threads` parameter is 0.

This module is copied into the Triton models that use it (`blip-export`); the server's side of it is
`blip_server.triton`, which removes the files of servers that are gone.
"""

from __future__ import annotations

import fcntl
import math
import os
import tempfile
from pathlib import Path

PREFIX = "blip-cpu-turns-"
CGROUP = Path("/sys/fs/cgroup")


def available_cores(cgroup: Path = CGROUP, self_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    """The cores this process may use: its CPU affinity, capped by its cgroup's CPU quota rounded up (a container's
    CPU limit: Kubernetes' `limits.cpu`, Compose's `cpus`), where the affinity still shows every core of the node.
    Threads past the quota would only wait for it, and spin against the other containers' threads meanwhile."""
    cores = len(os.sched_getaffinity(0))
    quota = cpu_quota(cgroup, self_cgroup)
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def cpu_quota(cgroup: Path = CGROUP, self_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """CPUs' worth of time this process's cgroup may use per period; None: no limit (or no cgroup to read)."""
    try:  # cgroup v2: "<quota> <period>" or "max <period>", in the process's own cgroup
        relative = next(line[3:] for line in self_cgroup.read_text().splitlines() if line.startswith("0::"))
        quota, period = (cgroup / relative.lstrip("/") / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError, StopIteration):
        pass
    for controller in ("cpu", "cpu,cpuacct"):  # cgroup v1, as a container mounts it: -1 is no limit
        try:
            quota_us = int((cgroup / controller / "cpu.cfs_quota_us").read_text())
            period_us = int((cgroup / controller / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    return None


def turns_directory() -> Path:
    # Beside Triton's own Python-backend regions. The file holds no data: only its lock is used (opened 0600, at
    # a path named by the server's process id).
    return Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())  # nosec B108


def turns_path(server_pid: int, directory: Path | None = None) -> Path:
    """The file whose lock is the turn, for the Triton server of process id `server_pid`."""
    return (directory or turns_directory()) / f"{PREFIX}{server_pid}"


class CpuTurns:
    """`with turns:` waits for the turn and holds it for the block. A Python-backend model's process is a child of
    its server, so every model of one server finds the same file through its parent's process id. Not `enabled`
    (a GPU instance, or turns switched off): the block runs at once."""

    def __init__(self, path: Path | None = None, enabled: bool = True):
        self._fd = os.open(path or turns_path(os.getppid()), os.O_RDWR | os.O_CREAT, 0o600) if enabled else None

    def __enter__(self) -> CpuTurns:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
