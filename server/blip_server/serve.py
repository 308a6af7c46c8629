"""`blip-serve`: export the model if needed, start Triton, report ready, stop cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

from blip_server.config import ServeConfig
from blip_server.errors import BlipServerError
from blip_server.export import PRECISIONS, ExportOptions
from blip_server.model_store import resolve_repository
from blip_server.triton import EmbeddedTriton, TritonOptions

log = logging.getLogger("blip-serve")


def parse_args(argv: list[str] | None, defaults: ServeConfig) -> ServeConfig:
    parser = argparse.ArgumentParser(prog="blip-serve", description="Serve BLIP image captioning on Triton.")
    parser.add_argument("--model", type=Path, default=defaults.model,
                        help="HF checkpoint directory or exported model repository (default: the demo checkpoint)")
    parser.add_argument("--precision", choices=PRECISIONS, default=defaults.precision)
    parser.add_argument("--host", default=defaults.host, help="address to bind (default %(default)s)")
    parser.add_argument("--triton-grpc-port", type=int, default=defaults.triton_grpc_port)
    parser.add_argument("--triton-http-port", type=int, default=defaults.triton_http_port)
    parser.add_argument("--triton-metrics-port", type=int, default=defaults.triton_metrics_port)
    parser.add_argument("--cache-dir", type=Path, default=defaults.cache_dir)
    parser.add_argument("--startup-timeout", type=float, default=defaults.startup_timeout)
    args = parser.parse_args(argv)
    return replace(defaults, **vars(args))


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def serve(config: ServeConfig) -> int:
    """Run until SIGTERM/SIGINT (KeyboardInterrupt) or until Triton dies; returns the process exit code."""
    repository = resolve_repository(config.model, config.cache_dir, ExportOptions(precision=config.precision))
    triton = EmbeddedTriton(
        TritonOptions(
            model_repository=repository,
            host=config.host,
            grpc_port=config.triton_grpc_port,
            http_port=config.triton_http_port,
            metrics_port=config.triton_metrics_port,
            startup_timeout=config.startup_timeout,
        )
    )
    log.info("starting Triton on %s (model repository %s)", config.host, repository)
    try:
        triton.start()
        triton.wait_ready()
        print(
            f"blip-serve: ready: Triton gRPC {config.host}:{config.triton_grpc_port}, "
            f"HTTP {config.host}:{config.triton_http_port}, metrics {config.host}:{config.triton_metrics_port}; "
            f"model 'blip_caption' from {repository}",
            flush=True,
        )
        while triton.is_running():
            time.sleep(0.5)
        log.error("Triton exited unexpectedly:\n%s", triton.log_tail())
        return 1
    except KeyboardInterrupt:
        log.info("stopping")
        return 0
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)  # a second signal must not cut the graceful stop short
        triton.stop()
        triton.cleanup()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    try:
        config = parse_args(argv, ServeConfig.from_env())
    except ValueError as exc:
        print(f"blip-serve: error: {exc}", file=sys.stderr)
        return 2
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _interrupt)
    try:
        return serve(config)
    except BlipServerError as exc:
        print(f"blip-serve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before Triton started, e.g. while exporting
        return 130


if __name__ == "__main__":
    sys.exit(main())
