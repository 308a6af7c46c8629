"""Captioning through the `blip_caption` ensemble: what the gateway checks itself, capacity, deadlines.

Option ranges are checked in one place, the ensemble's `preprocess` model, which answers INVALID_ARGUMENT
naming the option and its range; the gateway checks what only it can: the request's size, its own capacity.
The caller's deadline becomes the Triton call's timeout, and a cancelled call cancels the Triton request.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from blip_server import ensemble
from blip_server.gateway.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
    from_triton,
)
from blip_server.gateway.messages import OPTION_FIELDS, CaptionJob, CaptionResult, ModelDescription

log = logging.getLogger("blip-serve.gateway")


@dataclass(frozen=True, kw_only=True)
class GatewayLimits:
    """What the gateway accepts.

    max_image_bytes: largest encoded image (RESOURCE_EXHAUSTED above it).
    max_prompt_bytes: longest prompt in UTF-8 bytes (INVALID_ARGUMENT above it; the token limit is Triton's).
    max_concurrent_requests: images in flight at once, all clients together (RESOURCE_EXHAUSTED above it).
    stream_window: images of one stream in flight at once (the stream waits for a free slot).
    """

    max_image_bytes: int = 20 * 1024 * 1024
    max_prompt_bytes: int = 2048
    max_concurrent_requests: int = 256
    stream_window: int = 16


# The gateway's channel to Triton, on loopback. gRPC backs off exponentially (up to 2 minutes) after failed
# connection attempts, and a call made meanwhile fails at once: while Triton starts or restarts, retry within a
# second instead, so the gateway serves as soon as Triton does.
TRITON_CHANNEL_ARGS = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def _parse_default(name: str, raw: str) -> bool | int | float:
    """A `default_<option>` parameter of the preprocess config, as the type of the option's tensor."""
    dtype = ensemble.OPTION_TENSORS[name][2]
    return raw.strip().lower() == "true" if dtype is np.bool_ else dtype(raw).item()


class Captioner:
    def __init__(self, triton_url: str, limits: GatewayLimits, manifest: dict | None = None):
        self._triton_url = triton_url
        self._triton: triton_aio.InferenceServerClient | None = None
        self.limits = limits
        self._manifest = manifest or {}
        self._in_flight = 0
        self._description: ModelDescription | None = None

    @property
    def _client(self) -> triton_aio.InferenceServerClient:
        """The channel to Triton, opened on first use: in the event loop that serves the gateway."""
        if self._triton is None:
            self._triton = triton_aio.InferenceServerClient(self._triton_url, channel_args=TRITON_CHANNEL_ARGS)
        return self._triton

    async def close(self) -> None:
        if self._triton is not None:
            await self._triton.close()

    async def ready(self) -> bool:
        try:
            return bool(await self._client.is_model_ready(ensemble.MODEL))
        except InferenceServerException:
            return False

    def check(self, job: CaptionJob) -> None:
        if not job.image:
            raise InvalidArgument("image is empty: send the encoded image file's bytes")
        if len(job.image) > self.limits.max_image_bytes:
            raise ResourceExhausted(f"image is {len(job.image)} bytes; the limit is {self.limits.max_image_bytes}")
        if len(job.prompt.encode("utf-8")) > self.limits.max_prompt_bytes:
            raise InvalidArgument(f"prompt is longer than {self.limits.max_prompt_bytes} bytes")

    async def caption(self, job: CaptionJob, timeout: float | None) -> CaptionResult:
        self.check(job)
        if self._in_flight >= self.limits.max_concurrent_requests:
            raise ResourceExhausted(
                f"the server is at capacity ({self.limits.max_concurrent_requests} images in flight); retry later"
            )
        if timeout is not None and timeout <= 0:
            raise DeadlineExceeded("the deadline passed before the request could be sent")
        self._in_flight += 1
        try:
            captions = await self._infer(job, timeout)
        finally:
            self._in_flight -= 1
        return CaptionResult(captions, job.request_id, ensemble.MODEL)

    async def _infer(self, job: CaptionJob, timeout: float | None) -> list[ensemble.CaptionText]:
        # The deadline travels twice: as the Triton call's own timeout, and as a request parameter the decoder
        # checks while it decodes (Triton cancels an ensemble only between its steps).
        deadline = time.time() + timeout if timeout is not None else None
        parameters = {"deadline_unix_ms": int(deadline * 1000)} if deadline is not None else None
        try:
            result = await self._client.infer(
                ensemble.MODEL,
                ensemble.inputs(triton_aio, job.image, job.prompt or None, **job.options),
                outputs=ensemble.outputs(triton_aio),
                client_timeout=timeout,
                parameters=parameters,
            )
        except InferenceServerException as exc:
            error = from_triton(exc)
            if isinstance(error, Cancelled) and deadline is not None and time.time() >= deadline:
                # The decoder stopped because the caller's deadline passed, just before our own timer fired.
                raise DeadlineExceeded("the deadline passed before the caption was ready") from exc
            raise error from exc
        return ensemble.captions(result)[0]

    async def describe(self) -> ModelDescription:
        """What is served; read from Triton (the preprocess model's defaults and limits) and the export manifest."""
        if self._description is None:
            try:
                config = await self._client.get_model_config("preprocess", as_json=True)
            except InferenceServerException as exc:
                raise Unavailable(f"the inference server is unavailable ({exc.message()})") from exc
            params = {k: v.get("string_value", "") for k, v in config["config"].get("parameters", {}).items()}
            defaults = {name: _parse_default(name, params[f"default_{name}"])
                        for name in OPTION_FIELDS if params.get(f"default_{name}")}
            size = self._manifest.get("image_size") or [0, 0]
            self._description = ModelDescription(
                model=ensemble.MODEL,
                source_checkpoint=self._manifest.get("source", ""),
                image_height=size[0],
                image_width=size[1],
                precision=self._manifest.get("precision", ""),
                defaults=defaults,
                limits={
                    "max_image_bytes": self.limits.max_image_bytes,
                    "max_image_pixels": int(params.get("max_image_pixels") or 0),
                    "max_prompt_tokens": int(params.get("max_prompt_tokens") or 0),
                    "max_num_beams": int(params.get("limit_max_num_beams") or 0),
                    "max_new_tokens": int(params.get("limit_max_new_tokens") or 0),
                    "max_num_return_sequences": int(params.get("limit_max_num_return_sequences") or 0),
                    "max_no_repeat_ngram_size": int(params.get("limit_max_no_repeat_ngram_size") or 0),
                    "max_concurrent_requests": self.limits.max_concurrent_requests,
                },
            )
        return self._description
