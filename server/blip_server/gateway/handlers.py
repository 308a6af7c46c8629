"""Wrapping a grpc.aio method handler's behaviour, whatever its call shape: what the gateway's interceptors share.

A gRPC method has one of four shapes: unary-unary, unary-stream, stream-unary or stream-stream. What differs for
an interceptor is the response side: a unary response's behaviour is a coroutine function (unary-unary,
stream-unary), a streamed response's an async generator function (unary-stream, stream-stream; grpc.aio also
takes a coroutine function that answers with `context.write()`). The request side, one request or an iterator of
them, is passed through as it is. `wrap_handler` gives a handler's behaviour to the wrapper's method for its
response side and rebuilds the handler of the same shape, with the same (de)serializers, around what it returns;
every interceptor goes through it, so none can leave a shape unwrapped.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol, TypeVar, cast

import grpc

_TRequest = TypeVar("_TRequest")
_TResponse = TypeVar("_TResponse")
_In = TypeVar("_In")  # what a behaviour is given: one request, or the async iterator of a stream's requests

# What grpc.aio calls with each call (grpc-stubs types RpcMethodHandler's behaviours as the sync server's).
UnaryResponse = Callable[[_In, "grpc.aio.ServicerContext[_TRequest, _TResponse]"], Awaitable[_TResponse]]
StreamResponse = Callable[
    [_In, "grpc.aio.ServicerContext[_TRequest, _TResponse]"], "AsyncIterator[_TResponse] | Awaitable[None]"
]
# What a server interceptor is given: the next interceptor, or the handler's lookup.
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable["grpc.RpcMethodHandler[_TRequest, _TResponse] | None"]]

# Services that are not the gateway's API: open without an API key, and not counted in the metrics.
HEALTH_AND_REFLECTION = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class BehaviorWrapper(Protocol):
    """What an interceptor puts around a behaviour, one method per response shape."""

    def unary_response(
        self, behavior: UnaryResponse[_In, _TRequest, _TResponse]
    ) -> UnaryResponse[_In, _TRequest, _TResponse]: ...

    def stream_response(
        self, behavior: StreamResponse[_In, _TRequest, _TResponse]
    ) -> StreamResponse[_In, _TRequest, _TResponse]: ...


def wrap_handler(handler: grpc.RpcMethodHandler[_TRequest, _TResponse],
                 wrapper: BehaviorWrapper) -> grpc.RpcMethodHandler[_TRequest, _TResponse]:
    """`handler` with its behaviour wrapped by `wrapper`, whichever of the four shapes it has; raises TypeError for a
    handler with no behaviour (grpc never makes one)."""
    deserialize, serialize = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary is not None:
        unary_unary = cast("UnaryResponse[_TRequest, _TRequest, _TResponse]", handler.unary_unary)
        return grpc.unary_unary_rpc_method_handler(wrapper.unary_response(unary_unary), deserialize, serialize)
    if handler.unary_stream is not None:
        unary_stream = cast("StreamResponse[_TRequest, _TRequest, _TResponse]", handler.unary_stream)
        return grpc.unary_stream_rpc_method_handler(wrapper.stream_response(unary_stream), deserialize, serialize)
    if handler.stream_unary is not None:
        stream_unary = cast("UnaryResponse[AsyncIterator[_TRequest], _TRequest, _TResponse]", handler.stream_unary)
        return grpc.stream_unary_rpc_method_handler(wrapper.unary_response(stream_unary), deserialize, serialize)
    if handler.stream_stream is not None:
        stream_stream = cast("StreamResponse[AsyncIterator[_TRequest], _TRequest, _TResponse]",
                             handler.stream_stream)
        return grpc.stream_stream_rpc_method_handler(wrapper.stream_response(stream_stream), deserialize, serialize)
    raise TypeError(f"a method handler without a behaviour: {handler!r}")
