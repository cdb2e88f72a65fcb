"""What the asyncio benchmark servers share (benchmarks.bare_server
--asyncio and benchmarks.asyncio_ledger_server): a grpc.aio server with the
server's options, run until SIGTERM, and a group commit's lane on the event
loop."""

import asyncio
import signal
from typing import Awaitable, Callable

import grpc

from orgbilling.server.app import grpc_server_options
from orgbilling.server.settings import Settings


def new_aio_server(settings: Settings) -> grpc.aio.Server:
    """A grpc.aio server with the settings' options, and no service yet."""
    return grpc.aio.server(options=grpc_server_options(settings),
                           maximum_concurrent_rpcs=settings.worker_threads)


async def serve_until_signalled(server: grpc.aio.Server, address: str) -> None:
    """Serves on address until SIGTERM or SIGINT."""
    server.add_insecure_port(address)
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stopping.set)
    await server.start()
    await stopping.wait()
    await server.stop(grace=1)


class AsyncLane:
    """server.group_commit's lane on one event loop: the items waiting at
    one moment go to commit_batch together, one batch at a time, and each
    caller awaits its own result (a future: no thread to wake)."""

    def __init__(self, commit_batch: Callable[[list], Awaitable[list]], *, batch_size_max: int):
        self._commit_batch = commit_batch
        self._batch_size_max = batch_size_max
        self._waiting: list[tuple[object, asyncio.Future]] = []
        self._committing = False

    async def submit(self, item):
        answer = asyncio.get_running_loop().create_future()
        self._waiting.append((item, answer))
        if not self._committing:
            self._committing = True
            asyncio.get_running_loop().create_task(self._commit_while_waiting())
        return await answer

    async def _commit_while_waiting(self) -> None:
        try:
            while self._waiting:
                batch = self._waiting[:self._batch_size_max]
                del self._waiting[:self._batch_size_max]
                try:
                    results = await self._commit_batch([item for item, _ in batch])
                except Exception as error:  # noqa: BLE001: every caller hears of it
                    for _, answer in batch:
                        answer.set_exception(error)
                    continue
                for (_, answer), result in zip(batch, results, strict=True):
                    answer.set_result(result)
        finally:
            self._committing = False
