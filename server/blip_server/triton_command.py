"""Triton's command line and environment: one source for every Triton this project runs.

The embedded server (`blip-serve`, `EmbeddedTriton`) builds its command with `server_flags()`; in a container,
this file itself is `blip-tritonserver` (the Triton image copies it, with `memory.py` and `cpu_turns.py`, to
`/opt/blip`), which NGC's entrypoint runs:

    /opt/nvidia/nvidia_entrypoint.sh blip-tritonserver --model-repository=/models/repository [--model-config-name=gpu]

It adds the same flags and environment and execs `tritonserver`. Compose, Kubernetes and `docker run` pass only
the model repository, the config name and, where they differ, addresses and ports. Standard library only, and
Python 3.10 (NGC's image runs its Python).
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys

try:
    from blip_server.memory import MALLOC_ENVIRONMENT
    from blip_server.shared.cpu_turns import available_cores
except ImportError:  # in the Triton image, where memory.py and cpu_turns.py lie beside this file
    from cpu_turns import available_cores  # type: ignore[no-redef]
    from memory import MALLOC_ENVIRONMENT  # type: ignore[no-redef]

# Triton APIs no client of ours needs (inference, health, metadata, model config and statistics stay open).
RESTRICTED_APIS = ("model-repository", "shared-memory", "trace", "logging")
EXIT_TIMEOUT_SECONDS = 30

SERVER_FLAGS = (
    "--model-control-mode=none",
    "--strict-readiness=true",
    # Our configs are complete: no stub is started (importing torch or ONNX Runtime) to complete them first.
    "--disable-auto-complete-config",
    # Triton keeps up to 8 finished calls' request/response messages for reuse (default), and a message keeps the
    # capacity of the largest image it ever carried: up to 8 x --max-image-bytes held for good (found as fully
    # resident 17-35 MB mappings in an idle server after a soak). Reuse none.
    "--grpc-infer-allocation-pool-size=0",
    # Python-backend tensors travel through shared memory. The pool keeps every page it ever touched, and growing
    # it in small steps scatters large tensors over new pages: start it at 256 MiB (room for the tensors of dozens
    # of requests in flight) and grow it by 64 MiB when a burst needs more.
    "--backend-config=python,shm-default-byte-size=268435456",
    "--backend-config=python,shm-growth-byte-size=67108864",
)

# For tritonserver and its Python-backend stubs: glibc's allocator settings (memory.py), and no TF32: float32
# matrix products on Ampere and newer GPUs would otherwise round their inputs to 10-bit mantissas in cuBLAS, cuDNN
# and TensorRT engine builds (NVIDIA documents NVIDIA_TF32_OVERRIDE=0 for all three), and fp32 must be exact.
ENVIRONMENT = {**MALLOC_ENVIRONMENT, "NVIDIA_TF32_OVERRIDE": "0"}


def restricted_flags(admin_key: str) -> list[str]:
    """Closed even on a private network: the APIs that change what is served or read its memory and logs. Calls
    to them must carry a header whose value is `admin_key`, a random key that nothing is told."""
    closed = f"{','.join(RESTRICTED_APIS)}:admin-key={admin_key}"
    return [f"--grpc-restricted-protocol={closed}", f"--http-restricted-api={closed}"]


def onnxruntime_thread_flags(cores: int) -> list[str]:
    """The native onnxruntime backend (NVIDIA's image) as many threads as the cores this server may use: its
    model-level `intra_op_thread_count` 0 means every core of the node, which a container's CPU limit does not
    cap. One thread pool shared by its sessions (the backend then reads the counts from here only). Without that
    backend (the embedded server) Triton ignores these."""
    return ["--backend-config=onnxruntime,enable-global-threadpool=1",
            f"--backend-config=onnxruntime,intra_op_thread_count={cores}",
            "--backend-config=onnxruntime,inter_op_thread_count=1"]


def server_flags(admin_key: str, cores: int, exit_timeout: int = EXIT_TIMEOUT_SECONDS) -> list[str]:
    """Every flag a Triton of ours runs with, addresses, ports and paths aside. `exit_timeout`: seconds Triton may
    take to finish the requests in flight when it is told to stop."""
    return [*SERVER_FLAGS, f"--exit-timeout-secs={exit_timeout}", *restricted_flags(admin_key),
            *onnxruntime_thread_flags(cores)]


def main(argv: list[str] | None = None) -> None:
    """`blip-tritonserver ARGS...`: exec `tritonserver` with ARGS and this project's flags and environment."""
    args = sys.argv[1:] if argv is None else argv
    binary = shutil.which("tritonserver") or "/opt/tritonserver/bin/tritonserver"
    if "--print-command" in args:  # for tests and operators: show what would run, run nothing
        args = [a for a in args if a != "--print-command"]
        print("\n".join([*(f"{k}={v}" for k, v in ENVIRONMENT.items()), binary,
                         *server_flags("<random>", available_cores()), *args]))
        return
    environment = {**os.environ, **ENVIRONMENT}
    os.execve(binary, [binary, *server_flags(secrets.token_hex(16), available_cores()), *args], environment)


if __name__ == "__main__":
    main()
