"""What both clients share: building requests, reading stream answers, channel options and credentials,
retries, call metadata."""

from __future__ import annotations

import enum
import json
import os
from dataclasses import dataclass
from typing import Final, Union

import grpc

from blip_client._errors import CaptionError, code_from_name, error_for
from blip_client._images import ImageInput, image_bytes
from blip_client._types import CaptionResult, GenerationOptions
from blip_client.protos.blip.caption.v1 import caption_pb2

# A PEM file (a certificate, a CA's certificates or a key): its path (str or path-like), or its contents (bytes).
# Public: blip_client.PemSource.
PemSource = Union[str, "os.PathLike[str]", bytes]


class Default(enum.Enum):
    """The value of an argument left out, where None has a meaning of its own (a call's timeout: None is none)."""

    DEFAULT = enum.auto()


# A call's `timeout` when it passes none: the client's own timeout applies.
DEFAULT: Final = Default.DEFAULT

DEFAULT_TARGET = "127.0.0.1:50051"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def build_request(image: ImageInput, prompt: str, options: GenerationOptions | None,
                  request_id: str = "", model: str = "") -> caption_pb2.CaptionRequest:
    return caption_pb2.CaptionRequest(
        image=image_bytes(image),
        prompt=prompt or "",
        options=(options or GenerationOptions()).to_pb(),
        request_id=request_id,
        model=model or "",
    )


def stream_item(response: caption_pb2.CaptionStreamResponse) -> tuple[int, CaptionResult | CaptionError]:
    """A CaptionStream answer as (index of its image, result or error); request ids are the indexes."""
    index = int(response.request_id)
    if response.HasField("error"):
        return index, error_for(code_from_name(response.error.code_name), response.error.message)
    return index, CaptionResult.from_pb(response.response)


# What the server answers when it could not start a call at all: safe to send again.
RETRYABLE = ("UNAVAILABLE", "CANCELLED")


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of calls answered UNAVAILABLE (no gateway reachable: one restarting or replaced; or a gateway whose
    inference servers stayed down longer than its --max-wait-for-ready) or CANCELLED by the server (a call that
    reached a gateway as it began to stop: gRPC's server cancels what it has not started; a call the caller itself
    cancels is never retried), done by gRPC itself: up to `max_attempts` attempts in all (gRPC allows at most 5),
    waiting a random time up to the current backoff before each (jitter), the backoff growing from
    `initial_backoff` by `backoff_multiplier` up to `max_backoff` seconds; never past the call's deadline. Captions
    are idempotent, so a retry is safe.

    A restart of Triton behind a gateway needs no retry: the gateway holds the call until Triton is back (within
    the call's deadline). The default covers a gateway's own restart or replacement: 5 attempts, the waits before
    the 2nd to 5th drawn up to 1, 2, 4 and 8 s: up to 15 s in all, 7.5 s on average (`worst_case_wait`).
    """

    max_attempts: int = 5
    initial_backoff: float = 1.0
    max_backoff: float = 8.0
    backoff_multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_attempts <= 5:
            raise ValueError("max_attempts must be 1 to 5 (gRPC's limit)")
        if self.initial_backoff <= 0 or self.max_backoff < self.initial_backoff or self.backoff_multiplier < 1:
            raise ValueError("backoffs must be positive, max_backoff >= initial_backoff, multiplier >= 1")

    def backoffs(self) -> list[float]:
        """The backoff before each retry (gRPC waits a random time up to it)."""
        return [min(self.max_backoff, self.initial_backoff * self.backoff_multiplier ** n)
                for n in range(self.max_attempts - 1)]

    @property
    def worst_case_wait(self) -> float:
        """Seconds of waiting between the attempts of one call, at most (the sum of the backoffs)."""
        return sum(self.backoffs())

    def service_config(self) -> str:
        return json.dumps({"methodConfig": [{
            "name": [{"service": "blip.caption.v1.CaptionService"}],
            "retryPolicy": {
                "maxAttempts": self.max_attempts,
                "initialBackoff": f"{self.initial_backoff}s",
                "maxBackoff": f"{self.max_backoff}s",
                "backoffMultiplier": self.backoff_multiplier,
                "retryableStatusCodes": list(RETRYABLE),
            },
        }]})


# The clients' default: RetryPolicy is frozen, so one instance serves every client.
DEFAULT_RETRY = RetryPolicy()


def channel_options(retry: RetryPolicy | None = DEFAULT_RETRY) -> list[tuple[str, int | str]]:
    options: list[tuple[str, int | str]] = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                                            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
    if retry is None or retry.max_attempts == 1:
        # No retry policy; gRPC's transparent retries stay on: they resend only a call that never reached the
        # server (e.g. one that raced a GOAWAY as the gateway renewed the connection at its maximum age).
        return options
    # gRPC keeps a request to resend it; above these buffers it would not retry: make room for a whole image.
    return options + [("grpc.enable_retries", 1), ("grpc.service_config", retry.service_config()),
                      ("grpc.per_rpc_retry_buffer_size", MAX_MESSAGE_BYTES),
                      ("grpc.retry_buffer_size", 4 * MAX_MESSAGE_BYTES)]


def _read(value: PemSource | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    with open(value, "rb") as f:
        return f.read()


def channel_credentials(tls_ca: PemSource | None = None, tls_cert: PemSource | None = None,
                        tls_key: PemSource | None = None) -> grpc.ChannelCredentials | None:
    """TLS credentials from PEM files (paths or bytes), or None for a plaintext channel (none given).

    tls_ca: the CA that signed the server's certificate (None: the system's roots); tls_cert and tls_key: this
    client's certificate and key, for servers that require mutual TLS (both or neither: ValueError otherwise).
    Public as `blip_client.channel_credentials`: what both clients build their channels with, for other channels
    to the service (`grpc.secure_channel(address, credentials)`).
    """
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("give both tls_cert and tls_key (mutual TLS), or neither")
    if tls_ca is None and tls_cert is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates=_read(tls_ca), private_key=_read(tls_key),
                                        certificate_chain=_read(tls_cert))


def metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()
