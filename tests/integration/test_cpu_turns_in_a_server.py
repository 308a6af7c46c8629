"""In a running server the vision encoder and the text decoder share one turn on the CPU cores (cpu_turns.py):
both of its Python-backend processes hold the file named after their tritonserver open, and starting another
server does not remove it."""

from __future__ import annotations

import os
from pathlib import Path

from blip_server import procfs
from blip_server.processes import short_name
from blip_server.shared.cpu_turns import turns_path
from blip_server.triton import remove_stale_turn_files


def _open_files(pid: int) -> set[str]:
    files = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            files.add(os.readlink(fd))
        except OSError:
            continue
    return files


def test_the_encoder_and_the_decoder_of_a_server_share_its_turn(service):
    processes = {}
    for pid, command in procfs.descendants(service.process.pid).items():
        processes.setdefault(short_name(command), []).append(pid)
    (triton,) = processes["tritonserver"]
    path = turns_path(triton)
    assert path.exists(), service.triton_log_tail()
    for model in ("stub vision_encoder", "stub text_decoder"):
        assert all(str(path) in _open_files(pid) for pid in processes[model]), (model, processes)
    assert not any(str(path) in _open_files(pid) for pid in processes["stub preprocess"])
    remove_stale_turn_files()  # as another server's start does
    assert path.exists()
