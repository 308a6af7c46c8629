"""AsyncCaptionClient: the asyncio client (grpc.aio)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import TypeVar

import grpc

from blip_client._errors import CaptionError, from_rpc_error
from blip_client._images import ImageInput
from blip_client._requests import (
    DEFAULT,
    DEFAULT_RETRY,
    DEFAULT_TARGET,
    Default,
    PemSource,
    RetryPolicy,
    build_request,
    channel_credentials,
    channel_options,
    metadata,
    stream_item,
)
from blip_client._types import CaptionResult, GenerationOptions, ModelInfo, ModelSummary
from blip_client.protos.blip.caption.v1 import caption_pb2, caption_pb2_grpc

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")


class AsyncCaptionClient:
    """The asyncio twin of CaptionClient.

        async with AsyncCaptionClient("127.0.0.1:50051") as client:
            result = await client.caption("photo.jpg")
    """

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout: float | None = 60.0, api_key: str | None = None,
                 tls_ca: PemSource | None = None, tls_cert: PemSource | None = None, tls_key: PemSource | None = None,
                 credentials: grpc.ChannelCredentials | None = None, retry: RetryPolicy | None = DEFAULT_RETRY,
                 model: str = "") -> None:
        credentials = credentials or channel_credentials(tls_ca, tls_cert, tls_key)
        options = channel_options(retry)
        self._channel = (grpc.aio.secure_channel(target, credentials, options) if credentials
                         else grpc.aio.insecure_channel(target, options))
        self._stub = caption_pb2_grpc.CaptionServiceStub(self._channel)
        self._timeout = timeout
        self._metadata = metadata(api_key)
        self._model = model  # the model of calls that name none (empty: the server's default)

    async def __aenter__(self) -> AsyncCaptionClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: grpc.aio.UnaryUnaryMultiCallable[_Request, _Response], request: _Request,
                    timeout: float | Default | None) -> _Response:
        try:
            return await method(request, timeout=self._timeout if timeout is DEFAULT else timeout,
                                metadata=self._metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error

    async def caption(self, image: ImageInput, *, prompt: str = "", options: GenerationOptions | None = None,
                      timeout: float | Default | None = DEFAULT, request_id: str = "",
                      model: str = "") -> CaptionResult:
        """Caption one image with `model` (empty: the default). Raises the errors CaptionClient.caption raises."""
        request = build_request(image, prompt, options, request_id, model or self._model)
        return CaptionResult.from_pb(await self._call(self._stub.Caption, request, timeout))

    async def caption_many(self, images: Sequence[ImageInput], *, prompt: str = "",
                           options: GenerationOptions | None = None, timeout: float | Default | None = DEFAULT,
                           concurrency: int = 8, return_exceptions: bool = False,
                           model: str = "") -> list[CaptionResult | BaseException]:
        """Caption many images with at most `concurrency` calls in flight; results in input order.

        With return_exceptions, a failed image's entry is its exception (as asyncio.gather gives it: a CaptionError
        for a failed call, but also e.g. the OSError of an unreadable path); otherwise the first failure raises.
        """
        slots = asyncio.Semaphore(max(1, concurrency))

        async def one(image: ImageInput) -> CaptionResult:
            async with slots:
                return await self.caption(image, prompt=prompt, options=options, timeout=timeout, model=model)

        return list(await asyncio.gather(*(one(i) for i in images), return_exceptions=return_exceptions))

    async def caption_stream(self, images: Iterable[ImageInput], *, prompt: str = "",
                             options: GenerationOptions | None = None, timeout: float | None = None,
                             model: str = "") -> AsyncIterator[tuple[int, CaptionResult | CaptionError]]:
        """Caption images over one CaptionStream; yields (index, result or error) as they finish."""
        model = model or self._model
        requests = (build_request(image, prompt, options, str(i), model) for i, image in enumerate(images))
        try:
            async for response in self._stub.CaptionStream(requests, timeout=timeout, metadata=self._metadata):
                yield stream_item(response)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error

    async def model_info(self, timeout: float | Default | None = DEFAULT, *, model: str = "") -> ModelInfo:
        request = caption_pb2.GetModelInfoRequest(model=model or self._model)
        return ModelInfo.from_pb(await self._call(self._stub.GetModelInfo, request, timeout))

    async def list_models(self, timeout: float | Default | None = DEFAULT) -> list[ModelSummary]:
        """The models the server serves, the default first."""
        response = await self._call(self._stub.ListModels, caption_pb2.ListModelsRequest(), timeout)
        return [ModelSummary.from_pb(m) for m in response.models]
