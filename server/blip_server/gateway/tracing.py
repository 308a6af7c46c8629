"""The gateway's OpenTelemetry tracing: off unless OpenTelemetry's standard variables turn it on.

`start_tracing` reads them (`triton_command.traces_endpoint`: OTEL_EXPORTER_OTLP_ENDPOINT or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT set, OTEL_TRACES_EXPORTER not `none`) and only then imports the OpenTelemetry
SDK: a tracer provider whose resource comes from OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES (service.name
defaults to the command, `blip-serve` or `blip-gateway`), whose sampler comes from OTEL_TRACES_SAMPLER and
OTEL_TRACES_SAMPLER_ARG, and whose spans are batched (OTEL_BSP_*) to the endpoint over OTLP/HTTP; `shutdown`
flushes them. Off, nothing of OpenTelemetry is imported and `triton_call` is a `nullcontext`.

Each call to the API gets a server span (the OpenTelemetry gRPC instrumentation's interceptor, the gateway's
first, so its span covers the API-key check and the status mapping, and carries the status the caller gets; a
caller's own `traceparent` makes it a child of the caller's trace); health checks and reflection get none. Each
call to Triton gets a client span, child of the server span, whose W3C `traceparent` goes to Triton with the
request when the span is sampled: Triton then traces the request under it (the ensemble, each model, their queue
and compute times; `triton_command.trace_flags`). An unsampled call sends none, since Triton traces every request
that carries one, whatever its sampled flag.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc

from blip_server.gateway.handlers import HEALTH_AND_REFLECTION
from blip_server.triton_command import traces_endpoint

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Tracer

# The tracer of the gateway's calls to Triton while tracing is on (one tracing setup per process).
_tracer: Tracer | None = None

# How the client span of a call to Triton is named and described (OpenTelemetry's RPC conventions).
TRITON_SERVICE = "inference.GRPCInferenceService"
TRITON_METHOD = "ModelInfer"


class Tracing:
    """Tracing while it is on: the server interceptor to put first, and the provider to shut down at the end."""

    def __init__(self, provider: TracerProvider, interceptor: grpc.aio.ServerInterceptor):
        self.provider = provider
        self.interceptor = interceptor
        self.tracer = provider.get_tracer(__name__)

    def flush(self, timeout: float = 30.0) -> bool:
        """Export the spans ended so far; whether that finished within `timeout` seconds."""
        return self.provider.force_flush(int(timeout * 1000))

    def shutdown(self) -> None:
        """Export what is left and stop (blocks for the export: run it off the event loop)."""
        global _tracer
        if _tracer is self.tracer:
            _tracer = None
        self.provider.shutdown()


def _traced(details: grpc.HandlerCallDetails) -> bool:
    """Which calls get a server span: the API's, not health checks (load balancers ask every few seconds) or
    reflection."""
    return not str(details.method).startswith(HEALTH_AND_REFLECTION)


def start_tracing(service: str, exporter: SpanExporter | None = None) -> Tracing | None:
    """Tracing as OpenTelemetry's variables say, or None when they leave it off (`traces_endpoint`; ValueError for
    what cannot be served). `service`: service.name unless OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES give one.
    `exporter`: where spans go instead of the OTLP/HTTP endpoint (tests); tracing is then on whatever the
    variables say."""
    global _tracer
    endpoint = traces_endpoint(os.environ)
    if endpoint is None and exporter is None:
        return None
    from opentelemetry.instrumentation.grpc import aio_server_interceptor
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service}))
    provider = TracerProvider(resource=resource)  # its sampler: OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=endpoint)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    interceptor = aio_server_interceptor(tracer_provider=provider, filter_=_traced)  # type: ignore[no-untyped-call]
    tracing = Tracing(provider, interceptor)
    _tracer = tracing.tracer
    return tracing


def triton_call(model: str) -> contextlib.AbstractContextManager[dict[str, str] | None]:
    """Around one call to Triton's `model`: what yields the headers to send with it, None when there are none
    (tracing off, or the call not sampled)."""
    tracer = _tracer
    return contextlib.nullcontext() if tracer is None else _client_span(tracer, model)


@contextlib.contextmanager
def _client_span(tracer: Tracer, model: str) -> Iterator[dict[str, str] | None]:
    from opentelemetry.trace import SpanKind
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    attributes = {"rpc.system": "grpc", "rpc.service": TRITON_SERVICE, "rpc.method": TRITON_METHOD,
                  "triton.model_name": model}
    with tracer.start_as_current_span(f"{TRITON_SERVICE}/{TRITON_METHOD}", kind=SpanKind.CLIENT,
                                      attributes=attributes) as span:
        headers: dict[str, str] = {}
        if span.get_span_context().trace_flags.sampled:  # W3C trace context, the one Triton reads
            TraceContextTextMapPropagator().inject(headers)
        yield headers or None
