"""A prototype, for measuring only: DeductCredits on a grpc.aio server, with
the ledger's own validation, fingerprint, SQL and answer, its group commit
on one event loop (callers wait on futures, one batch at a time, as a lane)
and psycopg's async pool. No interceptors (no authentication, rate limit or
admission), no other RPC but health, no refusal but as a bare status.

    python -m benchmarks.asyncio_ledger_server            # as `orgbilling serve` would listen
    python -m benchmarks.asyncio_ledger_server --canned   # deductions answered at once

What the threaded server's hot deduction would cost on asyncio:
`python -m benchmarks.profile --asyncio-prototype [--canned-ledger]
--scenario deduct_hot` next to `--scenario noop` (benchmarks/README.md).
"""

import argparse
import asyncio
import signal

import grpc
import orjson
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from psycopg.types.json import set_json_dumps, set_json_loads
from psycopg_pool import AsyncConnectionPool

from orgbilling.v1 import credit_service_pb2_grpc
from orgbilling.server.app import grpc_server_options
from orgbilling.server.database import connection_options
from orgbilling.server.servicers.credit import check_deduction, deduction_from, deduction_response
from orgbilling.server.settings import Settings
from orgbilling.server.store import Deduction, DeductionResult, _deduction_result, _statement
from orgbilling.server.validation import Checks
from benchmarks.canned_ledger_server import DEDUCTED


class AsyncLane:
    """The deductions waiting at one moment share a transaction; one at a
    time. Store.commit_group's statements, on an async connection."""

    def __init__(self, pool: AsyncConnectionPool | None, *, batch_size_max: int):
        self._pool = pool
        self._batch_size_max = batch_size_max
        self._waiting: list[tuple[Deduction, asyncio.Future]] = []
        self._committing = False

    async def deduct(self, deduction: Deduction) -> DeductionResult:
        if self._pool is None:
            return DEDUCTED
        answer = asyncio.get_running_loop().create_future()
        self._waiting.append((deduction, answer))
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
                    results = await self._commit([deduction for deduction, _ in batch])
                except Exception as error:  # noqa: BLE001: every caller hears of it
                    for _, answer in batch:
                        answer.set_exception(error)
                    continue
                for (_, answer), result in zip(batch, results, strict=True):
                    answer.set_result(result)
        finally:
            self._committing = False

    async def _commit(self, deductions: list[Deduction]) -> list[DeductionResult]:
        async with self._pool.connection() as conn:
            cursor = await conn.execute(*_statement(deductions))
            rows = await cursor.fetchall()
        return [_deduction_result(row[1:]) for row in sorted(rows, key=lambda row: row[0])]


class AsyncCredits(credit_service_pb2_grpc.CreditServiceServicer):
    def __init__(self, lane: AsyncLane):
        self._lane = lane

    async def DeductCredits(self, request, context):
        checks = Checks()
        check_deduction(checks, request)
        checks.done()
        result = await self._lane.deduct(deduction_from(request))
        if result.outcome != "OK":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, result.outcome)
        return deduction_response(result)


async def serve(settings: Settings, *, canned: bool) -> None:
    async def configure(conn) -> None:
        set_json_dumps(orjson.dumps, conn)
        set_json_loads(orjson.loads, conn)

    pool = None
    if not canned:
        pool = AsyncConnectionPool(settings.database_url, min_size=2, max_size=4,
                                   kwargs=connection_options(settings), configure=configure,
                                   open=False)
        await pool.open(wait=True)
    server = grpc.aio.server(options=grpc_server_options(settings),
                             maximum_concurrent_rpcs=settings.worker_threads)
    health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)
    credit_service_pb2_grpc.add_CreditServiceServicer_to_server(
        AsyncCredits(AsyncLane(pool, batch_size_max=settings.group_commit_batch_size_max)), server)
    server.add_insecure_port(settings.listen_address)
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stopping.set)
    await server.start()
    await stopping.wait()
    await server.stop(grace=1)
    if pool is not None:
        await pool.close()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.asyncio_ledger_server")
    parser.add_argument("--canned", action="store_true", help="answer every deduction at once")
    arguments = parser.parse_args(argv)
    asyncio.run(serve(Settings.load(), canned=arguments.canned))


if __name__ == "__main__":
    main()
