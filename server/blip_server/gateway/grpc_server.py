"""The gateway's gRPC server: CaptionService, grpc.health.v1 (following Triton's readiness) and reflection."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc  # type: ignore[import-untyped]
from grpc_reflection.v1alpha import reflection  # type: ignore[import-untyped]

from blip_client.protos.blip.caption.v1 import caption_pb2
from blip_server.gateway.auth import ApiKeyInterceptor
from blip_server.gateway.captioner import Captioner
from blip_server.gateway.metrics import STREAM_ITEM, GatewayMetrics
from blip_server.gateway.servicer import CaptionServicer, method_handlers
from blip_server.gateway.status_mapping import ErrorInterceptor
from blip_server.gateway.tracing import Tracing
from blip_server.memory import trim

log = logging.getLogger("blip-serve.gateway")

SERVICE_NAME = caption_pb2.DESCRIPTOR.services_by_name["CaptionService"].full_name
# A health service name that is SERVING as long as the gateway runs (liveness); "" and SERVICE_NAME follow Triton.
LIVENESS = "liveness"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Gateway:
    """A running gateway: the gRPC server, its health servicer and the Captioner behind it."""

    def __init__(self, server: grpc.aio.Server, port: int, health_servicer: health.aio.HealthServicer,
                 captioner: Captioner, metrics: GatewayMetrics):
        self.server = server
        self.port = port
        self.health = health_servicer
        self.captioner = captioner
        self.metrics = metrics
        self.tracing: Tracing | None = None  # OpenTelemetry's, when on: flushed at the end of stop()
        self.metrics_port: int | None = None  # where the metrics are served over HTTP, if they are
        self._serving: bool | None = None
        self._trimming = asyncio.create_task(self._return_free_memory())

    @staticmethod
    async def _return_free_memory(interval: float = 2.0) -> None:
        """Every `interval` seconds, give the heaps' free pages back: request messages of every size up to the
        image limit fragment them, and without this the gateway keeps the high-water mark of its busiest moment
        (a walk of the heaps; milliseconds)."""
        while True:
            await asyncio.sleep(interval)
            trim()

    async def set_serving(self, serving: bool) -> None:
        if serving != self._serving:
            status = SERVING if serving else NOT_SERVING
            for service in ("", SERVICE_NAME):
                await self.health.set(service, status)
            if self._serving is not None:
                log.info("health: %s", "SERVING" if serving else "NOT_SERVING")
            self._serving = serving

    async def follow_triton(self, interval: float = 1.0) -> None:
        """Check the Triton replicas every `interval` seconds; SERVING while any is ready. Until cancelled."""
        while True:
            await self.set_serving(await self.captioner.ready())
            await asyncio.sleep(interval)

    async def stop(self, grace: float) -> None:
        self._trimming.cancel()
        self.captioner.replicas.stop_waiting()  # calls in flight may finish; none waits for a replica any more
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        await self.captioner.close()
        self.metrics.stop()
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.shutdown)


def server_credentials(cert: Path | None, key: Path | None, client_ca: Path | None) -> grpc.ServerCredentials | None:
    """TLS credentials from PEM files (None: plaintext); with `client_ca`, clients must present a certificate it
    signed (mutual TLS)."""
    if (cert is None) != (key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    if cert is None or key is None:  # both None (checked above)
        if client_ca is not None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    try:
        return grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())],
                                           root_certificates=client_ca.read_bytes() if client_ca else None,
                                           require_client_auth=client_ca is not None)
    except OSError as exc:
        raise ValueError(f"cannot read a TLS file: {exc}") from None


def connection_age_options(max_age: float, grace: float) -> list[tuple[str, int]]:
    """The server options that bound a client connection's life (0: no bound).

    After `max_age` seconds (gRPC core varies it by +-10% per connection, so that connections opened together do
    not all close together) the server sends an HTTP/2 GOAWAY: the client opens a new connection for its next
    calls (gRPC channels do so by themselves, re-resolving the name, so a client behind a Service or a load
    balancer may land on another gateway), while its calls in flight on the old connection, a CaptionStream
    included, go on. `grace` seconds after the GOAWAY the old connection is closed and whatever still runs on it
    is cancelled (the client sees UNAVAILABLE).
    """
    if max_age < 0 or grace < 0:
        raise ValueError("--max-connection-age and --max-connection-age-grace cannot be negative")
    options = []
    if max_age:
        options.append(("grpc.max_connection_age_ms", max(1, round(max_age * 1000))))
        if grace:
            options.append(("grpc.max_connection_age_grace_ms", max(1, round(grace * 1000))))
    return options


async def create_server(address: str, captioner: Captioner, api_keys: Sequence[str] = (),
                        metrics: GatewayMetrics | None = None,
                        credentials: grpc.ServerCredentials | None = None,
                        max_connection_age: float = 0.0, max_connection_age_grace: float = 0.0,
                        tracing: Tracing | None = None) -> Gateway:
    """A started gateway bound to `address` ("127.0.0.1:0" picks a free port); health starts NOT_SERVING.

    Metrics are recorded in `metrics` (a new registry if None); serving them over HTTP is the caller's choice.
    With `credentials` the port serves TLS only (health and reflection included). Client connections live
    `max_connection_age` seconds, then their calls in flight get `max_connection_age_grace` more
    (`connection_age_options`; 0: no limit). With `tracing` (`tracing.start_tracing`) each API call gets a span.
    """
    limits = captioner.limits
    age_options = connection_age_options(max_connection_age, max_connection_age_grace)
    metrics = metrics or GatewayMetrics()
    metrics.count_in_flight(lambda: captioner.in_flight)
    server = grpc.aio.server(
        # Tracing's first: its server span covers the API-key check and the status mapping, and carries the status.
        interceptors=[*([tracing.interceptor] if tracing else []), ErrorInterceptor(metrics.observe),
                      ApiKeyInterceptor(list(api_keys))],
        options=[
            # A margin above the image limit: a stream item over the limit but under this is answered with its own
            # RESOURCE_EXHAUSTED and the stream goes on; only a truly huge message ends its call.
            ("grpc.max_receive_message_length", limits.max_message_bytes),
            ("grpc.max_send_message_length", 16 * 1024 * 1024),
            *age_options,
        ],
    )
    servicer = CaptionServicer(captioner,
                               lambda code, seconds, model: metrics.observe(STREAM_ITEM, code, seconds, model))
    server.add_generic_rpc_handlers((method_handlers(servicer),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    gateway = Gateway(server, port, health_servicer, captioner, metrics)
    gateway.tracing = tracing
    await health_servicer.set(LIVENESS, SERVING)
    await gateway.set_serving(False)
    return gateway
