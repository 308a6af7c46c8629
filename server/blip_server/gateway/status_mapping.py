"""The gateway's status mapping: the one place that turns a call's failures into gRPC status codes.

Domain code raises ServiceError subclasses (and Triton's failures become them, `from_triton`); the interceptor
turns them into statuses, and anything unexpected into INTERNAL with a generic message while the traceback goes to
the log, on methods of every call shape; it also records each call in the metrics. Never UNKNOWN, never a
traceback on the wire. (The operator's errors, which stop blip-serve or blip-export, are `blip_server.errors`.)
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import grpc
from tritonclient.utils import InferenceServerException  # type: ignore[import-untyped]

from blip_client.protos.blip.caption.v1 import caption_pb2
from blip_server.gateway.handlers import (
    HEALTH_AND_REFLECTION,
    Continuation,
    StreamResponse,
    UnaryResponse,
    wrap_handler,
)

log = logging.getLogger("blip-serve.gateway")

_TRequest = TypeVar("_TRequest")
_TResponse = TypeVar("_TResponse")
_In = TypeVar("_In")
Observe = Callable[[str, str, float, str], None]  # (method, status code name, seconds, model)
# The model a call is for, as its metrics label it: set by the servicer once it knows (`label_call_model`).
_CALL_MODEL: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("blip_call_model", default=None)
UNKNOWN_MODEL = "unknown"  # the label of a call whose model is not served, or could not be read


def label_call_model(name: str) -> None:
    """Name the model the current call is for, in its metrics (a served name, or UNKNOWN_MODEL: bounded)."""
    holder = _CALL_MODEL.get()
    if holder is not None:
        holder[0] = name


class ServiceError(Exception):
    """A failure the caller is told about, with its status code."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def to_pb(self) -> caption_pb2.Error:
        return caption_pb2.Error(code=self.code.value[0], code_name=self.code.name, message=self.message)


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(ServiceError):
    code = grpc.StatusCode.CANCELLED


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class NotFound(ServiceError):
    """A model the server does not serve."""

    code = grpc.StatusCode.NOT_FOUND


INTERNAL_MESSAGE = "internal error; the server log has the details"
SERVICE = caption_pb2.DESCRIPTOR.services_by_name["CaptionService"].full_name

# Triton's status (as tritonclient reports it) -> what the caller gets.
_FROM_TRITON = {
    "StatusCode.INVALID_ARGUMENT": InvalidArgument,
    "StatusCode.UNAVAILABLE": Unavailable,
    "StatusCode.DEADLINE_EXCEEDED": DeadlineExceeded,
    "StatusCode.CANCELLED": Cancelled,
    "StatusCode.RESOURCE_EXHAUSTED": ResourceExhausted,
}
# Triton's prefix to the errors of an ensemble's models ("in ensemble 'blip_caption', ..."), any ensemble's.
_ENSEMBLE_PREFIX = re.compile(r"^in ensemble '[^']*', ")


def stub_died(exc: InferenceServerException) -> bool:
    """Whether Triton failed the call because a Python-backend stub of the ensemble died, read from its message: the
    one place that matches Triton's text, since Triton 2.51 gives no other signal of it.

    Measured on the embedded Triton 2.51 (the nvidia-pytriton wheel's), a tiny checkpoint, the stub of one model
    killed with SIGKILL (each of preprocess, vision_encoder and text_decoder in turn), 3 s and 13 s after the kill:
    every call that reaches the dead stub fails with gRPC status INTERNAL and the message "in ensemble
    'blip_caption', Stub process '<model>_0_<instance>' is not healthy." (preprocess has two instances: calls that
    reach the live one still succeed). Nothing else changes: ModelReady stays true for that model and for the
    ensemble, server liveness and readiness stay true, the repository index keeps every model READY, the
    statistics only count a failure (`nv_inference_request_failure{reason="BACKEND"}`, which a model's own error
    counts too), and the log says nothing at the default verbosity. Triton never restarts the stub; blip-serve's
    supervisor notices the stub process gone and restarts Triton.
    """
    message = str(exc.message() or "")
    return str(exc.status()) == "StatusCode.INTERNAL" and "Stub process" in message and "is not healthy" in message


def triton_unavailable(exc: InferenceServerException) -> bool:
    """Whether Triton could not take the call at all: UNAVAILABLE, or a Python-backend stub that died (`stub_died`;
    Triton answers so until it is restarted). Such a call had no effect, and may be retried on another replica."""
    return str(exc.status()) == "StatusCode.UNAVAILABLE" or stub_died(exc)


