"""One trace per caption: blip-serve with OpenTelemetry's standard variables pointing at a real OTLP/HTTP receiver
on loopback (tests/support/otlp_receiver.py) sends the gateway's spans there, and its embedded Triton (2.51, which
has OpenTelemetry tracing built in) sends its own under the same trace id: the gRPC request, the ensemble, each
model with its queue and compute timestamps."""

from __future__ import annotations

import grpc
import pytest

from blip_client.protos.blip.caption.v1 import caption_pb2, caption_pb2_grpc
from blip_server.ensemble import CACHED_MODEL
from support import images
from support.otlp_receiver import OtlpReceiver
from support.serve import ServeProcess

SERVER, CLIENT = 2, 3  # OTLP's span kinds
CAPTION = "/blip.caption.v1.CaptionService/Caption"
TRITON_CALL = "inference.GRPCInferenceService/ModelInfer"
MODELS = ("preprocess", "vision_encoder", "text_decoder")
ENSEMBLE = CACHED_MODEL  # the gateway sends a deterministic request (the defaults: beam search) to the cached one
CALLER_TRACE = "5bf92f3577b34da6a3ce929d0e0e4736"
UNSAMPLED_TRACE = "6bf92f3577b34da6a3ce929d0e0e4737"


@pytest.fixture(scope="module")
def traced(repositories, tmp_path_factory):
    """(blip-serve traced into a receiver on loopback, the receiver)."""
    with OtlpReceiver() as receiver, pytest.MonkeyPatch.context() as environment:
        environment.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        environment.setenv("OTEL_SERVICE_NAME", "blip-under-test")
        environment.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
        environment.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")  # the SDK's batches every 0.2 s, not 5 s
        for name in ("OTEL_TRACES_EXPORTER", "OTEL_TRACES_SAMPLER", "OTEL_SDK_DISABLED"):
            environment.delenv(name, raising=False)
        serve = ServeProcess("--model", str(repositories["standard"]), cache=tmp_path_factory.mktemp("cache"))
        environment.undo()  # the variables reach blip-serve alone
        try:
            serve.wait_ready()
            yield serve, receiver
        finally:
            code, log = serve.stop()
            assert code == 0, log


def _caption(serve, seed: int, traceparent: str | None = None) -> int:
    """Captions one image of its own (an image seen before would be answered by Triton's response cache, where
    no model runs: the ensemble's span alone)."""
    metadata = [("traceparent", traceparent)] if traceparent else None
    image = images.encode(images.rgb(32, 24, seed=seed), "PNG")
    with grpc.insecure_channel(serve.address) as channel:
        response = caption_pb2_grpc.CaptionServiceStub(channel).Caption(
            caption_pb2.CaptionRequest(image=image), metadata=metadata, timeout=60)
    return len(response.captions)


def _whole(trace_id: str):
    """Whether a trace's spans all arrived: the gateway's two and Triton's request, ensemble and models."""
    def done(spans) -> bool:
        names = {s.name for s in spans if s.trace_id == trace_id}
        return {CAPTION, TRITON_CALL, "InferRequest", ENSEMBLE, *MODELS} <= names
    return done


def test_one_trace_holds_the_gateway_the_ensemble_and_each_model(traced):
    serve, receiver = traced
    assert _caption(serve, seed=1)
    [server] = [s for s in receiver.wait_for(lambda spans: any(s.name == CAPTION for s in spans))
                if s.name == CAPTION]
    spans = [s for s in receiver.wait_for(_whole(server.trace_id)) if s.trace_id == server.trace_id]
    by_name = {}
    for span in spans:
        by_name.setdefault(span.name, []).append(span)

    # The gateway's: its server span (a root: the caller sent no trace context) and its call to Triton.
    assert server.kind == SERVER and server.parent_span_id == "" and server.encoding == "protobuf"
    assert server.attributes["rpc.grpc.status_code"] == 0
    [client] = by_name[TRITON_CALL]
    assert client.kind == CLIENT and client.parent_span_id == server.span_id
    assert client.attributes["triton.model_name"] == ENSEMBLE

    # Triton's, under the gateway's client span: the gRPC request, then the ensemble, then each of its models.
    [request] = by_name["InferRequest"]
    [ensemble] = by_name[ENSEMBLE]
    assert request.parent_span_id == client.span_id and request.encoding == "json"
    assert ensemble.parent_span_id == request.span_id
    computes = {s.parent_span_id: s for s in by_name["compute"]}
    for model in MODELS:
        [span] = by_name[model]
        assert span.parent_span_id == ensemble.span_id
        assert span.attributes["triton.model_name"] == model
        assert {"REQUEST_START", "QUEUE_START", "REQUEST_END"} <= set(span.events)
        assert {"COMPUTE_START", "COMPUTE_END"} <= set(computes[span.span_id].events)

    # Both sides name the service and resource the variables gave.
    assert {s.service for s in spans} == {"blip-under-test"}
    assert {s.resource.get("deployment.environment") for s in spans} == {"test"}
    assert {path for path, _ in receiver.requests} == {"/v1/traces"}


def test_a_callers_trace_goes_on_through_triton_and_an_unsampled_one_is_traced_nowhere(traced):
    serve, receiver = traced
    assert _caption(serve, 2, f"00-{UNSAMPLED_TRACE}-00f067aa0ba902b7-00")  # the caller did not sample it
    assert _caption(serve, 3, f"00-{CALLER_TRACE}-00f067aa0ba902b8-01")
    spans = receiver.wait_for(_whole(CALLER_TRACE))
    [server] = [s for s in spans if s.trace_id == CALLER_TRACE and s.name == CAPTION]
    assert server.parent_span_id == "00f067aa0ba902b8"
    # Each exporter sends its spans in the order they ended: the unsampled call's, had there been any, came first.
    assert [s for s in spans if s.trace_id == UNSAMPLED_TRACE] == []
    # Nor did Triton trace it on its own: each request it traced is a sampled call of the gateway's.
    calls = {s.span_id for s in spans if s.name == TRITON_CALL}
    assert {s.parent_span_id for s in spans if s.name == "InferRequest"} <= calls
