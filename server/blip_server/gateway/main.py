"""The `blip-gateway` command: the typed gRPC gateway alone, over one or more Triton replicas that run elsewhere.

    blip-gateway --triton triton-0:8001 --triton triton-1:8001 --metrics-port 9090
    blip-gateway --triton dns:///triton:8001 --host 0.0.0.0   # every address the name resolves to

`start_gateway` assembles a gateway (replica pool, captioner, gRPC server, metrics); `blip-serve` uses it too,
with its one embedded replica. Health is SERVING while any replica is ready. A replica that leaves a dns:///
name's answer is drained (`--drain-grace`); clients' connections are renewed every `--max-connection-age`.
SIGTERM/SIGINT stop it: health goes NOT_SERVING, in-flight calls get `--shutdown-grace` seconds. OpenTelemetry's
standard variables (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME, ...) turn tracing on (`tracing`).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from blip_server.config import GatewayConfig, GatewayOptions, parse_command_line
from blip_server.gateway.captioner import Captioner, GatewayLimits
from blip_server.gateway.grpc_server import Gateway, create_server, server_credentials
from blip_server.gateway.metrics import GatewayMetrics
from blip_server.gateway.replicas import ReplicaPool, parse_endpoint
from blip_server.gateway.tracing import start_tracing
from blip_server.memory import bound_heap

log = logging.getLogger("blip-gateway")


def api_keys(options: GatewayOptions) -> list[str]:
    """The keys of --api-keys and --api-keys-file; raises ValueError when the file cannot be read (a gateway told
    to require keys never starts without them)."""
    text = options.api_keys
    if options.api_keys_file is not None:
        try:
            text += "," + options.api_keys_file.read_text()
        except OSError as exc:
            raise ValueError(f"cannot read --api-keys-file {options.api_keys_file}: {exc.strerror}") from None
    return [key.strip() for key in text.replace("\n", ",").split(",") if key.strip()]


async def start_gateway(options: GatewayOptions, targets: tuple[str, ...], dns_refresh: float = 5.0,
                        drain_grace: float = 60.0, service: str = "blip-gateway") -> Gateway:
    """A started gateway over `targets` (HOST:PORT or dns:///NAME:PORT); metrics served if options say so, traced
    if OpenTelemetry's variables say so (`tracing`; `service`: its default service.name). `dns_refresh` and
    `drain_grace` matter for dns:/// targets only (see ReplicaPool)."""
    keys = api_keys(options)
    metrics = GatewayMetrics()
    replicas = ReplicaPool(targets, health_timeout=options.health_timeout, dns_refresh=dns_refresh,
                           drain_grace=drain_grace, max_wait=options.max_wait_for_ready,
                           on_replica_up=metrics.set_replica, on_replica_gone=metrics.forget_replica)
    limits = GatewayLimits(max_image_bytes=options.max_image_bytes, max_image_pixels=options.max_image_pixels,
                           max_image_side=options.max_image_side,
                           max_concurrent_requests=options.max_concurrent_requests,
                           max_image_bytes_in_flight=options.max_image_bytes_in_flight,
                           stream_window=options.stream_window)
    credentials = server_credentials(options.tls_cert, options.tls_key, options.tls_client_ca)
    gateway = await create_server(f"{options.host}:{options.port}", Captioner(replicas, limits), keys, metrics,
                                  credentials, max_connection_age=options.max_connection_age,
                                  max_connection_age_grace=options.max_connection_age_grace,
                                  tracing=start_tracing(service))
    if options.metrics_port:
        try:
            gateway.metrics_port = metrics.serve(options.host, options.metrics_port)
        except OSError:
            await gateway.stop(0)
            raise
    return gateway


async def run(config: GatewayConfig) -> int:
    gateway = await start_gateway(config, config.triton, config.dns_refresh, config.drain_grace)
    health = asyncio.create_task(gateway.follow_triton(config.health_interval))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    metrics = f", metrics http://{config.host}:{gateway.metrics_port}/metrics" if gateway.metrics_port else ""
    print(f"blip-gateway: ready: gRPC API {config.host}:{gateway.port} (blip.caption.v1.CaptionService) over "
          f"Triton {', '.join(config.triton)}{metrics}", flush=True)
    try:
        await stop.wait()
        log.info("stopping")
        return 0
    finally:
        health.cancel()
        await gateway.stop(config.shutdown_grace)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    bound_heap()
    try:
        config = parse_command_line(GatewayConfig, argv, prog="blip-gateway",
                                    description="The BLIP caption gateway over one or more Triton servers.")
        if not config.triton:
            raise ValueError("give at least one --triton HOST:PORT (or dns:///NAME:PORT)")
        for target in config.triton:
            parse_endpoint(target)
        return asyncio.run(run(config))
    except (ValueError, OSError) as exc:
        print(f"blip-gateway: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
