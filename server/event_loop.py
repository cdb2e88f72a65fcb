"""An asyncio event loop in a thread of its own, for a grpc.aio server in a
process whose other parts (the sweepers, the health monitor, the key
reloads, the callers of start and stop) are threads.

uvloop's loop, not asyncio's: on asyncio's, the loop's own turns cost a
hot deduction about as much as the threads' hand-off the loop replaced
(benchmarks/README.md, "The server on asyncio")."""

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

import uvloop

T = TypeVar("T")


class EventLoopThread:
    def __init__(self, *, name: str):
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coroutine: Awaitable[T], *, timeout_s: float | None = None) -> T:
        """Runs `coroutine` on the loop and returns its result, from any other
        thread; TimeoutError after timeout_s (the coroutine is then cancelled)."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(timeout=timeout_s)
        except TimeoutError:
            future.cancel()
            raise

    def call(self, function: Callable[[], T]) -> T:
        """Calls `function` on the loop (where grpc.aio objects must be made
        and used) and returns its result, from any other thread."""

        async def called() -> T:
            return function()

        return self.run(called())

    def close(self) -> None:
        """Stops the loop once what it runs now has returned, and closes it."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()
