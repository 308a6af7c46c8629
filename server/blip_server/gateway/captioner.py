"""Captioning through the `blip_caption` ensemble: what the gateway checks itself, capacity, deadlines.

Options are checked by one piece of code, `blip_server.shared.generation_options` (from its declaration of
every option), here against the defaults and limits the replica serves, which `preprocess` and `text_decoder`
read from their config parameters with the same code and check again (with the prompt's token count, which
only they know); INVALID_ARGUMENT names the option and its range. The gateway also checks the request's size
and its own capacity.
The caller's deadline becomes the Triton call's timeout, and a cancelled call cancels the Triton request. Calls
go through the ReplicaPool (one replica in blip-serve, any number behind blip-gateway).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import tritonclient.grpc.aio as triton_aio  # type: ignore[import-untyped]
from tritonclient.utils import InferenceServerException  # type: ignore[import-untyped]

from blip_server import ensemble
from blip_server.gateway.messages import OPTION_FIELDS, CaptionJob, CaptionResult, ModelDescription
from blip_server.gateway.replicas import NoReplica, ReplicaPool
from blip_server.gateway.status_mapping import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
    from_triton,
)
from blip_server.shared.generation_options import (
    GenerationLimits,
    GenerationOptions,
    OptionError,
    from_parameters,
    render_parameter,
)
from blip_server.shared.image_header import ImageError, ImageLimits, read_header

log = logging.getLogger("blip-serve.gateway")
T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class GatewayLimits:
    """What the gateway accepts.

    max_image_bytes: largest encoded image (RESOURCE_EXHAUSTED above it).
    max_image_pixels, max_image_side: largest image its header may declare (INVALID_ARGUMENT above them).
    max_prompt_bytes: longest prompt in UTF-8 bytes (INVALID_ARGUMENT above it; the token limit is Triton's).
    max_concurrent_requests: images in flight at once, all clients together (RESOURCE_EXHAUSTED above it).
    max_image_bytes_in_flight: encoded bytes of the images sent to Triton at once; more wait their turn (until
        their deadline), so that a burst of large images cannot multiply the memory of the gateway and Triton.
    stream_window: images of one stream in flight at once (the stream waits for a free slot).
    """

    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = ImageLimits.max_pixels
    max_image_side: int = ImageLimits.max_side
    max_prompt_bytes: int = 2048
    max_concurrent_requests: int = 256
    max_image_bytes_in_flight: int = 256 * 1024 * 1024
    stream_window: int = 16

    @property
    def max_message_bytes(self) -> int:
        """The transport's limit on one message: the image limit plus a margin (a quarter, at least 4 MiB)."""
        return self.max_image_bytes + max(4 << 20, self.max_image_bytes // 4) + self.max_prompt_bytes


class Captioner:
    def __init__(self, replicas: ReplicaPool, limits: GatewayLimits):
        self.replicas = replicas
        self.limits = limits
        self.in_flight = 0
        self.bytes_in_flight = 0
        self._room = asyncio.Condition()
        self._description: ModelDescription | None = None

    async def close(self) -> None:
        await self.replicas.close()

    async def ready(self) -> bool:
        """Whether any Triton replica is ready (checks them all once)."""
        return await self.replicas.refresh()

    async def _call(self, request: Callable[[triton_aio.InferenceServerClient], Awaitable[T]]) -> T:
        try:
            return await self.replicas.call(request)
        except NoReplica as exc:
            raise Unavailable(f"the inference server is unavailable ({exc})") from None

    def check(self, job: CaptionJob) -> None:
        """What the gateway checks before anything is sent: sizes, and the image's header."""
        if not job.image:
            raise InvalidArgument("image is empty: send the encoded image file's bytes")
        if len(job.image) > self.limits.max_image_bytes:
            raise ResourceExhausted(f"image is {len(job.image)} bytes; the limit is {self.limits.max_image_bytes}")
        if len(job.prompt.encode("utf-8")) > self.limits.max_prompt_bytes:
            raise InvalidArgument(f"prompt is longer than {self.limits.max_prompt_bytes} bytes")
        try:
            read_header(job.image, ImageLimits(self.limits.max_image_pixels, self.limits.max_image_side))
        except ImageError as exc:
            raise InvalidArgument(str(exc)) from None

    async def check_options(self, job: CaptionJob) -> None:
        """The options against the served defaults and limits (preprocess checks them again, with the prompt's
        token count, which only it knows)."""
        description = await self.describe()
        limits = GenerationLimits(**{name: description.limits[name] for name in GenerationLimits.names()})
        try:
            resolved = GenerationOptions(**description.defaults).with_values(**job.options)
            resolved.validate(limits, prompt_tokens=1, max_positions=1 << 30)
        except OptionError as exc:
            raise InvalidArgument(str(exc)) from None

    async def caption(self, job: CaptionJob, timeout: float | None) -> CaptionResult:
        self.check(job)
        if self.in_flight >= self.limits.max_concurrent_requests:
            raise ResourceExhausted(
                f"the server is at capacity ({self.limits.max_concurrent_requests} images in flight); retry later"
            )
        if timeout is not None and timeout <= 0:
            raise DeadlineExceeded("the deadline passed before the request could be sent")
        self.in_flight += 1
        try:
            await self.check_options(job)
            async with self._bytes_in_flight(len(job.image), timeout):
                captions = await self._infer(job, timeout)
        finally:
            self.in_flight -= 1
        return CaptionResult(captions, job.request_id, ensemble.MODEL)

    @contextlib.asynccontextmanager
    async def _bytes_in_flight(self, size: int, timeout: float | None) -> AsyncIterator[None]:
        """Wait until `size` more bytes fit the budget (an image larger than all of it goes alone)."""
        limit = self.limits.max_image_bytes_in_flight
        async with self._room:
            try:
                await asyncio.wait_for(self._room.wait_for(
                    lambda: self.bytes_in_flight == 0 or self.bytes_in_flight + size <= limit), timeout)
            except asyncio.TimeoutError:
                raise DeadlineExceeded("the deadline passed while the image waited for its turn") from None
            self.bytes_in_flight += size
        try:
            yield
        finally:
            async with self._room:
                self.bytes_in_flight -= size
                self._room.notify_all()

    async def _infer(self, job: CaptionJob, timeout: float | None) -> list[ensemble.CaptionText]:
        # The deadline travels twice: as the Triton call's own timeout, and as a request parameter the decoder
        # checks while it decodes (Triton cancels an ensemble only between its steps).
        deadline = time.time() + timeout if timeout is not None else None
        parameters = {"deadline_unix_ms": int(deadline * 1000)} if deadline is not None else None
        inputs = ensemble.inputs(triton_aio, job.image, job.prompt or None, **job.options)

        async def infer(client: triton_aio.InferenceServerClient) -> Any:  # on a retry, only the time left remains
            left = None if deadline is None else max(0.001, deadline - time.time())
            return await client.infer(ensemble.MODEL, inputs, outputs=ensemble.outputs(triton_aio),
                                      client_timeout=left, parameters=parameters)

        try:
            result = await self._call(infer)
        except InferenceServerException as exc:
            error = from_triton(exc)
            if isinstance(error, Cancelled) and deadline is not None and time.time() >= deadline:
                # The decoder stopped because the caller's deadline passed, just before our own timer fired.
                raise DeadlineExceeded("the deadline passed before the caption was ready") from exc
            raise error from exc
        return ensemble.captions(result)[0]

    async def describe(self) -> ModelDescription:
        """What is served, read from a replica: the preprocess model's parameters (defaults, limits, and what the
        export recorded there: source checkpoint, precision, image size)."""
        if self._description is None:
            try:
                config = await self._call(lambda client: client.get_model_config("preprocess", as_json=True))
            except InferenceServerException as exc:
                raise Unavailable(f"the inference server is unavailable ({exc.message()})") from exc
            params = {k: v.get("string_value", "") for k, v in config["config"].get("parameters", {}).items()}
            # What preprocess resolves unset options to and the limits it enforces, read as it reads them.
            defaults = from_parameters(GenerationOptions, params, "default_")
            limits = from_parameters(GenerationLimits, params, "limit_")
            self._description = ModelDescription(
                model=ensemble.MODEL,
                source_checkpoint=params.get("source_checkpoint", ""),
                image_height=int(params.get("image_height") or 0),
                image_width=int(params.get("image_width") or 0),
                precision=params.get("precision", ""),
                early_stopping=render_parameter(defaults.early_stopping),
                defaults={name: getattr(defaults, name) for name in OPTION_FIELDS
                          if getattr(defaults, name) is not None},
                limits={
                    "max_image_bytes": self.limits.max_image_bytes,
                    "max_image_pixels": self.limits.max_image_pixels,
                    "max_image_side": self.limits.max_image_side,
                    "max_prompt_bytes": self.limits.max_prompt_bytes,
                    "max_prompt_tokens": int(params.get("max_prompt_tokens") or 0),
                    **limits.as_dict(),
                    "max_concurrent_requests": self.limits.max_concurrent_requests,
                },
            )
        return self._description
