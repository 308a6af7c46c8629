"""Typed exceptions, mapped from the call's grpc.StatusCode (never from message text)."""

from __future__ import annotations

import grpc


class CaptionError(Exception):
    """A failed call. `code` is the gRPC status code, `message` the server's explanation."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class InvalidArgumentError(CaptionError):
    """The image cannot be captioned or an option is out of range; retrying will not help."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ResourceExhaustedError(CaptionError):
    """Over a size limit, or the server is at capacity (retry later)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(CaptionError):
    """The server, or the inference server behind it, is down or restarting; retry later."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(CaptionError):
    """The call's timeout passed before the captions were ready."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class CancelledError(CaptionError):
    """The call was cancelled."""

    code = grpc.StatusCode.CANCELLED


class UnauthenticatedError(CaptionError):
    """The server requires an API key, and none or a wrong one was sent."""

    code = grpc.StatusCode.UNAUTHENTICATED


class NotFoundError(CaptionError):
    """The model the call named is not served (ListModels lists those that are)."""

    code = grpc.StatusCode.NOT_FOUND


class InternalError(CaptionError):
    """The server failed; its log has the details."""

    code = grpc.StatusCode.INTERNAL


ERRORS_BY_CODE: dict[grpc.StatusCode, type[CaptionError]] = {
    cls.code: cls
    for cls in (InvalidArgumentError, ResourceExhaustedError, UnavailableError, DeadlineExceededError,
                CancelledError, UnauthenticatedError, NotFoundError, InternalError)
}


def error_for(code: grpc.StatusCode, message: str) -> CaptionError:
    """The exception for a status code; codes without a class of their own give a plain CaptionError."""
    cls = ERRORS_BY_CODE.get(code)
    return cls(message) if cls is not None else CaptionError(message, code)


def from_rpc_error(error: grpc.RpcError) -> CaptionError:
    return error_for(error.code(), error.details() or "")


def code_from_name(name: str) -> grpc.StatusCode:
    return grpc.StatusCode[name] if name in grpc.StatusCode.__members__ else grpc.StatusCode.UNKNOWN
