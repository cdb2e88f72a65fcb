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
import functools

import grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from psycopg_pool import AsyncConnectionPool

from orgbilling.v1 import credit_service_pb2_grpc
from orgbilling.server.database import connection_options, use_orjson
from orgbilling.server.servicers.credit import check_deduction, deduction_from, deduction_response
from orgbilling.server.settings import Settings
from orgbilling.server.store import Deduction, DeductionResult, _deduction_result, _statement
from orgbilling.server.validation import Checks
from benchmarks.asyncio_serving import AsyncLane, new_aio_server, serve_until_signalled
from benchmarks.canned_ledger_server import DEDUCTED


async def commit_deductions(pool: AsyncConnectionPool,
                            deductions: list[Deduction]) -> list[DeductionResult]:
    """Store.commit_group's statements for deductions, on an async connection."""
    async with pool.connection() as conn:
        cursor = await conn.execute(*_statement(deductions))
        rows = await cursor.fetchall()
    return [_deduction_result(row[1:]) for row in sorted(rows, key=lambda row: row[0])]


class AsyncCredits(credit_service_pb2_grpc.CreditServiceServicer):
    """DeductCredits through lane, or answered at once without one."""

    def __init__(self, lane: AsyncLane | None):
        self._lane = lane

    async def DeductCredits(self, request, context):
        checks = Checks()
        check_deduction(checks, request)
        checks.done()
        deduction = deduction_from(request)
        result = DEDUCTED if self._lane is None else await self._lane.submit(deduction)
        if result.outcome != "OK":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, result.outcome)
        return deduction_response(result)


async def serve(settings: Settings, *, canned: bool) -> None:
    async def configure(conn) -> None:
        use_orjson(conn)

    pool = lane = None
    if not canned:
        pool = AsyncConnectionPool(settings.database_url, min_size=2, max_size=4,
                                   kwargs=connection_options(settings), configure=configure,
                                   open=False)
        await pool.open(wait=True)
        lane = AsyncLane(functools.partial(commit_deductions, pool),
                         batch_size_max=settings.group_commit_batch_size_max)
    server = new_aio_server(settings)
    health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)
    credit_service_pb2_grpc.add_CreditServiceServicer_to_server(AsyncCredits(lane), server)
    await serve_until_signalled(server, settings.listen_address)
    if pool is not None:
        await pool.close()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.asyncio_ledger_server")
    parser.add_argument("--canned", action="store_true", help="answer every deduction at once")
    arguments = parser.parse_args(argv)
    asyncio.run(serve(Settings.load(), canned=arguments.canned))


if __name__ == "__main__":
    main()
