"""Optional API keys: `authorization: Bearer <key>` metadata, checked in constant time.

Health checks and reflection stay open so that load balancers and generic tools work without a key.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Iterable
from typing import NoReturn, TypeVar

import grpc

from blip_server.gateway.errors import Continuation, Unauthenticated, replace_behavior

_TRequest = TypeVar("_TRequest")
_TResponse = TypeVar("_TResponse")

OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


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
        if handler.unary_unary is not None:
            async def refuse_unary(request: _TRequest,
                                   context: grpc.aio.ServicerContext[_TRequest, _TResponse]) -> NoReturn:
                raise refusal

            return replace_behavior(handler, unary_unary=refuse_unary)

        async def refuse_stream(request_iterator: AsyncIterator[_TRequest],
                                context: grpc.aio.ServicerContext[_TRequest, _TResponse]) -> AsyncIterator[_TResponse]:
            raise refusal
            yield  # pragma: no cover - makes this an async generator

        return replace_behavior(handler, stream_stream=refuse_stream)
