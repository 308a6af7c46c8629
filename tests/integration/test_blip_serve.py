"""`blip-serve` as a user runs it: export on first use, ready line, real inference, clean stop, no orphans."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from blip_server import procfs
from blip_server.errors import TritonStartError
from blip_server.shared.cpu_turns import turns_path
from blip_server.triton import EmbeddedTriton, TritonOptions, remove_orphaned_shared_memory
from support import images, reference
from support.network import free_port
from support.serve import ServeProcess, wait_gone
from support.triton_requests import caption_inputs, captions


def test_serve_a_checkpoint_then_stop_cleanly(checkpoints, tmp_path):
    serve = ServeProcess("--model", str(checkpoints["standard"]), cache=tmp_path / "cache")
    try:
        ready = serve.wait_ready()
        assert f"Triton gRPC 127.0.0.1:{serve.ports['grpc']}" in ready
        assert f"gRPC API 127.0.0.1:{serve.ports['gateway']}" in ready
        image = images.kinds(seed=41)["jpeg"]
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{serve.ports['grpc']}")
        texts, scores = captions(client.infer("blip_caption", caption_inputs(image)))[0]
        expected = reference.caption(str(checkpoints["standard"]), image)
        assert texts == expected[0] and scores == pytest.approx(expected[1], abs=1e-4)
        (triton_pid,) = serve.children()
    finally:
        code, err = serve.stop()
    assert code == 0, err
    assert "stopping" in err
    assert wait_gone(triton_pid), "tritonserver or its Python stubs outlived blip-serve"
    assert not turns_path(triton_pid).exists()  # its CPU turns' file went with it
    assert len(list((tmp_path / "cache" / "repositories").glob("*/blip_export.json"))) == 1


def test_the_exported_checkpoint_is_reused_and_a_killed_server_leaves_no_orphans(checkpoints, tmp_path):
    cache = tmp_path / "cache"
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(checkpoints["unusual"], checkpoint)
    first = ServeProcess("--model", str(checkpoint), cache=cache)
    first.wait_ready()
    first.stop()
    second = ServeProcess("--model", str(checkpoint), cache=cache)
    second.wait_ready()
    (triton_pid,) = second.children()
    stubs = procfs.children(triton_pid)
    regions = {word for command in stubs.values() for word in command.split()
               if word.startswith("triton_python_backend_shm_region_")}
    code, err = second.stop(signal.SIGKILL)  # no chance to clean up: Triton must still die with it
    assert code == -signal.SIGKILL
    assert wait_gone(triton_pid) and all(wait_gone(pid) for pid in stubs), "Triton survived a killed blip-serve"
    # Whatever shared memory it left, the next start removes (here without the age rule)
    remove_orphaned_shared_memory(min_age=0)
    assert regions and not [r for r in regions if (Path("/dev/shm") / r).exists()]
    assert len(list((cache / "repositories").glob("*/blip_export.json"))) == 1


def test_an_unusable_model_path_is_reported(tmp_path):
    process = subprocess.run([ServeProcess.COMMAND, "--model", str(tmp_path), "--cache-dir", str(tmp_path)],
                             capture_output=True, text=True, timeout=60)
    assert process.returncode == 2
    assert "blip-serve: error:" in process.stderr and "no config.json" in process.stderr
    assert "Traceback" not in process.stderr


def test_a_server_that_cannot_load_its_models_reports_why(repositories, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(repositories["standard"], broken)
    (broken / "text_decoder" / "1" / "decoder.safetensors").unlink()
    triton = EmbeddedTriton(TritonOptions(model_repository=broken, grpc_port=free_port(), http_port=free_port(),
                                          metrics_port=free_port(), startup_timeout=120))
    triton.start()
    with pytest.raises(TritonStartError, match="(?s)exited with status 1.*decoder.safetensors"):
        triton.wait_ready()
    triton.stop()
    triton.cleanup()


def test_a_port_in_use_is_reported(repositories):
    port = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        triton = EmbeddedTriton(TritonOptions(model_repository=repositories["standard"], grpc_port=free_port(),
                                              http_port=port, metrics_port=free_port(), startup_timeout=120))
        triton.start()
        with pytest.raises(TritonStartError, match=f"(?s)exited with status.*127.0.0.1:{port}' already in use"):
            triton.wait_ready()
        triton.stop()
        triton.cleanup()


def _gpu_present() -> str:
    """Why this machine counts as having a GPU ('' if it does not): /dev/nvidia0, or `nvidia-smi -L` listing one."""
    if Path("/dev/nvidia0").exists():
        return "/dev/nvidia0 exists"
    if shutil.which("nvidia-smi"):
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
        if listed.returncode == 0 and listed.stdout.strip():
            return f"nvidia-smi -L lists {listed.stdout.strip().splitlines()[0]}"
    return ""


def test_device_cuda_loads_the_gpu_configs_and_says_why_it_cannot_run_without_a_gpu(repositories, tmp_path):
    """On a machine without a GPU --device cuda must fail loudly, never fall back to the CPU."""
    if reason := _gpu_present():
        pytest.skip(f"asserts Triton's 'no GPUs are available', and this machine has a GPU ({reason})")
    serve = ServeProcess("--model", str(repositories["standard"]), "--device", "cuda", "--startup-timeout", "120",
                         cache=tmp_path)
    code, log = serve.process.wait(timeout=180), serve.log()
    assert code == 2, log
    assert "blip-serve: error: tritonserver exited" in log
    assert "kind KIND_GPU but no GPUs are available" in log and "Traceback" not in log
