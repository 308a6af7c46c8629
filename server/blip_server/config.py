"""Configuration of `blip-serve`: one keyword-only dataclass, overridable from `BLIP_*` environment variables.

The command line is a thin layer over it: every flag's default comes from here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path


# Field annotation (a string, under `from __future__ import annotations`) -> parser of its variable.
FIELD_PARSERS = {"int": int, "float": float, "str": str, "Path": Path, "Path | None": Path}


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "blip-caption"


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """What `blip-serve` serves and where.

    model: HF checkpoint directory or exported model repository; unset: the demo checkpoint.
    precision: precision to export a checkpoint at.
    host, port: where the gateway (the typed gRPC API) listens.
    api_keys: comma-separated keys the gateway requires as `authorization: Bearer <key>`; empty: none.
    max_image_bytes: largest encoded image the gateway accepts.
    max_concurrent_requests: images in flight at once before the gateway answers RESOURCE_EXHAUSTED.
    stream_window: images of one CaptionStream in flight at once.
    shutdown_grace: seconds in-flight calls may take to finish on shutdown.
    triton_host: address Triton binds to (the gateway reaches it on loopback).
    triton_grpc_port, triton_http_port, triton_metrics_port: Triton's ports.
    cache_dir: where checkpoints exported on first use are kept (by content hash).
    startup_timeout: seconds to wait for Triton to load the models.
    triton_log: file Triton's log is appended to (default: its temporary work directory, removed on exit).
    """

    model: Path | None = None
    precision: str = "fp32"
    host: str = "127.0.0.1"
    port: int = 50051
    api_keys: str = ""
    max_image_bytes: int = 20 * 1024 * 1024
    max_concurrent_requests: int = 256
    stream_window: int = 16
    shutdown_grace: float = 10.0
    triton_host: str = "127.0.0.1"
    triton_grpc_port: int = 8001
    triton_http_port: int = 8000
    triton_metrics_port: int = 8002
    cache_dir: Path = field(default_factory=_default_cache_dir)
    startup_timeout: float = 300.0
    triton_log: Path | None = None

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "ServeConfig":
        """Defaults, overridden by BLIP_<FIELD> variables (e.g. BLIP_TRITON_GRPC_PORT=9001)."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            raw = environ.get(f"BLIP_{f.name.upper()}")
            if raw is None or raw == "":
                continue
            kind = FIELD_PARSERS[f.type]
            try:
                values[f.name] = kind(raw)
            except ValueError:
                raise ValueError(f"BLIP_{f.name.upper()}={raw!r} is not a valid {kind.__name__}") from None
        return cls(**values)
