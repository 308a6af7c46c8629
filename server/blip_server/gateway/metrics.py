"""The gateway's Prometheus metrics (Triton's own stay on Triton's metrics port).

- `blip_gateway_requests_total{method,code,model}`: finished calls by RPC and gRPC status code, whatever the method's
  shape (recorded by the status interceptor, `status_mapping.ErrorInterceptor`, as each call's status is decided): a
  CaptionService method by its name (`Caption`), a method of any other service by its full name
  (`package.Service/Method`), health checks and reflection not at all; each item of a CaptionStream also counts,
  as method `CaptionStream.item`; `model` is the served model's name a call named (the default's when it named
  none), `unknown` for a name not served or a request that could not be read, empty for calls not for one model
  (`ListModels`, a `CaptionStream` as a whole, a call refused before it was read): bounded by the models served; a
  call its client cancelled within `status_mapping.DEADLINE_SKEW` of its deadline counts as DEADLINE_EXCEEDED;
- `blip_gateway_request_duration_seconds{method,model}`: histogram of their durations;
- `blip_gateway_in_flight_requests`: images being captioned now;
- `blip_gateway_triton_replica_up{endpoint}`: 1 while a Triton replica answers ready, else 0.

Each gateway has a registry of its own, so several can live in one process (tests).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# From a fast cached caption (tens of ms) to long beam searches of large models on CPUs (a minute).
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
STREAM_ITEM = "CaptionStream.item"


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("blip_gateway_requests", "Finished calls by method and gRPC status code.",
                                ["method", "code", "model"], registry=self.registry)
        self.duration = Histogram("blip_gateway_request_duration_seconds", "Duration of finished calls.",
                                  ["method", "model"], buckets=DURATION_BUCKETS, registry=self.registry)
        self.in_flight = Gauge("blip_gateway_in_flight_requests", "Images being captioned now.",
                               registry=self.registry)
        self.replica_up = Gauge("blip_gateway_triton_replica_up", "1 while the Triton replica answers ready.",
                                ["endpoint"], registry=self.registry)
        self._server: WSGIServer | None = None

    def observe(self, method: str, code: str, seconds: float, model: str = "") -> None:
        self.requests.labels(method, code, model).inc()
        self.duration.labels(method, model).observe(seconds)

    def count_in_flight(self, read: Callable[[], float]) -> None:
        self.in_flight.set_function(read)

    def set_replica(self, endpoint: str, up: bool) -> None:
        self.replica_up.labels(endpoint).set(1 if up else 0)

    def forget_replica(self, endpoint: str) -> None:
        with contextlib.suppress(KeyError):  # never reported
            self.replica_up.remove(endpoint)

    def serve(self, host: str, port: int) -> int:
        """Expose the metrics over HTTP on host:port (0: a free port); returns the port."""
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._server.server_port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
