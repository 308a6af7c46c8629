"""Triton's command line and environment: one source for every Triton this project runs.

The embedded server (`blip-serve`, `EmbeddedTriton`) builds its command with `server_flags()`; in a container,
this file itself is `blip-tritonserver` (the Triton image copies it, with `memory.py` and `cpu_turns.py`, to
`/opt/blip`), which NGC's entrypoint runs:

    /opt/nvidia/nvidia_entrypoint.sh blip-tritonserver --model-repository=/models/repository [--model-config-name=gpu]

It adds the same flags and environment and execs `tritonserver`. Compose, Kubernetes and `docker run` pass only
the model repository, the config name and, where they differ, addresses and ports. Tracing: set OpenTelemetry's
variables on the Triton container (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME; `trace_flags`). Standard
library only, and Python 3.10 (NGC's image runs its Python).
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
from collections.abc import Mapping

try:
    from blip_server.memory import MALLOC_ENVIRONMENT
    from blip_server.shared.cpu_turns import available_cores
except ImportError:  # in the Triton image, where memory.py and cpu_turns.py lie beside this file
    from cpu_turns import available_cores  # type: ignore[no-redef,import-not-found]
    from memory import MALLOC_ENVIRONMENT  # type: ignore[no-redef,import-not-found]

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

# Triton's response cache (docs/architecture.md, "Response cache"): MiB of its local cache, which answers a request
# whose inputs equal an earlier one's without running a model. An entry is a request's captions and scores (about
# 160 bytes for one caption), so 64 MiB keeps some 400,000 answers. `blip-serve --response-cache-mb`; in a
# container, the BLIP_RESPONSE_CACHE_MB variable (read by main() below); 0: no cache.
RESPONSE_CACHE_MB = 64.0


def response_cache_flags(megabytes: float) -> list[str]:
    """Triton's local response cache of `megabytes` MiB (fractions allowed); none for 0."""
    size = int(megabytes * 2**20)
    if megabytes < 0 or (megabytes > 0 and size == 0):
        raise ValueError(f"a response cache of {megabytes} MiB: give 0 (none) or at least one byte's worth")
    return [f"--cache-config=local,size={size}"] if size else []


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


def traces_endpoint(environ: Mapping[str, str]) -> str | None:
    """Where spans go, by OpenTelemetry's standard variables, for the gateway and Triton alike; None: tracing off
    (the default). On when OTEL_EXPORTER_OTLP_TRACES_ENDPOINT (the URL itself) or OTEL_EXPORTER_OTLP_ENDPOINT (a
    base URL, `/v1/traces` added) is set, unless OTEL_TRACES_EXPORTER is `none` or OTEL_SDK_DISABLED `true`. OTLP
    over HTTP only (Triton's exporter knows no other): ValueError for another exporter or protocol."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() or "otlp"
    if exporter == "none":
        return None
    if exporter != "otlp":
        raise ValueError(f"OTEL_TRACES_EXPORTER={exporter!r}: traces go to otlp (over HTTP) or none")
    protocol = (environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf").strip()
    if protocol != "http/protobuf":
        raise ValueError(f"OTLP protocol {protocol!r}: traces are sent over http/protobuf (an OTLP/HTTP receiver, "
                         "port 4318 by convention)")
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    return endpoint or (base.rstrip("/") + "/v1/traces" if base else None)


def trace_flags(environ: Mapping[str, str]) -> list[str]:
    """Triton's OpenTelemetry tracing, on with the gateway's (`traces_endpoint`) and to the same endpoint: a span
    for the gRPC request, one for the ensemble and one per model (queue start as an event), each model's compute
    (compute start and end, inputs and outputs, as events). Measured on Triton 2.51 (docs/architecture.md,
    "Tracing"): a request carrying a W3C `traceparent` is traced as its child, whatever its sampled flag, and
    `rate` counts only the others, 0 tracing none of them. So rate 0: Triton traces exactly the calls the gateway
    sampled (it passes a traceparent on for those alone) and those of a client that sends its own, and no trace
    is ever Triton's half of a call. service.name is OTEL_SERVICE_NAME (Triton reads OTEL_RESOURCE_ATTRIBUTES
    itself, not that one), else Triton's `triton-inference-server`. Only timestamps: never tensors (images)."""
    endpoint = traces_endpoint(environ)
    if endpoint is None:
        return []
    service = environ.get("OTEL_SERVICE_NAME", "").strip()
    return ["--trace-config=mode=opentelemetry", "--trace-config=rate=0", "--trace-config=level=TIMESTAMPS",
            f"--trace-config=opentelemetry,url={endpoint}",
            *([f"--trace-config=opentelemetry,resource=service.name={service}"] if service else [])]


def server_flags(admin_key: str, cores: int, exit_timeout: int = EXIT_TIMEOUT_SECONDS,
                 response_cache_mb: float = RESPONSE_CACHE_MB) -> list[str]:
    """Every flag a Triton of ours runs with, addresses, ports and paths aside. `exit_timeout`: seconds Triton may
    take to finish the requests in flight when it is told to stop; `response_cache_mb`: its response cache.
    Tracing follows OpenTelemetry's variables in this process's environment (`trace_flags`)."""
    return [*SERVER_FLAGS, f"--exit-timeout-secs={exit_timeout}", *restricted_flags(admin_key),
            *onnxruntime_thread_flags(cores), *response_cache_flags(response_cache_mb),
            *trace_flags(os.environ)]


def _response_cache_mb() -> float:
    """The container's response cache: BLIP_RESPONSE_CACHE_MB (as for blip-serve), else the default."""
    raw = os.environ.get("BLIP_RESPONSE_CACHE_MB", "")
    return float(raw) if raw else RESPONSE_CACHE_MB


def main(argv: list[str] | None = None) -> None:
    """`blip-tritonserver ARGS...`: exec `tritonserver` with ARGS and this project's flags and environment."""
    args = sys.argv[1:] if argv is None else argv
    binary = shutil.which("tritonserver") or "/opt/tritonserver/bin/tritonserver"
    if "--print-command" in args:  # for tests and operators: show what would run, run nothing
        args = [a for a in args if a != "--print-command"]
        print("\n".join([*(f"{k}={v}" for k, v in ENVIRONMENT.items()), binary,
                         *server_flags("<random>", available_cores(), response_cache_mb=_response_cache_mb()),
                         *args]))
        return
    environment = {**os.environ, **ENVIRONMENT}
    flags = server_flags(secrets.token_hex(16), available_cores(), response_cache_mb=_response_cache_mb())
    os.execve(binary, [binary, *flags, *args], environment)


if __name__ == "__main__":
    main()
