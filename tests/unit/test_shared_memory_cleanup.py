"""Regions a killed Triton left in /dev/shm are removed at the next start; live and new ones are not."""

from __future__ import annotations

import mmap
import os
import time

from blip_server.triton import remove_orphaned_shared_memory

PREFIX = "triton_python_backend_shm_region_"


def test_only_old_regions_that_no_process_maps_are_removed(tmp_path):
    old = time.time() - 600
    for name in ("orphan", "mapped", "new"):
        (tmp_path / f"{PREFIX}{name}").write_bytes(b"\0" * mmap.PAGESIZE)
    (tmp_path / "unrelated").write_bytes(b"x")
    for name in ("orphan", "mapped"):
        os.utime(tmp_path / f"{PREFIX}{name}", (old, old))
    os.utime(tmp_path / "unrelated", (old, old))
    with open(tmp_path / f"{PREFIX}mapped", "r+b") as file, mmap.mmap(file.fileno(), 0):  # as a live Triton does
        removed = remove_orphaned_shared_memory(tmp_path, min_age=120)
    assert removed == [f"{PREFIX}orphan"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{PREFIX}mapped", f"{PREFIX}new", "unrelated"]
