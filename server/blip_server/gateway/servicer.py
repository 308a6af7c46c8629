"""`blip.caption.v1.CaptionService`: thin handlers that convert messages and call the Captioner.

Requests arrive serialized (see `method_handlers`) and are parsed by `CaptionJob.from_bytes`, so that a malformed
message is an INVALID_ARGUMENT of its own call or stream item rather than an UNKNOWN status from grpc.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import grpc
from google.protobuf.message import DecodeError

from blip_client.protos.blip.caption.v1 import caption_pb2
from blip_server.gateway.captioner import Captioner
from blip_server.gateway.messages import CaptionJob, UnparsableRequest
from blip_server.gateway.status_mapping import (
    UNKNOWN_MODEL,
    InvalidArgument,
    ServiceError,
    label_call_model,
    unexpected,
)


class CaptionServicer:
    """Not a caption_pb2_grpc.CaptionServiceServicer: its methods take requests as bytes (see `method_handlers`),
    not the parsed messages of the generated interface."""

    def __init__(self, captioner: Captioner,
                 observe_item: Callable[[str, float, str], None] = lambda code, seconds, model: None):
        self.captioner = captioner
        self._observe_item = observe_item  # each CaptionStream item's status code, duration and model (the metrics)

    async def _model_name(self, name: str, timeout: float | None = None) -> str:
        """The served name of the model a request named (raises NotFound), for the metrics' model label; read
        from a replica the first time, waiting for one while none is ready (up to `timeout` seconds)."""
        label_call_model(UNKNOWN_MODEL)
        deadline = None if timeout is None else time.monotonic() + timeout
        served = (await self.captioner.model(name, deadline)).name
        label_call_model(served)
        return served

    async def Caption(
        self, request: bytes, context: grpc.aio.ServicerContext[bytes, caption_pb2.CaptionResponse]
    ) -> caption_pb2.CaptionResponse:
        label_call_model(UNKNOWN_MODEL)
        job = CaptionJob.from_bytes(request)
        result = await self.captioner.caption(job, context.time_remaining(), on_model=label_call_model)
        return result.to_pb()

    async def GetModelInfo(self, request: bytes,
                           context: grpc.aio.ServicerContext[bytes, caption_pb2.ModelInfo]) -> caption_pb2.ModelInfo:
        label_call_model(UNKNOWN_MODEL)
        try:
            name = caption_pb2.GetModelInfoRequest.FromString(request).model
        except DecodeError:
            raise InvalidArgument("the request is not a valid blip.caption.v1.GetModelInfoRequest message") from None
        timeout = context.time_remaining()
        return (await self.captioner.describe(await self._model_name(name, timeout))).to_pb()

    async def ListModels(
        self, request: bytes, context: grpc.aio.ServicerContext[bytes, caption_pb2.ListModelsResponse]
    ) -> caption_pb2.ListModelsResponse:
        try:
            caption_pb2.ListModelsRequest.FromString(request)
        except DecodeError:
            raise InvalidArgument("the request is not a valid blip.caption.v1.ListModelsRequest message") from None
        summaries = []
        for model in await self.captioner.models():
            description = await self.captioner.describe(model.name)
            summaries.append(caption_pb2.ModelSummary(
                name=model.name, source_checkpoint=description.source_checkpoint, precision=description.precision,
                is_default=model.default, triton_ensemble=model.ensemble,
                triton_cached_ensemble=model.cached_ensemble))
        return caption_pb2.ListModelsResponse(models=summaries)

    async def CaptionStream(
        self,
        request_iterator: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext[bytes, caption_pb2.CaptionStreamResponse],
    ) -> AsyncIterator[caption_pb2.CaptionStreamResponse]:
        """Items are captioned concurrently (up to the stream window) and answered as they finish."""
        answers: asyncio.Queue[caption_pb2.CaptionStreamResponse | None] = asyncio.Queue()
        window = asyncio.Semaphore(self.captioner.limits.stream_window)
        tasks: set[asyncio.Task[None]] = set()

        async def answer(request: bytes) -> None:
            started, code, request_id, model = time.perf_counter(), "OK", "", UNKNOWN_MODEL
            try:
                job = CaptionJob.from_bytes(request)
                request_id = job.request_id

                def served(name: str) -> None:
                    nonlocal model
                    model = name

                result = await self.captioner.caption(job, context.time_remaining(), on_model=served)
                response = caption_pb2.CaptionStreamResponse(request_id=request_id, response=result.to_pb())
            except ServiceError as exc:
                code = exc.code.name
                request_id = exc.request_id if isinstance(exc, UnparsableRequest) else request_id
                response = caption_pb2.CaptionStreamResponse(request_id=request_id, error=exc.to_pb())
            except Exception as exc:  # noqa: BLE001 - one item's failure must not end the stream
                error = unexpected(exc)
                code = error.code.name
                response = caption_pb2.CaptionStreamResponse(request_id=request_id, error=error.to_pb())
            self._observe_item(code, time.perf_counter() - started, model)
            await answers.put(response)

        async def read() -> None:
            async for request in request_iterator:
                await window.acquire()
                task = asyncio.create_task(answer(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.gather(*list(tasks))
            await answers.put(None)  # the client half-closed and every item is answered

        reader = asyncio.create_task(read())
        try:
            while True:
                getter = asyncio.create_task(answers.get())
                await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    reader.result()  # the request stream failed: re-raise its error
                    continue
                response = getter.result()
                if response is None:
                    return
                yield response
                window.release()
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()


def method_handlers(servicer: CaptionServicer) -> grpc.GenericRpcHandler:
    """CaptionService's handlers, taking requests as bytes (parsed by the servicer) and answering messages."""
    serialize = lambda message: message.SerializeToString()  # noqa: E731
    return grpc.method_handlers_generic_handler(
        caption_pb2.DESCRIPTOR.services_by_name["CaptionService"].full_name,
        {
            "Caption": grpc.unary_unary_rpc_method_handler(servicer.Caption, response_serializer=serialize),
            "CaptionStream": grpc.stream_stream_rpc_method_handler(servicer.CaptionStream,
                                                                   response_serializer=serialize),
            "GetModelInfo": grpc.unary_unary_rpc_method_handler(servicer.GetModelInfo, response_serializer=serialize),
            "ListModels": grpc.unary_unary_rpc_method_handler(servicer.ListModels, response_serializer=serialize),
        },
    )
