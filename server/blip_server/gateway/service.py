"""`blip.caption.v1.CaptionService`: thin handlers that convert messages and call the Captioner."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from blip_client.protos.blip.caption.v1 import caption_pb2, caption_pb2_grpc
from blip_server.gateway.captioner import Captioner
from blip_server.gateway.errors import ServiceError, unexpected
from blip_server.gateway.messages import CaptionJob


class CaptionServicer(caption_pb2_grpc.CaptionServiceServicer):
    def __init__(self, captioner: Captioner, observe_item: Callable[[str, float], None] = lambda code, seconds: None):
        self.captioner = captioner
        self._observe_item = observe_item  # each CaptionStream item's status code and duration (the metrics)

    async def Caption(self, request, context):
        job = CaptionJob.from_pb(request)
        result = await self.captioner.caption(job, context.time_remaining())
        return result.to_pb()

    async def GetModelInfo(self, request, context):
        return (await self.captioner.describe()).to_pb()

    async def CaptionStream(self, request_iterator, context):
        """Items are captioned concurrently (up to the stream window) and answered as they finish."""
        answers: asyncio.Queue = asyncio.Queue()
        window = asyncio.Semaphore(self.captioner.limits.stream_window)
        tasks: set[asyncio.Task] = set()

        async def answer(request) -> None:
            started, code = time.perf_counter(), "OK"
            try:
                result = await self.captioner.caption(CaptionJob.from_pb(request), context.time_remaining())
                response = caption_pb2.CaptionStreamResponse(request_id=request.request_id, response=result.to_pb())
            except ServiceError as exc:
                code = exc.code.name
                response = caption_pb2.CaptionStreamResponse(request_id=request.request_id, error=exc.to_pb())
            except Exception as exc:  # noqa: BLE001 - one item's failure must not end the stream
                error = unexpected(exc)
                code = error.code.name
                response = caption_pb2.CaptionStreamResponse(request_id=request.request_id, error=error.to_pb())
            self._observe_item(code, time.perf_counter() - started)
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
