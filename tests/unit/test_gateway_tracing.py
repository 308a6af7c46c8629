"""OpenTelemetry tracing, off by default: the variables that turn it on, Triton's flags, the gateway's spans.

With tracing on (here with an in-memory exporter), every API call of every shape gets one server span carrying
its status, a caller's `traceparent` makes it the caller's child, health checks get none, and a call to Triton
gets a client span whose `traceparent` is sent only when sampled. The whole path to a real OTLP/HTTP receiver,
Triton's spans included, is tests/integration/test_tracing.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from blip_server import triton_command
from blip_server.gateway import status_mapping, tracing
from blip_server.triton_command import trace_flags, traces_endpoint
from support.fake_captioner import FakeCaptioner
from support.gateway import BackgroundGateway

ROOT = Path(__file__).resolve().parents[2]
SERVICE = "test.v1.Shapes"
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
CALLER_SAMPLED = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"


def _otel_free(environ: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in environ.items() if not k.startswith("OTEL_")}


@pytest.mark.parametrize(("environ", "expected"), [
    ({}, None),
    ({"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"}, None),  # no endpoint: off
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, "http://collector:4318/v1/traces"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"}, "http://collector:4318/v1/traces"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4318", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://b:9/t"},
     "http://b:9/t"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4318", "OTEL_TRACES_EXPORTER": "none"}, None),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4318", "OTEL_SDK_DISABLED": "true"}, None),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4318", "OTEL_TRACES_EXPORTER": "otlp",
      "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, "http://a:4318/v1/traces"),
])
def test_the_standard_variables_turn_tracing_on(environ, expected):
    assert traces_endpoint(environ) == expected
    assert bool(trace_flags(environ)) == (expected is not None)


@pytest.mark.parametrize("environ", [
    {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
    {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4318", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"},
    {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4318", "OTEL_TRACES_EXPORTER": "console"},
])
def test_what_cannot_be_sent_is_refused_not_ignored(environ):
    with pytest.raises(ValueError, match="OTLP|otlp"):
        traces_endpoint(environ)


def test_triton_traces_what_the_gateway_sampled_to_the_same_endpoint():
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SERVICE_NAME": "captions",
               "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}
    assert trace_flags(environ) == [
        "--trace-config=mode=opentelemetry",
        "--trace-config=rate=0",  # only requests that carry a traceparent: the gateway samples
        "--trace-config=level=TIMESTAMPS",  # never tensors: they are the callers' images
        "--trace-config=opentelemetry,url=http://collector:4318/v1/traces",
        "--trace-config=opentelemetry,resource=service.name=captions",
    ]
    assert not any("service.name" in flag for flag in trace_flags({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:1"}))


def test_every_triton_gets_the_trace_flags_from_its_environment(monkeypatch):
    """server_flags, which the embedded server and blip-tritonserver (the containers) both run with."""
    monkeypatch.setattr(os, "environ", _otel_free(dict(os.environ)))
    assert not any(flag.startswith("--trace") for flag in triton_command.server_flags("k", 1))
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    assert triton_command.server_flags("k", 1)[-len(trace_flags(os.environ)):] == trace_flags(os.environ)


def test_the_containers_triton_gets_them_from_the_containers_variables(tmp_path):
    """blip-tritonserver (the Triton image's copy of triton_command.py, alone in a folder) prints its command."""
    dockerfile = (ROOT / "docker" / "triton" / "Dockerfile").read_text()
    copied = re.search(r"^COPY (server/\S+triton_command\.py .*) /opt/blip/$", dockerfile, re.M).group(1)
    for source in copied.split():
        shutil.copy(ROOT / source, tmp_path / Path(source).name)
    variables = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SERVICE_NAME": "blip-triton"}
    run = subprocess.run([sys.executable, "-I", str(tmp_path / "triton_command.py"), "--print-command"],
                         capture_output=True, text=True, timeout=60, env={**_otel_free(dict(os.environ)), **variables},
                         check=True)
    assert [line for line in run.stdout.splitlines() if line.startswith("--trace")] == trace_flags(variables)


def test_tracing_off_imports_nothing_of_opentelemetry():
    code = ("import sys, json\nimport blip_server.gateway.main\nfrom blip_server.gateway.tracing import start_tracing\n"
            "off = start_tracing('blip-gateway') is None\n"
            "print(json.dumps([off, sorted(m for m in sys.modules if m.startswith('opentelemetry'))]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                            env=_otel_free(dict(os.environ)))
    assert json.loads(result.stdout.splitlines()[-1]) == [True, []]


def test_the_service_is_named_after_the_command_unless_the_variables_name_it(monkeypatch):
    for name in [k for k in os.environ if k.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    for variables, expected in [({}, "blip-serve"), ({"OTEL_SERVICE_NAME": "captions"}, "captions"),
                                ({"OTEL_RESOURCE_ATTRIBUTES": "service.name=from-attributes"}, "from-attributes")]:
        with monkeypatch.context() as environment:
            for name, value in variables.items():
                environment.setenv(name, value)
            started = tracing.start_tracing("blip-serve", exporter=InMemorySpanExporter())
            started.shutdown()
        assert started.provider.resource.attributes["service.name"] == expected
    assert tracing._tracer is None


class Shapes:
    """One method of each call shape; a unary request b"invalid" fails INVALID_ARGUMENT, b"bug" INTERNAL."""

    async def unary_unary(self, request: bytes, context) -> bytes:
        if request == b"invalid":
            raise status_mapping.InvalidArgument("invalid on purpose")
        if request == b"bug":
            raise RuntimeError("a bug")
        return request

    async def unary_stream(self, request: bytes, context) -> AsyncIterator[bytes]:
        yield request

    async def stream_unary(self, requests: AsyncIterator[bytes], context) -> bytes:
        return b"".join([request async for request in requests])

    async def stream_stream(self, requests: AsyncIterator[bytes], context) -> AsyncIterator[bytes]:
        async for request in requests:
            yield request

    async def calls_triton(self, request: bytes, context) -> bytes:
        """What the captioner does around a call to Triton: the headers it would send."""
        with tracing.triton_call("blip_caption") as headers:
            return json.dumps(headers).encode()

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE, {
            "UnaryUnary": grpc.unary_unary_rpc_method_handler(self.unary_unary),
            "UnaryStream": grpc.unary_stream_rpc_method_handler(self.unary_stream),
            "StreamUnary": grpc.stream_unary_rpc_method_handler(self.stream_unary),
            "StreamStream": grpc.stream_stream_rpc_method_handler(self.stream_stream),
            "CallsTriton": grpc.unary_unary_rpc_method_handler(self.calls_triton),
        })


@pytest.fixture
def traced(monkeypatch):
    """A gateway traced into memory, serving Shapes beside its own API: (gateway, Tracing, exporter)."""
    for name in [k for k in os.environ if k.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "gateway-under-test")
    exporter = InMemorySpanExporter()
    started = tracing.start_tracing("blip-gateway", exporter=exporter)
    gateway = BackgroundGateway(FakeCaptioner(), tracing=started)

    async def add():
        gateway.gateway.server.add_generic_rpc_handlers((Shapes().handler(),))

    gateway.call(add())
    yield gateway, started, exporter
    gateway.stop()  # shuts tracing down with the gateway
    assert tracing._tracer is None


def _call(address: str, method: str, request: bytes = b"hi", metadata=None):
    kinds = {"UnaryUnary": "unary_unary", "UnaryStream": "unary_stream", "StreamUnary": "stream_unary",
             "StreamStream": "stream_stream", "CallsTriton": "unary_unary"}
    kind = kinds[method]
    with grpc.insecure_channel(address) as channel:
        stub = getattr(channel, kind)(f"/{SERVICE}/{method}")
        argument = iter([request, request]) if kind.startswith("stream") else request
        answer = stub(argument, metadata=metadata, timeout=10)
        return list(answer) if kind.endswith("stream") else answer


def _spans(started, exporter, names: set[str]):
    """The finished spans once those named `names` are among them: a call's status can reach the caller before its
    span ends (grpc.aio's abort sends it at once), so wait for them, 10 s at most."""
    deadline = time.monotonic() + 10
    while True:
        assert started.flush()
        spans = exporter.get_finished_spans()
        if names <= {s.name for s in spans} or time.monotonic() > deadline:
            return spans
        time.sleep(0.05)


@pytest.mark.parametrize("method", ["UnaryUnary", "UnaryStream", "StreamUnary", "StreamStream"])
def test_every_call_shape_gets_one_server_span(traced, method):
    gateway, started, exporter = traced
    _call(gateway.address, method)
    [span] = [s for s in _spans(started, exporter, {f"/{SERVICE}/{method}"}) if s.name == f"/{SERVICE}/{method}"]
    assert span.kind == SpanKind.SERVER
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.OK.value[0]
    assert span.resource.attributes["service.name"] == "gateway-under-test"


@pytest.mark.parametrize(("request_", "code", "status"), [
    (b"invalid", grpc.StatusCode.INVALID_ARGUMENT, StatusCode.UNSET),  # the caller's error, not the server's
    (b"bug", grpc.StatusCode.INTERNAL, StatusCode.ERROR),
])
def test_a_failed_call_carries_its_status_and_a_callers_traceparent_makes_it_a_child(traced, request_, code, status):
    gateway, started, exporter = traced
    with pytest.raises(grpc.RpcError) as failed:
        _call(gateway.address, "UnaryUnary", request_, metadata=[("traceparent", CALLER_SAMPLED)])
    assert failed.value.code() == code
    [span] = [s for s in _spans(started, exporter, {f"/{SERVICE}/UnaryUnary"}) if s.name.endswith("/UnaryUnary")]
    assert span.attributes["rpc.grpc.status_code"] == code.value[0]
    assert span.status.status_code == status
    assert f"{span.context.trace_id:032x}" == CALLER_TRACE
    assert f"{span.parent.span_id:016x}" == CALLER_SPAN


def test_health_checks_get_no_span(traced):
    gateway, started, exporter = traced
    with grpc.insecure_channel(gateway.address) as channel:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=10)
    _call(gateway.address, "UnaryUnary")
    assert [s.name for s in _spans(started, exporter, {f"/{SERVICE}/UnaryUnary"})] == [f"/{SERVICE}/UnaryUnary"]


def test_a_call_to_triton_gets_a_client_span_whose_traceparent_is_sent(traced):
    gateway, started, exporter = traced
    headers = json.loads(_call(gateway.address, "CallsTriton"))
    spans = _spans(started, exporter, {f"/{SERVICE}/CallsTriton", "inference.GRPCInferenceService/ModelInfer"})
    [server] = [s for s in spans if s.kind == SpanKind.SERVER]
    [client] = [s for s in spans if s.kind == SpanKind.CLIENT]
    assert client.name == "inference.GRPCInferenceService/ModelInfer"
    assert client.attributes["triton.model_name"] == "blip_caption"
    assert client.parent.span_id == server.context.span_id
    version, trace_id, parent_id, flags = headers.pop("traceparent").split("-")
    assert (version, trace_id, parent_id) == ("00", f"{client.context.trace_id:032x}", f"{client.context.span_id:016x}")
    assert int(flags, 16) & 1  # sampled
    assert headers == {}


def test_an_unsampled_call_sends_triton_no_traceparent(traced, monkeypatch):
    """Triton traces any request that carries one, sampled or not: an unsampled call must carry none."""
    gateway, _, _ = traced
    headers = json.loads(_call(gateway.address, "CallsTriton",
                               metadata=[("traceparent", f"00-{CALLER_TRACE}-{CALLER_SPAN}-00")]))
    assert headers is None


def test_without_tracing_a_call_to_triton_sends_no_header():
    assert tracing._tracer is None
    with tracing.triton_call("blip_caption") as headers:
        assert headers is None
