"""In a running server the vision encoder and a text decoder that steps on several threads share one turn on the
CPU cores (cpu_turns.py): both of its Python-backend processes hold the file named after their tritonserver open,
and starting another server does not remove it. A decoder whose steps are small runs one thread and takes no turn
(text_decoder/1/model.py, step_threads)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from blip_bench.processes import short_name
from blip_server import procfs
from blip_server.model_configs import set_parameters
from blip_server.shared.cpu_turns import turns_path
from blip_server.triton import remove_stale_turn_files
from support.serve import ServeProcess


def _open_files(pid: int) -> set[str]:
    files = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            files.add(os.readlink(fd))
        except OSError:
            continue
    return files


def _holders(serve) -> tuple[Path, dict[str, list[int]]]:
    processes: dict[str, list[int]] = {}
    for pid, command in procfs.descendants(serve.process.pid).items():
        processes.setdefault(short_name(command), []).append(pid)
    (triton,) = processes["tritonserver"]
    path = turns_path(triton)
    assert path.exists(), serve.triton_log_tail()
    holding = {model: [pid for pid in pids if str(path) in _open_files(pid)] for model, pids in processes.items()}
    return path, holding


def test_the_encoder_and_a_threaded_decoder_of_a_server_share_its_turn(repositories, tmp_path):
    repository = tmp_path / "repository"
    shutil.copytree(repositories["standard"], repository)
    set_parameters(repository / "text_decoder" / "config.pbtxt", threads=2)
    serve = ServeProcess("--model", str(repository), cache=tmp_path / "cache")
    try:
        serve.wait_ready()
        path, holding = _holders(serve)
        assert holding["stub vision_encoder"] and holding["stub text_decoder"], holding
        assert not holding["stub preprocess"], holding
        remove_stale_turn_files()  # as another server's start does
        assert path.exists()
    finally:
        code, log = serve.stop()
    assert code == 0, log


def test_a_small_decoder_steps_on_one_thread_and_takes_no_turn(service):
    _, holding = _holders(service)
    assert holding["stub vision_encoder"] and not holding["stub text_decoder"], holding
