"""One source for Triton's command line: the embedded server (blip-serve) and every container (the Triton image's
CMD, Compose, Kubernetes) run the same flags and environment from server/blip_server/triton_command.py; the
containers through `blip-tritonserver` behind NGC's entrypoint, passing only paths and the config name."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from blip_server import triton_command
from blip_server.triton import EmbeddedTriton, TritonOptions
from support.deployment import compose, find, kustomize

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "triton" / "Dockerfile"
# What may differ between one Triton and another: where it is and where it listens.
PER_SERVER = ("--model-repository=", "--backend-directory=", "--grpc-address=", "--grpc-port=", "--http-address=",
              "--http-port=", "--metrics-address=", "--metrics-port=", "--log-verbose=", "--model-config-name=",
              "--cache-directory=")  # the wheel's caches; the image's are where Triton looks by default
CONTAINER_ARGS = ["--model-repository=/models/repository"]


def _without_per_server(flags: list[str]) -> list[str]:
    return [re.sub(r"admin-key=\S+", "admin-key=KEY", f) for f in flags if not f.startswith(PER_SERVER)]


def _image_files(tmp_path: Path) -> Path:
    """The files the Triton image copies to /opt/blip, laid out as there (nothing of the project importable)."""
    copied = re.search(r"^COPY (server/\S+triton_command\.py .*) /opt/blip/$", DOCKERFILE.read_text(), re.M).group(1)
    for source in copied.split():
        shutil.copy(ROOT / source, tmp_path / Path(source).name)
    return tmp_path / "triton_command.py"


def _container_command(tmp_path: Path, **variables: str) -> tuple[dict[str, str], list[str]]:
    """(environment, command) that `blip-tritonserver` in the image would exec, printed by itself; `variables`:
    the container's environment variables beside this one's."""
    run = subprocess.run([sys.executable, "-I", str(_image_files(tmp_path)), "--print-command", *CONTAINER_ARGS],
                         capture_output=True, text=True, timeout=60, env={**os.environ, **variables})
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    binary = next(i for i, line in enumerate(lines) if "tritonserver" in line and "=" not in line)
    return dict(line.split("=", 1) for line in lines[:binary]), lines[binary + 1:]


def test_the_container_runs_the_embedded_servers_flags_and_environment(tmp_path):
    environment, container = _container_command(tmp_path)
    embedded = EmbeddedTriton(TritonOptions(model_repository=tmp_path))
    try:
        local = embedded.command()[1:]
        assert {k: embedded._environment()[k] for k in triton_command.ENVIRONMENT} == environment
    finally:
        embedded.cleanup()
    assert _without_per_server(container) == _without_per_server(local)
    assert container[-len(CONTAINER_ARGS):] == CONTAINER_ARGS
    # What the security table and the soak's memory figures rest on, and fp32 exactness on GPUs.
    for flag in ("--grpc-infer-allocation-pool-size=0", "--disable-auto-complete-config", "--model-control-mode=none",
                 "--backend-config=python,shm-default-byte-size=268435456"):
        assert flag in container
    assert any(f.startswith("--grpc-restricted-protocol=model-repository,shared-memory,trace,logging:admin-key=")
               for f in container)
    assert environment["NVIDIA_TF32_OVERRIDE"] == "0" and environment["MALLOC_ARENA_MAX"] == "2"


def test_the_containers_onnxruntime_threads_are_its_cpu_limit(tmp_path):
    """The native onnxruntime backend's own default (0) is every core of the node; blip-tritonserver gives it the
    cores the container may use, as the Python models count them (a CPU quota counts)."""
    from blip_server.shared.cpu_turns import available_cores

    _, container = _container_command(tmp_path)
    assert "--backend-config=onnxruntime,enable-global-threadpool=1" in container
    assert f"--backend-config=onnxruntime,intra_op_thread_count={available_cores()}" in container


def test_the_admin_key_is_new_for_every_start(tmp_path, monkeypatch):
    executed = []
    monkeypatch.setattr(triton_command.os, "execve", lambda binary, argv, env: executed.append((argv, env)))
    triton_command.main(CONTAINER_ARGS)
    triton_command.main(CONTAINER_ARGS)
    keys = [re.search(r"admin-key=(\w+)", " ".join(argv)).group(1) for argv, _ in executed]
    assert len(keys[0]) == 32 and keys[0] != keys[1]
    assert executed[0][1]["NVIDIA_TF32_OVERRIDE"] == "0"


# -- every container runs it, behind NGC's entrypoint -------------------------------------------------------------


def test_the_triton_image_runs_blip_tritonserver_behind_ngcs_entrypoint():
    text = DOCKERFILE.read_text()
    assert re.search(r'^ENTRYPOINT \["/opt/nvidia/nvidia_entrypoint.sh"\]$', text, re.M)
    assert re.search(r'^CMD \["blip-tritonserver", "--model-repository=/models/repository"\]$', text, re.M)
    assert "exec python3 /opt/blip/triton_command.py" in text


@pytest.mark.parametrize("name, gpu", [("docker-compose.yml", True), ("docker-compose.cpu.yml", False)])
def test_compose_runs_blip_tritonserver(name, gpu):
    triton = compose(name)["services"]["triton"]
    assert triton["command"] == ["blip-tritonserver", *CONTAINER_ARGS, *(["--model-config-name=gpu"] if gpu else [])]
    assert "entrypoint" not in triton  # the image's: NGC's


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_kubernetes_runs_blip_tritonserver(overlay):
    _, documents = kustomize(ROOT / "deploy" / "kubernetes" / "overlays" / overlay)
    (triton,) = find(documents, "Deployment", "blip-triton")["spec"]["template"]["spec"]["containers"]
    assert "command" not in triton  # `args` only: the image's entrypoint (NGC's) stays in front
    assert triton["args"] == ["blip-tritonserver", *CONTAINER_ARGS,
                              *(["--model-config-name=gpu"] if overlay == "gpu" else [])]


def test_no_deployment_file_passes_triton_flags_of_its_own():
    """Flags beyond paths and the config name live in triton_command.py only: a flag written in a deployment file
    would make that Triton differ from the tested one."""
    files = [ROOT / "docker-compose.yml", ROOT / "docker-compose.cpu.yml", *sorted((ROOT / "docker").rglob("*")),
             *sorted((ROOT / "deploy").rglob("*.yaml"))]
    server_flags = {f.split("=")[0] for f in triton_command.server_flags("k", 1)} | {
        "--exit-on-error", "--strict-model-config"}
    for path in files:
        if path.is_file():
            text = path.read_text()
            assert not [flag for flag in server_flags if flag in text], path


# -- the response cache: one flag, blip-serve's and every container's ---------------------------------------------


def test_the_response_cache_is_on_by_default_in_blip_serve_and_every_container(tmp_path):
    from blip_server.config import ServeConfig, parse_command_line

    size = f"--cache-config=local,size={int(triton_command.RESPONSE_CACHE_MB * 2**20)}"
    assert ServeConfig().response_cache_mb == TritonOptions(model_repository=tmp_path).response_cache_mb == 64.0
    assert size in _container_command(tmp_path)[1]
    embedded = EmbeddedTriton(TritonOptions(model_repository=tmp_path))
    try:
        command = embedded.command()
    finally:
        embedded.cleanup()
    assert size in command
    (directory,) = [f.split("=", 1)[1] for f in command if f.startswith("--cache-directory=")]
    assert (Path(directory) / "local" / "libtritoncache_local.so").is_file()  # the wheel's local cache
    # --response-cache-mb, else BLIP_RESPONSE_CACHE_MB, as every flag of blip-serve
    config = parse_command_line(ServeConfig, ["--response-cache-mb", "0.5"], prog="blip-serve", description="",
                                environ={"BLIP_RESPONSE_CACHE_MB": "8"})
    assert config.response_cache_mb == 0.5
    assert parse_command_line(ServeConfig, [], prog="blip-serve", description="",
                              environ={"BLIP_RESPONSE_CACHE_MB": "8"}).response_cache_mb == 8.0


def test_the_response_cache_takes_its_size_in_mib_and_0_turns_it_off(tmp_path):
    assert triton_command.response_cache_flags(1 / 1024) == ["--cache-config=local,size=1024"]
    assert triton_command.response_cache_flags(0) == []
    for wrong in (-1, 1e-9):
        with pytest.raises(ValueError, match="give 0"):
            triton_command.response_cache_flags(wrong)
    embedded = EmbeddedTriton(TritonOptions(model_repository=tmp_path, response_cache_mb=0))
    try:
        assert not [f for f in embedded.command() if f.startswith(("--cache-config", "--cache-directory"))]
    finally:
        embedded.cleanup()
    _, container = _container_command(tmp_path, BLIP_RESPONSE_CACHE_MB="0")
    assert not [f for f in container if f.startswith("--cache")]
    _, container = _container_command(tmp_path, BLIP_RESPONSE_CACHE_MB="0.5")
    assert "--cache-config=local,size=524288" in container


def test_blip_serve_refuses_a_response_cache_it_cannot_make(capsys):
    from blip_server.serve import main as serve_main

    assert serve_main(["--response-cache-mb", "-1"]) == 2
    assert "a response cache of -1.0 MiB" in capsys.readouterr().err
