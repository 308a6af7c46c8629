"""Configuration of `blip-serve` and `blip-gateway`: keyword-only dataclasses, overridable from `BLIP_*`
environment variables; the command lines are a thin layer over them.

Each field's help text lives beside it (`metadata={"help": ...}`); `parse_command_line` turns the fields into
flags (`max_image_bytes` -> `--max-image-bytes`), their defaults coming from the environment, then the class.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar, overload

PRECISIONS = ("fp32", "fp16", "int8")
IMAGE_PROCESSORS = ("pil", "torchvision")
DEVICES = ("cpu", "cuda")


def _list(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


class _Parser(Protocol):
    """Turns a flag's or variable's text into a field's value; named in error messages."""

    __name__: str

    def __call__(self, raw: str, /) -> object: ...


# Field annotation (a string, under `from __future__ import annotations`) -> parser of its text.
FIELD_PARSERS: dict[object, _Parser] = {
    "int": int, "float": float, "str": str, "Path": Path, "Path | None": Path, "tuple[str, ...]": _list,
}

_T = TypeVar("_T")
_Options = TypeVar("_Options", bound="GatewayOptions")


@overload
def option(default: _T, help: str = "", **argparse_options: object) -> _T: ...


@overload
def option(*, factory: Callable[[], _T], help: str = "", **argparse_options: object) -> _T: ...


def option(default: Any = MISSING, help: str = "", *, factory: Any = MISSING, **argparse_options: object) -> Any:
    """A config field with its help text (and extra argparse settings such as `choices`)."""
    metadata = {"help": help, "argparse": argparse_options}
    return field(default=default, default_factory=factory, metadata=metadata)


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "blip-caption"


@dataclass(frozen=True, kw_only=True)
class GatewayOptions:
    """What every gateway takes, in `blip-serve` and `blip-gateway` alike."""

    host: str = option("127.0.0.1", "address the gateway (the typed gRPC API) listens on")
    port: int = option(50051, "port of the gateway's typed gRPC API")
    metrics_port: int = option(0, "port of the Prometheus metrics endpoint, on the gateway's host; 0: none")
    api_keys: str = option("", "comma-separated keys the gateway requires as `authorization: Bearer <key>`; "
                               "empty: none")
    api_keys_file: Path | None = option(None, "a file of more such keys, separated by commas or line breaks (a "
                                              "mounted secret: unlike the environment, not inherited by child "
                                              "processes or shown in a process's environ); it must exist")
    tls_cert: Path | None = option(None, "PEM certificate chain of the gateway: serve TLS (with --tls-key)")
    tls_key: Path | None = option(None, "PEM private key of --tls-cert")
    tls_client_ca: Path | None = option(None, "PEM CA certificates: require clients to present a certificate they "
                                              "signed (mutual TLS)")
    max_image_bytes: int = option(20 * 1024 * 1024, "largest encoded image the gateway accepts")
    max_image_pixels: int = option(50_000_000, "largest image, in pixels, checked from its header before decoding "
                                                "(in the gateway and again in Triton)")
    max_image_side: int = option(20_000, "largest width or height of an image, in pixels, checked like "
                                         "--max-image-pixels")
    max_concurrent_requests: int = option(256, "images in flight at once before the gateway answers "
                                               "RESOURCE_EXHAUSTED")
    max_image_bytes_in_flight: int = option(256 * 1024 * 1024, "encoded bytes of the images sent to Triton at once; "
                                                                "more wait their turn (bounds the memory of bursts of "
                                                                "large images)")
    stream_window: int = option(16, "images of one CaptionStream in flight at once")
    max_wait_for_ready: float = option(60.0, "seconds a call may wait, in all, for a Triton replica to be ready "
                                             "(while none is: a restart, an outage; a call whose replica died under "
                                             "it waits so to be sent again), never past its deadline; then it is "
                                             "answered UNAVAILABLE. Waiting calls count in "
                                             "--max-concurrent-requests; 0: no wait (UNAVAILABLE at once)")
    shutdown_grace: float = option(10.0, "seconds in-flight calls may take to finish on shutdown")
    health_interval: float = option(1.0, "seconds between readiness checks of each Triton replica")
    health_timeout: float = option(2.0, "seconds a Triton replica may take to answer a readiness check before it "
                                        "counts as down")
    max_connection_age: float = option(300.0, "seconds a client's connection to the gateway may live (gRPC varies "
                                              "it by up to a tenth at random): then the gateway sends an HTTP/2 "
                                              "GOAWAY, the client's new calls go over a new connection, possibly to "
                                              "another gateway (clients spread onto the gateways a scale-out adds), "
                                              "and its calls in flight go on for --max-connection-age-grace; "
                                              "0: no limit")
    max_connection_age_grace: float = option(120.0, "seconds calls in flight on a connection past its "
                                                    "--max-connection-age may still take (a CaptionStream "
                                                    "included): then the connection is closed and they end "
                                                    "UNAVAILABLE (a stream that must last longer should be reopened "
                                                    "by its client); 0: no limit")


