"""Optional API keys: `authorization: Bearer <key>` metadata, checked in constant time, on every method whatever
its shape.

Health checks and reflection stay open so that load balancers and generic tools work without a key.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Iterable
from typing import NoReturn, TypeVar

import grpc

from blip_server.gateway.handlers import (
    HEALTH_AND_REFLECTION,
    Continuation,
    StreamResponse,
    UnaryResponse,
    wrap_handler,
)
from blip_server.gateway.status_mapping import Unauthenticated

_TRequest = TypeVar("_TRequest")
_TResponse = TypeVar("_TResponse")
_In = TypeVar("_In")

OPEN_SERVICES = HEALTH_AND_REFLECTION


class _Refusal:
    """Behaviours that raise `error` instead of running the method (the status interceptor answers it)."""

    def __init__(self, error: Unauthenticated):
        self._error = error

    def unary_response(
        self, behavior: UnaryResponse[_In, _TRequest, _TResponse]
    ) -> UnaryResponse[_In, _TRequest, _TResponse]:
        error = self._error

        async def refuse(request: _In, context: grpc.aio.ServicerContext[_TRequest, _TResponse]) -> NoReturn:
            raise error

        return refuse

    def stream_response(
        self, behavior: StreamResponse[_In, _TRequest, _TResponse]
    ) -> StreamResponse[_In, _TRequest, _TResponse]:
        error = self._error

        async def refuse(request: _In,
                         context: grpc.aio.ServicerContext[_TRequest, _TResponse]) -> AsyncIterator[_TResponse]:
            raise error
            yield  # pragma: no cover - makes this an async generator

        return refuse


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, keys: list[str]):
        self._keys = [k.encode() for k in keys if k]

    def _authorised(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
        for key, value in metadata or ():
            # A key's value is bytes only when the key ends in "-bin": "authorization" is always a str.
            if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
                given = value[len("Bearer "):].encode()
                # Every key is compared, each in constant time: the time taken says nothing about which matched.
                return bool(sum(hmac.compare_digest(given, k) for k in self._keys))
        return False

    async def intercept_service(
        self,
        continuation: Continuation[_TRequest, _TResponse],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[_TRequest, _TResponse] | None:
        handler = await continuation(handler_call_details)
        if handler is None or not self._keys or handler_call_details.method.startswith(OPEN_SERVICES):
            return handler
        if self._authorised(handler_call_details.invocation_metadata):
            return handler
        refusal = Unauthenticated("a valid API key is required: send 'authorization: Bearer <key>' metadata")
        return wrap_handler(handler, _Refusal(refusal))
