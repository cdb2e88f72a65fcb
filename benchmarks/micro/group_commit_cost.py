"""The server's own CPU per DeductCredits through the servicer, the group
commit and the LaneStore, gRPC aside: callers on an event loop of this process
await CreditServicer.DeductCredits directly, on one hot allocation, as the
server's calls do.

    .venv/bin/python -m benchmarks.micro.group_commit_cost

For 1, 16 and 64 callers, three rounds each: calls/s, this process's CPU
per call (time.process_time(), the callers' requests included: about
10 us), and the mean batch size. Next to `python -m
benchmarks.profile --canned-ledger` (the real server, deductions answered
at once), it says how much of a hot deduction's server CPU is the ledger's
path and how much running it in the server adds (benchmarks/README.md).
"""

import asyncio
import os
import time

import uvloop

from benchmarks.micro.ledger import credit_servicer, hot_allocation_database
from orgbilling.v1 import credit_service_pb2 as pb
from orgbilling.server.database import open_lane_pool, open_pool
from orgbilling.server.group_commit import GroupCommitter
from orgbilling.server.servicers.credit import CreditServicer
from orgbilling.server.settings import Settings
from orgbilling.server.store import LaneStore, Store
from tests.postgres import Postgres

CALLERS = (1, 16, 64)
ROUND_S = 3.0
ROUNDS = 3


async def deduct_until(servicer: CreditServicer, deadline: float, counts: list[int], index: int) -> None:
    while time.perf_counter() < deadline:
        await servicer.DeductCredits(pb.DeductCreditsRequest(
            org_id="o", user_id="u", amount_millicredits=1, service_type="llm",
            service_name="bench", idempotency_key=os.urandom(16).hex(),
            metadata={"model": "bench-model", "tokens": "100"}), None)
        counts[index] += 1


async def callers(servicer: CreditServicer, count: int, counts: list[int]) -> None:
    deadline = time.perf_counter() + ROUND_S
    await asyncio.gather(*(deduct_until(servicer, deadline, counts, i) for i in range(count)))


def main() -> None:
    postgres = Postgres()
    try:
        url = hot_allocation_database(postgres, "group_commit_cost")
        uvloop.run(rounds(Settings(database_url=url), url))  # the server's loop
    finally:
        postgres.close()


async def rounds(settings: Settings, url: str) -> None:
    pool = open_pool(settings, url)  # the servicer's own (DeductCreditsBatch): unused here
    lane_pool = await open_lane_pool(settings, url)
    await lane_pool.wait()
    store = Store(pool, pool_wait_timeout_ms=settings.pool_wait_timeout_ms,
                  statement_timeout_ms=settings.statement_timeout_ms)
    lane_store = LaneStore(lane_pool, pool_wait_timeout_ms=settings.pool_wait_timeout_ms)
    batch_sizes: list[int] = []
    committer = GroupCommitter(
        lane_store.commit_group, lanes=settings.group_commit_lanes,
        batch_size_max=settings.group_commit_batch_size_max,
        queue_length_max=settings.group_commit_queue_length_max, on_batch=batch_sizes.append)
    servicer = credit_servicer(settings, store, committer=committer)
    for _ in range(ROUNDS):
        for caller_count in CALLERS:
            counts = [0] * caller_count
            batch_sizes.clear()
            cpu_before, wall_before = time.process_time(), time.perf_counter()
            await callers(servicer, caller_count, counts)
            cpu_s, wall_s = time.process_time() - cpu_before, time.perf_counter() - wall_before
            calls = sum(counts)
            print(f"{caller_count:>2} callers: {calls / wall_s:7,.0f} calls/s, "
                  f"{cpu_s / calls * 1e6:5.1f} us of CPU a call, "
                  f"batches of {calls / max(1, len(batch_sizes)):.1f}", flush=True)
    await lane_pool.close()
    pool.close()


if __name__ == "__main__":
    main()
