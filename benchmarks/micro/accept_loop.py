"""What grpc.aio's accept loop pays for each call it accepts, by the number
of requests it keeps open in gRPC's core: one for each registered method,
and one for all generic handlers (server.interceptors.ChainedServices;
benchmarks/README.md, "The accept loop's open requests").

For each accepted call, the loop (grpc's `AioServer._server_main_loop`)
awaits `asyncio.wait(open_requests, return_when=FIRST_COMPLETED)`, then
replaces the request that completed with a new task. This does the same
on uvloop with futures in place of the core's requests: one of them
completed a round, the others pending.

    .venv/bin/python -m benchmarks.micro.accept_loop

Three rounds of 20,000 accepts at each number of open requests: CPU (this
process) microseconds an accept.
"""

import asyncio
import time

import uvloop

ACCEPTS = 20_000
ROUNDS = 3
# 1: every service generic; 4: health alone registered (the bare server,
# baseline A0); 7: the methods of server.app's FREQUENT_METHODS registered,
# the rest generic (ours); 13: the credit service and health registered (the
# seventh session's); 36: every method registered (grpc's generated code).
OPEN_REQUESTS = (1, 4, 7, 13, 36)


async def accepts(open_requests: int) -> float:
    loop = asyncio.get_running_loop()
    pending = {loop.create_future(): n for n in range(open_requests)}
    started = time.process_time()
    for _ in range(ACCEPTS):
        arrived = next(iter(pending))
        loop.call_soon(arrived.set_result, None)
        done, _ = await asyncio.wait(pending.keys(), return_when=asyncio.FIRST_COMPLETED)
        for completed in done:
            pending[loop.create_future()] = pending.pop(completed)
    return (time.process_time() - started) / ACCEPTS * 1e6


async def main() -> None:
    for round_ in range(1, ROUNDS + 1):
        costs = [f"{n:2} open: {await accepts(n):5.1f} us" for n in OPEN_REQUESTS]
        print(f"round {round_}  " + "  ".join(costs))


if __name__ == "__main__":
    uvloop.run(main())
