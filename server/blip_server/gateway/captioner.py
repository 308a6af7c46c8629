"""Captioning through the `blip_caption` ensemble: what the gateway checks itself, capacity, deadlines.

Options are checked by one piece of code, `blip_server.shared.generation_options` (from its declaration of
every option), here against the defaults and limits the replica serves, which `preprocess` and `text_decoder`
read from their config parameters with the same code and check again (with the prompt's token count, which
only they know); INVALID_ARGUMENT names the option and its range. The gateway also checks the request's size
and its own capacity.
The caller's deadline becomes the Triton call's timeout, and a cancelled call cancels the Triton request. Calls
go through the ReplicaPool (one replica in blip-serve, any number behind blip-gateway), which waits out an outage
(no replica ready; a replica that dies under a call) within the call's deadline and the pool's `max_wait`: a call
whose deadline passes meanwhile gets DEADLINE_EXCEEDED, one that waited `max_wait` UNAVAILABLE. Waiting calls
count among the images in flight (`max_concurrent_requests`).

A replica may serve several models (`blip_server.served_models`): the default ensemble's config lists them
(`ensemble.CATALOG_PARAMETER`), read once from a replica and again when a request names a model not in it (at most
every few seconds); a request naming none gets the default, one naming a model not served NOT_FOUND. A
repository without that list (one export, served as it was exported) serves one model, named after the folder of
its source checkpoint.

Each model has two ensembles of the same steps: deterministic requests (beam search, greedy, sampling with a seed)
go to the one with Triton's response cache, unseeded samples to the one without (docs/architecture.md, "Response
cache").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import PurePath
from typing import Any, TypeVar

import tritonclient.grpc.aio as triton_aio  # type: ignore[import-untyped]
from tritonclient.utils import InferenceServerException  # type: ignore[import-untyped]

from blip_server import ensemble
from blip_server.gateway import tracing
from blip_server.gateway.messages import OPTION_FIELDS, CaptionJob, CaptionResult, ModelDescription, ServedModel
from blip_server.gateway.replicas import NoReplica, ReplicaPool
from blip_server.gateway.status_mapping import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
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
# Seconds between two reads of the served models prompted by a request for a model not among them.
CATALOG_REFRESH = 5.0


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
        self._descriptions: dict[str, ModelDescription] = {}  # by model name
        self._catalog: list[ServedModel] | None = None
        self._catalog_read_at = 0.0

    async def close(self) -> None:
        await self.replicas.close()

    async def ready(self) -> bool:
        """Whether any Triton replica is ready (checks them all once)."""
        return await self.replicas.refresh()

    async def _call(self, request: Callable[[triton_aio.InferenceServerClient], Awaitable[T]],
                    deadline: float | None = None) -> T:
        """`request` through the replicas; `deadline`: the caller's, in time.monotonic()'s seconds (None: none)."""
        timeout = None if deadline is None else deadline - time.monotonic()
        if timeout is not None and timeout <= 0:
            raise DeadlineExceeded("the deadline passed before the request could be sent")
        try:
            return await self.replicas.call(request, timeout)
        except NoReplica as exc:
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceeded(f"the deadline passed while waiting for the inference server ({exc})") from None
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

    async def models(self, deadline: float | None = None) -> list[ServedModel]:
        """The models the replicas serve, the default first (read from one replica, once)."""
        if self._catalog is None:
            self._catalog = await self._read_catalog(deadline)
            self._catalog_read_at = time.monotonic()
        return self._catalog

    async def model(self, name: str, deadline: float | None = None) -> ServedModel:
        """The served model called `name` (empty: the default); NotFound when none is."""
        catalog = await self.models(deadline)
        stale = time.monotonic() - self._catalog_read_at > CATALOG_REFRESH
        if name and name not in {m.name for m in catalog} and stale:
            self._catalog = None  # the replicas may serve other models now (a rollout): read them again
            self._descriptions.clear()
            catalog = await self.models(deadline)
        for model in catalog:
            if model.name == name or (not name and model.default):
                return model
        raise NotFound(f"no model named {name!r} is served; ListModels lists them "
                       f"({', '.join(m.name for m in catalog)})")

    async def _config(self, model: str, deadline: float | None = None) -> dict[str, Any]:
        """A Triton model's config (as JSON) from a replica."""
        try:
            config: dict[str, Any] = await self._call(lambda client: client.get_model_config(model, as_json=True),
                                                      deadline)
        except InferenceServerException as exc:
            raise Unavailable(f"the inference server is unavailable ({exc.message()})") from exc
        found: dict[str, Any] = config["config"]
        return found

    async def _read_catalog(self, deadline: float | None = None) -> list[ServedModel]:
        params = (await self._config(ensemble.MODEL, deadline)).get("parameters", {})
        listed = params.get(ensemble.CATALOG_PARAMETER, {}).get("string_value", "")
        if listed:  # a catalog written before the cached ensembles lacks them: every request goes to "ensemble"
            return [ServedModel(m["name"], m["ensemble"], m["preprocess"], default=i == 0,
                                cached_ensemble=m.get("cached_ensemble", ""))
                    for i, m in enumerate(json.loads(listed))]
        # One export served as it was exported: named after its checkpoint's folder.
        source = (await self._config("preprocess", deadline)).get("parameters", {}).get("source_checkpoint", {})
        name = PurePath(source.get("string_value", "")).name or ensemble.MODEL
        return [ServedModel(name, ensemble.MODEL, "preprocess", default=True,
                            cached_ensemble=ensemble.CACHED_MODEL if await self._serves(ensemble.CACHED_MODEL,
                                                                                         deadline) else "")]

    async def _serves(self, model: str, deadline: float | None) -> bool:
        """Whether the replicas serve the Triton model `model` (an export older than it does not). Its config is
        asked for: Triton's repository index is one of the APIs the servers restrict to their admin."""
        try:
            await self._config(model, deadline)
        except Unavailable as exc:
            cause = exc.__cause__
            if isinstance(cause, InferenceServerException) and str(cause.status()) == "StatusCode.NOT_FOUND":
                return False
            raise
        return True

    async def check_options(self, job: CaptionJob, deadline: float | None = None) -> GenerationOptions:
        """The options against the served defaults and limits (preprocess checks them again, with the prompt's
        token count, which only it knows); returns them resolved."""
        description = await self.describe(job.model, deadline)
        limits = GenerationLimits(**{name: description.limits[name] for name in GenerationLimits.names()})
        try:
            resolved = GenerationOptions(**description.defaults).with_values(**job.options)
            resolved.validate(limits, prompt_tokens=1, max_positions=1 << 30)
        except OptionError as exc:
            raise InvalidArgument(str(exc)) from None
        return resolved

    async def caption(self, job: CaptionJob, timeout: float | None,
                      on_model: Callable[[str], None] = lambda name: None) -> CaptionResult:
        """Captions `job` within `timeout` seconds (None: none). `on_model` is told the served model's name once it
        is known (the metrics' label, before the job is checked): the lookup waits for a replica while none is
        ready and the models served are not yet known, and counts among the images in flight."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.in_flight >= self.limits.max_concurrent_requests:
            raise ResourceExhausted(
                f"the server is at capacity ({self.limits.max_concurrent_requests} images in flight); retry later"
            )
        if timeout is not None and timeout <= 0:
            raise DeadlineExceeded("the deadline passed before the request could be sent")
        self.in_flight += 1
        try:
            model = await self.model(job.model, deadline)  # waits, as the call does, while no replica is ready
            on_model(model.name)
            self.check(job)
            unseeded = (await self.check_options(job, deadline)).do_sample and job.options.get("seed") is None
            if unseeded and not model.cached_ensemble:
                # A replica exported before the cached ensembles caches its only one: there, an unseeded sample
                # gets a random seed of its own, so that the cache, keyed by the inputs, never answers it.
                job = replace(job, options={**job.options, "seed": secrets.randbits(63)})
            async with self._bytes_in_flight(len(job.image), deadline):
                captions = await self._infer(job, deadline, model.ensemble_for(deterministic=not unseeded))
        finally:
            self.in_flight -= 1
        return CaptionResult(captions, job.request_id, model.name)

    @contextlib.asynccontextmanager
    async def _bytes_in_flight(self, size: int, deadline: float | None) -> AsyncIterator[None]:
        """Wait until `size` more bytes fit the budget (an image larger than all of it goes alone)."""
        limit = self.limits.max_image_bytes_in_flight
        async with self._room:
            try:
                await asyncio.wait_for(self._room.wait_for(
                    lambda: self.bytes_in_flight == 0 or self.bytes_in_flight + size <= limit),
                    None if deadline is None else deadline - time.monotonic())
            except asyncio.TimeoutError:
                raise DeadlineExceeded("the deadline passed while the image waited for its turn") from None
            self.bytes_in_flight += size
        try:
            yield
        finally:
            async with self._room:
                self.bytes_in_flight -= size
                self._room.notify_all()

    async def _infer(self, job: CaptionJob, deadline: float | None,
                     triton_model: str = ensemble.MODEL) -> list[ensemble.CaptionText]:
        """`deadline`: the caller's, in time.monotonic()'s seconds (None: none)."""
        # The deadline travels twice: as the Triton call's own timeout, and as a request parameter the decoder
        # checks while it decodes (Triton cancels an ensemble only between its steps), in Unix time.
        unix = None if deadline is None else time.time() + (deadline - time.monotonic())
        parameters = {"deadline_unix_ms": int(unix * 1000)} if unix is not None else None
        inputs = ensemble.inputs(triton_aio, job.image, job.prompt or None, **job.options)

        async def infer(client: triton_aio.InferenceServerClient) -> Any:  # sent again: only the time left remains
            left = None if deadline is None else max(0.001, deadline - time.monotonic())
            with tracing.triton_call(triton_model) as headers:  # a span and its traceparent, when tracing is on
                return await client.infer(triton_model, inputs, outputs=ensemble.outputs(triton_aio),
                                          client_timeout=left, parameters=parameters, headers=headers)

        try:
            result = await self._call(infer, deadline)
        except InferenceServerException as exc:
            error = from_triton(exc)
            if isinstance(error, (Cancelled, Unavailable)) and deadline is not None and time.monotonic() >= deadline:
                # The decoder stopped because the caller's deadline passed, just before our own timer fired.
                raise DeadlineExceeded("the deadline passed before the caption was ready") from exc
            raise error from exc
        return ensemble.captions(result)[0]

    async def describe(self, name: str = "", deadline: float | None = None) -> ModelDescription:
        """What is served as model `name` (empty: the default; NotFound if none is), read from a replica: its
        preprocess model's parameters (defaults, limits, and what the export recorded there: source checkpoint,
        precision, image size)."""
        model = await self.model(name, deadline)
        if model.name not in self._descriptions:
            config = await self._config(model.preprocess, deadline)
            params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
            # What preprocess resolves unset options to and the limits it enforces, read as it reads them.
            defaults = from_parameters(GenerationOptions, params, "default_")
            limits = from_parameters(GenerationLimits, params, "limit_")
            self._descriptions[model.name] = ModelDescription(
                model=model.name,
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
        return self._descriptions[model.name]
