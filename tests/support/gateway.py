"""A gateway running in a background event loop inside the test process, for tests without Triton."""

from __future__ import annotations

import asyncio
import threading

from blip_server.gateway.grpc_server import create_server


class BackgroundGateway:
    def __init__(self, captioner, api_keys=(), credentials=None, tracing=None):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.gateway = self.call(create_server("127.0.0.1:0", captioner, list(api_keys), credentials=credentials,
                                                 tracing=tracing))
        self.address = f"127.0.0.1:{self.gateway.port}"

    def call(self, coroutine, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self) -> None:
        self.call(self.gateway.stop(grace=1))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
