"""The `blip-serve` command: export the model if needed, run the gateway and Triton, keep Triton running, stop.

The gateway answers from the start; its health is NOT_SERVING until Triton is ready, and again whenever Triton
is down. If Triton dies, loses a Python-backend stub or hangs, it is restarted (see `supervisor`; calls meanwhile
wait for it, within their deadlines and --max-wait-for-ready, and calls it lost are sent again); after too many
deaths in a row soon after starting, blip-serve gives up and exits non-zero.
SIGTERM/SIGINT stop the gateway (in-flight calls get a grace period) and then Triton; a second signal kills
Triton at once. Either way blip-serve exits only once Triton and every one of its stubs has exited.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import tempfile
import time
from pathlib import Path

from blip_server.config import ServeConfig, parse_command_line
from blip_server.errors import BlipServerError, TritonStartError
from blip_server.export import ExportOptions
from blip_server.gateway.captioner import Captioner
from blip_server.gateway.main import start_gateway
from blip_server.memory import bound_heap
from blip_server.model_store import demo_checkpoint, export_in_child, resolve_repository
from blip_server.repository import read_manifest
from blip_server.served_models import combine, parse_model_arguments
from blip_server.supervisor import TritonSupervisor
from blip_server.triton import TritonOptions, connect_host
from blip_server.triton_command import response_cache_flags

log = logging.getLogger("blip-serve")


async def _reach(captioner: Captioner, timeout: float) -> None:
    """Wait until the gateway's own channel reaches the ready ensemble (Triton answered ready already)."""
    deadline = time.monotonic() + timeout
    while not await captioner.ready():
        if time.monotonic() > deadline:
            raise TritonStartError(f"Triton is ready but the gateway could not reach it within {timeout:.0f} s")
        await asyncio.sleep(0.02)


def describe(name: str, asked: Path | None, repository: Path) -> str:
    """A served model for the ready line: what was asked for (a cached export is shared by every checkpoint with
    the same content, so its manifest may name another copy's path), how it was exported, and where."""
    manifest = read_manifest(repository)
    return (f"{name} = {asked or demo_checkpoint()} ({manifest.get('precision', 'fp32')}, "
            f"{manifest.get('image_processor', 'pil')} image processor, {repository})")


async def serve(config: ServeConfig, repository: Path, served: str = "") -> int:
    """Serve `repository` (one model repository, every served model in it); `served` describes them."""
    served = served or str(repository)
    endpoint = f"{connect_host(config.triton_host)}:{config.triton_grpc_port}"
    gateway = await start_gateway(config, (endpoint,), service="blip-serve")
    captioner = gateway.captioner
    health = asyncio.create_task(gateway.follow_triton(config.health_interval))

    async def down(why: str) -> None:  # calls wait (within their deadlines) until Triton is back
        captioner.replicas.suspend(endpoint, why)
        await gateway.set_serving(False)

    async def up() -> None:
        captioner.replicas.resume(endpoint)
        await _reach(captioner, timeout=30.0)
        await gateway.set_serving(True)

    supervisor = TritonSupervisor(TritonOptions(
        model_repository=repository, host=config.triton_host, grpc_port=config.triton_grpc_port,
        http_port=config.triton_http_port, metrics_port=config.triton_metrics_port,
        startup_timeout=config.startup_timeout, log_path=config.triton_log,
        model_config_name="gpu" if config.device == "cuda" else "",
        environment={"BLIP_MAX_IMAGE_PIXELS": str(config.max_image_pixels),
                     "BLIP_MAX_IMAGE_SIDE": str(config.max_image_side)},
        response_cache_mb=config.response_cache_mb,
    ), on_down=down, on_up=up, probe_timeout=config.health_timeout)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():  # a second signal: no more grace
            log.info("second signal: killing Triton now")
            supervisor.kill()
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    try:
        log.info("starting Triton (model repository %s)", repository)
        starting = asyncio.create_task(supervisor.start())
        await asyncio.wait({starting, asyncio.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            return 0
        starting.result()
        await _reach(captioner, timeout=30.0)
        await gateway.set_serving(True)
        metrics = f", metrics http://{config.host}:{gateway.metrics_port}/metrics" if gateway.metrics_port else ""
        print(
            f"blip-serve: ready: gRPC API {config.host}:{gateway.port} (blip.caption.v1.CaptionService){metrics}; "
            f"Triton gRPC {config.triton_host}:{config.triton_grpc_port}, "
            f"HTTP {config.triton_host}:{config.triton_http_port}, "
            f"metrics {config.triton_host}:{config.triton_metrics_port}; models {served}",
            flush=True,
        )
        await supervisor.watch(stop)
        log.info("stopping")
        return 0
    finally:
        health.cancel()
        await gateway.stop(config.shutdown_grace)
        await asyncio.to_thread(supervisor.stop)
        for signum in (signal.SIGTERM, signal.SIGINT):  # only now: a signal during shutdown must not cut it short
            loop.remove_signal_handler(signum)


def check_device(precision: str, device: str, what: str) -> None:
    """Refuse a precision the device cannot run, rather than serve something else than asked."""
    if precision == "fp16" and device != "cuda":
        raise ValueError(f"{what} fp16 is for GPUs: give --device cuda too (on CPUs, serve fp32)")
    if precision == "int8" and device == "cuda":
        raise ValueError(f"{what} int8 runs on CPUs only (ONNX Runtime's and torch's int8 kernels): on a GPU, serve "
                         "fp32 (exact) or fp16")


def check_repository(config: ServeConfig, repository: Path) -> None:
    """An exported repository is served as it was exported: a flag that asks for something else is an error."""
    manifest = read_manifest(repository)
    exported = {"precision": manifest.get("precision", "fp32"),
                "image_processor": manifest.get("image_processor", "pil")}
    for name, value in exported.items():
        asked = getattr(config, name)
        if asked and asked != value:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{repository} was exported with {flag} {value}; {flag} {asked} cannot change that: "
                             f"export the checkpoint again with {flag} {asked}, or leave {flag} out")
    check_device(exported["precision"], config.device, f"{repository} was exported with --precision")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    bound_heap()
    try:
        config = parse_command_line(ServeConfig, argv, prog="blip-serve",
                                    description="Serve BLIP image captioning on Triton.")
        check_device(config.precision or "fp32", config.device, "--precision")
        models = parse_model_arguments(config.model)
        response_cache_flags(config.response_cache_mb)  # a size it cannot take is refused now, not at Triton's start
    except ValueError as exc:
        print(f"blip-serve: error: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)  # during the export: stop, leaving no partial export behind
    try:
        options = ExportOptions(precision=config.precision or "fp32", image_processor=config.image_processor or "pil")
        repositories = []
        for model in models:  # each exported (or found in the cache) on its own
            repository = resolve_repository(model.path, config.cache_dir, options, export=export_in_child)
            check_repository(config, repository)
            repositories.append((model.name, repository))
        served = "; ".join(describe(model.name, model.path, repository)
                           for model, (_, repository) in zip(models, repositories, strict=True))
        # One model repository for Triton holding them all (links to the exports, which stay where they are).
        with tempfile.TemporaryDirectory(prefix="blip-serve-models-") as combined:
            combine(repositories, Path(combined))
            return asyncio.run(serve(config, Path(combined), served))
    except (BlipServerError, OSError, ValueError) as exc:
        print(f"blip-serve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