def from_triton(exc: InferenceServerException) -> ServiceError:
    if triton_unavailable(exc):
        message = _ENSEMBLE_PREFIX.sub("", str(exc.message() or ""), count=1)
        return Unavailable(f"the inference server is unavailable ({message})")
    kind = _FROM_TRITON.get(str(exc.status()))
    message = _ENSEMBLE_PREFIX.sub("", str(exc.message() or ""), count=1)
    if kind is None:
        log.error("Triton failed a request: %s %s", exc.status(), message)
        return ServiceError(INTERNAL_MESSAGE)
    return kind(message)


def unexpected(exc: BaseException) -> ServiceError:
    log.error("unexpected failure", exc_info=exc)
    return ServiceError(INTERNAL_MESSAGE)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns ServiceError into its status and anything else into INTERNAL, for methods of every shape, and reports
    each finished call's method, status code, duration and model to `observe` (the metrics; health checks and
    reflection are not reported; the model is what the servicer labelled, `label_call_model`, else ""). A method
    of CaptionService is reported by its name (`Caption`), any other by its full name without the leading slash
    (`package.Service/Method`)."""

    def __init__(self, observe: Observe = lambda method, code, seconds, model: None):
        self._observe = observe

    async def intercept_service(
        self,
        continuation: Continuation[_TRequest, _TResponse],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[_TRequest, _TResponse] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        full_name = handler_call_details.method
        service, _, method = full_name.rpartition("/")
        if full_name.startswith(HEALTH_AND_REFLECTION):
            observe: Observe = lambda *args: None  # noqa: E731
        else:
            observe = self._observe
            method = method if service == f"/{SERVICE}" else full_name.removeprefix("/")
        return wrap_handler(handler, _StatusMapping(method, observe))


# A client's deadline passes a moment before the server's (which starts when the call arrives), so a client that gives
# up at its deadline cancels the call just before it expires here: seen with 1.2 ms left on loopback.
DEADLINE_SKEW = 0.02


def _interrupted(exc: BaseException, context: grpc.aio.ServicerContext[_TRequest, _TResponse]) -> str:
    """The status of a call that ended without our answer: cancelled, past its deadline (or cancelled within
    `DEADLINE_SKEW` seconds of it: the client's deadline), or already aborted."""
    if isinstance(exc, grpc.aio.AbortError):
        code = context.code()
        return code.name if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN.name
    remaining = context.time_remaining()
    expired = remaining is not None and remaining <= DEADLINE_SKEW
    return (grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED).name


class _StatusMapping:
    """The behaviours of one call, wrapped: each reports the call's outcome before its status goes out (grpc.aio's
    `abort` sends it at once), so that whoever sees the answer also sees it counted."""

    def __init__(self, method: str, observe: Observe):
        self._method = method
        self._observe = observe

    @contextlib.asynccontextmanager
    async def _boundary(self, context: grpc.aio.ServicerContext[_TRequest, _TResponse]) -> AsyncIterator[None]:
        """Around one call's behaviour: its outcome observed, a failure turned into its status."""
        started = time.perf_counter()
        model = [""]  # the servicer names the call's model here (`label_call_model`)
        _CALL_MODEL.set(model)  # the call's own task: seen by the behaviour, which runs in it

        def observe(code: str) -> None:
            self._observe(self._method, code, time.perf_counter() - started, model[0])

        try:
            yield
        except ServiceError as exc:
            error = exc
        except (asyncio.CancelledError, grpc.aio.AbortError) as exc:
            observe(_interrupted(exc, context))
            raise
        except Exception as exc:  # noqa: BLE001 - the boundary: log it, answer INTERNAL
            error = unexpected(exc)
        else:
            observe(grpc.StatusCode.OK.name)
            return
        observe(error.code.name)
        await context.abort(error.code, error.message)

    def unary_response(
        self, behavior: UnaryResponse[_In, _TRequest, _TResponse]
    ) -> UnaryResponse[_In, _TRequest, _TResponse]:
        async def wrapped(request: _In, context: grpc.aio.ServicerContext[_TRequest, _TResponse]) -> _TResponse:
            async with self._boundary(context):
                return await behavior(request, context)
            raise AssertionError("unreachable: the boundary answers a failure with context.abort, which raises")

        return wrapped

    def stream_response(
        self, behavior: StreamResponse[_In, _TRequest, _TResponse]
    ) -> StreamResponse[_In, _TRequest, _TResponse]:
        async def wrapped(request: _In,
                          context: grpc.aio.ServicerContext[_TRequest, _TResponse]) -> AsyncIterator[_TResponse]:
            async with self._boundary(context):
                responses = behavior(request, context)
                if isinstance(responses, AsyncIterator):
                    async for response in responses:
                        yield response
                else:  # a coroutine that answers with context.write()
                    await responses

        return wrapped
