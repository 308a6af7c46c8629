"""What Linux's /proc says about processes: children, process-group members, memory. No third-party library."""

from __future__ import annotations

import os
from pathlib import Path

PAGE_SIZE = 4096
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state, ppid, pgrp, ...), or None if it is gone."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def children(pid: int) -> dict[int, str]:
    """Live (not zombie) children of `pid` -> their command lines."""
    return {child: cmdline(child) for child in _pids() if is_child(child, pid)}


def is_child(pid: int, parent: int) -> bool:
    """`pid` is alive (not a zombie) and a child of `parent`: one file read, where `children` reads every
    process's."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z" and int(fields[1]) == parent


def descendants(pid: int) -> dict[int, str]:
    """`pid`'s children, their children, and so on."""
    found, frontier = {}, [pid]
    while frontier:
        kids = {}
        for parent in frontier:
            kids.update(children(parent))
        found.update(kids)
        frontier = list(kids)
    return found


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group."""
    return [pid for pid in _pids() if (fields := _stat(pid)) and fields[0] != "Z" and int(fields[2]) == pgid]


def _rollup(pid: int) -> dict[str, int]:
    """/proc/<pid>/smaps_rollup's sizes, in bytes, by field name (`Pss`, `Pss_Anon`, ...); {} if unreadable."""
    sizes = {}
    try:
        for line in (Path("/proc") / str(pid) / "smaps_rollup").read_text().splitlines():
            key, _, value = line.partition(":")
            if value.strip().endswith(" kB"):
                sizes[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        return {}
    return sizes


def pss_bytes(pid: int) -> int:
    """Proportional memory of one process (shared pages divided among the processes sharing them, so that the
    sum over processes counts Triton's shared-memory pool once), in bytes; its RSS where PSS is not readable."""
    pss = _rollup(pid).get("Pss")
    return rss_bytes(pid) if pss is None else pss


MEMORY_KINDS = {"Pss_Anon": "anon", "Pss_Shmem": "shmem", "Pss_File": "file"}


def memory_kinds(pid: int) -> dict[str, int]:
    """One process's PSS split by what backs it, in bytes: `anon` (heaps, arenas, anonymous mmaps), `shmem`
    (shared memory such as the Python backend's /dev/shm pool) and `file` (mapped libraries and files); {} if
    the kernel does not say (before Linux 5.0) or the process is gone."""
    sizes = _rollup(pid)
    return {kind: sizes[key] for key, kind in MEMORY_KINDS.items() if key in sizes}


def cpu_seconds(pid: int) -> float:
    """CPU time a process has used so far, user and system, all its threads (exited ones too), in seconds
    (0.0 if it is gone); the kernel counts it in clock ticks, 10 ms on most systems."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS if fields else 0.0


def rss_bytes(pid: int) -> int:
    """Resident memory of one process, in bytes (0 if it is gone)."""
    try:
        return int((Path("/proc") / str(pid) / "statm").read_text().split()[1]) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return 0
