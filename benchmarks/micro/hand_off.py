"""What a hand-off from the event loop to a thread costs: a round trip
there and back, on uvloop, as a lane's committer made one per batch until
the batches ran on the loop (benchmarks/README.md, "The lanes' batches on
the event loop, shipped"), and as a call served in the thread pool still
makes. Two ways: `loop.run_in_executor` (what the lanes did) and a thread
of its own fed by a `queue.SimpleQueue`, answering with
`loop.call_soon_threadsafe` (the cheapest hand-off without an async
database driver).

    .venv/bin/python -m benchmarks.micro.hand_off

Three rounds of 20,000 round trips each way: wall and CPU (this process)
microseconds a round trip, the thread's work being nothing.
"""

import asyncio
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import uvloop

ROUND_TRIPS = 20_000
ROUNDS = 3


def nothing(x):
    return x


def per_round_trip(started: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = started
    return ((time.perf_counter() - wall) / ROUND_TRIPS * 1e6,
            (time.process_time() - cpu) / ROUND_TRIPS * 1e6)


async def through_the_executor(threads: ThreadPoolExecutor) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    started = time.perf_counter(), time.process_time()
    for i in range(ROUND_TRIPS):
        await loop.run_in_executor(threads, nothing, i)
    return per_round_trip(started)


async def through_a_queue() -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    work: queue.SimpleQueue = queue.SimpleQueue()

    def serve():
        while (item := work.get()) is not None:
            answer, x = item
            loop.call_soon_threadsafe(answer.set_result, nothing(x))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    started = time.perf_counter(), time.process_time()
    for i in range(ROUND_TRIPS):
        answer = loop.create_future()
        work.put((answer, i))
        await answer
    measured = per_round_trip(started)
    work.put(None)
    thread.join()
    return measured


async def main() -> None:
    with ThreadPoolExecutor(max_workers=1) as threads:
        for round_ in range(1, ROUNDS + 1):
            for name, measure in (("run_in_executor", through_the_executor(threads)),
                                  ("queue + call_soon_threadsafe", through_a_queue())):
                wall_us, cpu_us = await measure
                print(f"round {round_}  {name:30} wall {wall_us:6.1f} us  cpu {cpu_us:6.1f} us")


if __name__ == "__main__":
    uvloop.run(main())
