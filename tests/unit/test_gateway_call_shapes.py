"""The gateway's interceptors (API keys, status mapping, metrics) on methods of all four call shapes.

The gateway's own methods are unary-unary (Caption, GetModelInfo) and stream-stream (CaptionStream); a method of
another shape added later must be authenticated, have its failures mapped and be counted all the same. So the test
adds a service with one method of each shape (and a streamed response written with `context.write()`, which
grpc.aio also takes) to a gateway made by `create_server`, with its interceptors, and calls them over gRPC.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from blip_server.gateway import status_mapping
from support.fake_captioner import FakeCaptioner
from support.gateway import BackgroundGateway

SERVICE = "test.v1.Shapes"
KEY = "k1"
SECRET = "secret detail of a bug"


def _fail(request: bytes) -> None:
    """What a request asks the method to do: b"invalid" raises a domain error, b"bug" an unexpected one."""
    if request == b"invalid":
        raise status_mapping.InvalidArgument("invalid on purpose")
    if request == b"bug":
        raise RuntimeError(SECRET)


class Shapes:
    """One method of each shape; each answers b"ok:" + its requests, after failing as the (first) request says.
    A streamed response answers one item before it fails, so that the failure ends a stream under way."""

    def __init__(self):
        self.calls: list[str] = []

    async def unary_unary(self, request: bytes, context) -> bytes:
        self.calls.append("unary_unary")
        _fail(request)
        return b"ok:" + request

    async def unary_stream(self, request: bytes, context) -> AsyncIterator[bytes]:
        self.calls.append("unary_stream")
        yield b"ok:" + request
        _fail(request)
        yield b"ok:" + request

    async def unary_stream_writes(self, request: bytes, context) -> None:
        self.calls.append("unary_stream_writes")
        await context.write(b"ok:" + request)
        _fail(request)
        await context.write(b"ok:" + request)

    async def stream_unary(self, requests: AsyncIterator[bytes], context) -> bytes:
        self.calls.append("stream_unary")
        received = [request async for request in requests]
        _fail(received[0])
        return b"ok:" + b"".join(received)

    async def stream_stream(self, requests: AsyncIterator[bytes], context) -> AsyncIterator[bytes]:
        self.calls.append("stream_stream")
        async for request in requests:
            yield b"ok:" + request
            _fail(request)

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE, {
            "UnaryUnary": grpc.unary_unary_rpc_method_handler(self.unary_unary),
            "UnaryStream": grpc.unary_stream_rpc_method_handler(self.unary_stream),
            "UnaryStreamWrites": grpc.unary_stream_rpc_method_handler(self.unary_stream_writes),
            "StreamUnary": grpc.stream_unary_rpc_method_handler(self.stream_unary),
            "StreamStream": grpc.stream_stream_rpc_method_handler(self.stream_stream),
        })


# method -> (how the channel calls it, its behaviour's name in Shapes)
METHODS = {
    "UnaryUnary": ("unary_unary", "unary_unary"),
    "UnaryStream": ("unary_stream", "unary_stream"),
    "UnaryStreamWrites": ("unary_stream", "unary_stream_writes"),
    "StreamUnary": ("stream_unary", "stream_unary"),
    "StreamStream": ("stream_stream", "stream_stream"),
}


@pytest.fixture(scope="module")
def shapes():
    """A gateway requiring API key KEY, serving the Shapes service beside its own; (gateway, Shapes)."""
    servicer = Shapes()
    gateway = BackgroundGateway(FakeCaptioner(), api_keys=[KEY])

    async def add():
        gateway.gateway.server.add_generic_rpc_handlers((servicer.handler(),))

    gateway.call(add())
    yield gateway, servicer
    gateway.stop()


def _call(address: str, method: str, request: bytes, key: str | None) -> list[bytes]:
    """Every response of one call (requests are [request, b"more"] for a streamed request); raises grpc.RpcError."""
    kind, _ = METHODS[method]
    metadata = [("authorization", f"Bearer {key}")] if key is not None else None
    with grpc.insecure_channel(address) as channel:
        stub = getattr(channel, kind)(f"/{SERVICE}/{method}")
        if kind.startswith("stream"):
            answer = stub(iter([request, b"more"]), metadata=metadata, timeout=10)
        else:
            answer = stub(request, metadata=metadata, timeout=10)
        return list(answer) if kind.endswith("stream") else [answer]


def _count(gateway, method: str, code: str) -> float:
    registry = gateway.gateway.metrics.registry
    return registry.get_sample_value("blip_gateway_requests_total", {"method": f"{SERVICE}/{method}",
                                                                      "code": code, "model": ""}) or 0.0


def _expected_ok(method: str, request: bytes) -> list[bytes]:
    kind, _ = METHODS[method]
    if kind == "stream_unary":
        return [b"ok:" + request + b"more"]
    if kind == "stream_stream":
        return [b"ok:" + request, b"ok:more"]
    return [b"ok:" + request] * (1 if kind == "unary_unary" else 2)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_shape_requires_the_api_key(shapes, method):
    gateway, servicer = shapes
    behavior = METHODS[method][1]
    before = servicer.calls.count(behavior)
    for key in (None, "wrong"):
        with pytest.raises(grpc.RpcError) as refused:
            _call(gateway.address, method, b"hello", key)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, key
        assert "API key" in refused.value.details()
    assert servicer.calls.count(behavior) == before  # refused before the method ran
    assert _call(gateway.address, method, b"hello", KEY) == _expected_ok(method, b"hello")
    assert servicer.calls.count(behavior) == before + 1


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_shape_maps_domain_errors_and_hides_bugs(shapes, method):
    gateway, _ = shapes
    with pytest.raises(grpc.RpcError) as invalid:
        _call(gateway.address, method, b"invalid", KEY)
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert invalid.value.details() == "invalid on purpose"
    with pytest.raises(grpc.RpcError) as bug:
        _call(gateway.address, method, b"bug", KEY)
    assert bug.value.code() == grpc.StatusCode.INTERNAL
    assert bug.value.details() == status_mapping.INTERNAL_MESSAGE
    wire = f"{bug.value.details()} {bug.value.debug_error_string()} {bug.value.trailing_metadata()}"
    assert SECRET not in wire and "Traceback" not in wire


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_shape_is_counted_by_method_and_code(shapes, method):
    gateway, _ = shapes
    codes = ("OK", "INVALID_ARGUMENT", "INTERNAL", "UNAUTHENTICATED")
    before = {code: _count(gateway, method, code) for code in codes}
    durations = "blip_gateway_request_duration_seconds_count"
    labels = {"method": f"{SERVICE}/{method}", "model": ""}
    durations_before = gateway.gateway.metrics.registry.get_sample_value(durations, labels) or 0.0
    _call(gateway.address, method, b"hi", KEY)
    for request, key in [(b"invalid", KEY), (b"bug", KEY), (b"hi", "wrong")]:
        with pytest.raises(grpc.RpcError):
            _call(gateway.address, method, request, key)
    # Counted before the status went out: the client has its answer, so the count is already there.
    assert {code: _count(gateway, method, code) - before[code] for code in codes} == dict.fromkeys(codes, 1)
    assert gateway.gateway.metrics.registry.get_sample_value(durations, labels) == durations_before + 4
    with grpc.insecure_channel(gateway.address) as channel:  # health checks stay open and are not counted
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert not [s for m in gateway.gateway.metrics.registry.collect() for s in m.samples
                if "Health" in s.labels.get("method", "")]