@dataclass(frozen=True, kw_only=True)
class GatewayConfig(GatewayOptions):
    """`blip-gateway`: the gateway alone, over Triton replicas that run elsewhere."""

    triton: tuple[str, ...] = option((), "a Triton gRPC endpoint, HOST:PORT, or dns:///NAME:PORT for every "
                                            "address NAME resolves to; repeat for more (env: comma-separated)",
                                     action="append")
    dns_refresh: float = option(5.0, "seconds between re-resolutions of dns:/// endpoints")
    drain_grace: float = option(60.0, "seconds a Triton replica that left the answer of its dns:/// name (a "
                                      "scale-down, a rollout) may take to finish its calls in flight; it takes no "
                                      "new call meanwhile, and its channel closes once they end, or at the end of "
                                      "the grace, cancelling what is left (each retried once on another replica)")


@dataclass(frozen=True, kw_only=True)
class ServeConfig(GatewayOptions):
    """`blip-serve`: one gateway and one supervised embedded Triton."""

    model: tuple[str, ...] = option((), "a model to serve: NAME=PATH, or PATH (named after its folder), where PATH "
                                        "is an HF checkpoint directory or an exported model repository; repeat to "
                                        "serve several side by side, the first being the default (env: "
                                        "comma-separated); unset: the demo checkpoint, named blip-demo",
                                   action="append")
    precision: str = option("", "precision to export a checkpoint at: fp32 (exact; the default), int8 (faster "
                                "on CPUs), fp16 (GPUs; needs --device cuda). For an exported repository: must "
                                "be what it was exported with, if given", choices=PRECISIONS)
    image_processor: str = option("", "which transformers BlipImageProcessor a checkpoint's pixels equal: pil "
                                      "(transformers without torchvision installed, as in a plain install; the "
                                      "default) or torchvision (with it). For an exported repository: must be what "
                                      "it was exported with, if given", choices=IMAGE_PROCESSORS)
    device: str = option("cpu", "where the encoder and decoder run: cpu, or cuda (an NVIDIA GPU, with "
                                "onnxruntime-gpu and a CUDA build of torch installed)", choices=DEVICES)
    triton_host: str = option("127.0.0.1", "address Triton binds to (the gateway reaches it on loopback)")
    triton_grpc_port: int = option(8001, "Triton's gRPC port")
    triton_http_port: int = option(8000, "Triton's HTTP port")
    triton_metrics_port: int = option(8002, "Triton's metrics port")
    cache_dir: Path = option(factory=_default_cache_dir,
                             help="where checkpoints exported on first use are kept (by content hash)")
    startup_timeout: float = option(300.0, "seconds to wait for Triton to load the models")
    triton_log: Path | None = option(None, "file Triton's log is appended to (default: its temporary work "
                                           "directory, removed on exit)")
    response_cache_mb: float = option(64.0, "MiB of Triton's response cache: a deterministic request (beam search, "
                                            "greedy, or sampling with a seed) whose image, prompt and options "
                                            "equal an earlier one's is answered from it without running a model "
                                            "(fractions allowed); 0: no cache")


def from_env(cls: type[_Options], environ: Mapping[str, str] | None = None) -> _Options:
    """Defaults of `cls`, overridden by BLIP_<FIELD> variables (e.g. BLIP_TRITON_GRPC_PORT=9001)."""
    variables: Mapping[str, str] = os.environ if environ is None else environ
    # Each value has its own field's type, known from the field's annotation at run time only.
    values: dict[str, Any] = {}
    for f in fields(cls):
        raw = variables.get(f"BLIP_{f.name.upper()}")
        if raw is None or raw == "":
            continue
        kind = FIELD_PARSERS[f.type]
        try:
            values[f.name] = kind(raw)
        except ValueError:
            raise ValueError(f"BLIP_{f.name.upper()}={raw!r} is not a valid {kind.__name__}") from None
    return cls(**values)


def parse_command_line(cls: type[_Options], argv: Sequence[str] | None, *, prog: str, description: str,
                       environ: Mapping[str, str] | None = None) -> _Options:
    """`cls` from flags, whose defaults come from BLIP_* variables, then from the class."""
    defaults = from_env(cls, environ)
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for f in fields(cls):
        value = getattr(defaults, f.name)
        extra = dict(f.metadata.get("argparse", {}))
        help_text = f.metadata.get("help", "").rstrip(".")
        if extra.get("action") == "append":
            # argparse appends to a default list: start from None and fall back to the environment's value.
            shown = ",".join(value) or "none"
            parser.add_argument("--" + f.name.replace("_", "-"), type=str, default=None,
                                help=f"{help_text} (default: {shown}; env BLIP_{f.name.upper()})", **extra)
            continue
        parser.add_argument("--" + f.name.replace("_", "-"), type=FIELD_PARSERS[f.type], default=value,
                            help=f"{help_text} (default: %(default)s; env BLIP_{f.name.upper()})", **extra)
    args = vars(parser.parse_args(argv))
    for f in fields(cls):
        if f.metadata.get("argparse", {}).get("action") == "append":
            args[f.name] = tuple(args[f.name]) if args[f.name] is not None else getattr(defaults, f.name)
    return replace(defaults, **args)
