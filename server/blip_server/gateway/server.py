"""The gateway's gRPC server: CaptionService, grpc.health.v1 (following Triton's readiness) and reflection."""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from blip_client.protos.blip.caption.v1 import caption_pb2, caption_pb2_grpc
from blip_server.gateway.auth import ApiKeyInterceptor
from blip_server.gateway.captioner import Captioner
from blip_server.gateway.errors import ErrorInterceptor
from blip_server.gateway.metrics import STREAM_ITEM, GatewayMetrics
from blip_server.gateway.service import CaptionServicer

log = logging.getLogger("blip-serve.gateway")

SERVICE_NAME = caption_pb2.DESCRIPTOR.services_by_name["CaptionService"].full_name
# A health service name that is SERVING as long as the gateway runs (liveness); "" and SERVICE_NAME follow Triton.
LIVENESS = "liveness"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Gateway:
    """A running gateway: the gRPC server, its health servicer and the Captioner behind it."""

    def __init__(self, server: grpc.aio.Server, port: int, health_servicer, captioner: Captioner,
                 metrics: GatewayMetrics):
        self.server = server
        self.port = port
        self.health = health_servicer
        self.captioner = captioner
        self.metrics = metrics
        self.metrics_port: int | None = None  # where the metrics are served over HTTP, if they are
        self._serving: bool | None = None

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
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        await self.captioner.close()
        self.metrics.stop()


async def create_server(address: str, captioner: Captioner, api_keys: list[str] = (),
                        metrics: GatewayMetrics | None = None) -> Gateway:
    """A started gateway bound to `address` ("127.0.0.1:0" picks a free port); health starts NOT_SERVING.

    Metrics are recorded in `metrics` (a new registry if None); serving them over HTTP is the caller's choice.
    """
    limits = captioner.limits
    metrics = metrics or GatewayMetrics()
    metrics.count_in_flight(lambda: captioner.in_flight)
    server = grpc.aio.server(
        interceptors=[ErrorInterceptor(metrics.observe), ApiKeyInterceptor(list(api_keys))],
        options=[
            # The image plus prompt, options and framing; larger messages are refused with RESOURCE_EXHAUSTED.
            ("grpc.max_receive_message_length", limits.max_image_bytes + limits.max_prompt_bytes + 64 * 1024),
            ("grpc.max_send_message_length", 16 * 1024 * 1024),
        ],
    )
    servicer = CaptionServicer(captioner, lambda code, seconds: metrics.observe(STREAM_ITEM, code, seconds))
    caption_pb2_grpc.add_CaptionServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    gateway = Gateway(server, port, health_servicer, captioner, metrics)
    await health_servicer.set(LIVENESS, SERVING)
    await gateway.set_serving(False)
    return gateway
