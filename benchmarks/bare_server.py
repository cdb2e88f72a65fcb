"""Baseline A0: a bare grpcio server, the floor a no-op call can reach in
Python on this machine. It serves the same health service as `orgbilling
serve`, built by the same function (server.app.new_grpc_server: the same
thread pool and options), and nothing else: no interceptors, no database.
Our no-op over it is what our interceptor chain costs.

    python -m benchmarks.bare_server    # listens on ORGBILLING_LISTEN_ADDRESS until SIGTERM

With --pause-ms, each health Check first waits that long, as a call waits
for the database; with --group-commit too, it waits in a GroupCommitter
(server.group_commit) whose batches take that long, as a deduction waits
for its batch. The two side by side (`python -m benchmarks.profile --bare
--bare-pause-ms 0.3 [--bare-group-commit]`) give what the hand-off between
a batch's leader and its callers costs in a real grpcio server, with no
database competing for the cores (benchmarks/README.md).

With --asyncio, the same on a grpc.aio server (one event loop, no thread
pool; its batches hand off through futures): what the serving layer and
the hand-off would cost if the server were rewritten on asyncio.
"""

import argparse
import asyncio
import signal
import threading
import time
from types import SimpleNamespace

from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from orgbilling.server.app import new_grpc_server
from orgbilling.server.group_commit import GroupCommitter
from orgbilling.server.health import HealthServicer
from orgbilling.server.settings import Settings
from benchmarks.asyncio_serving import AsyncLane, new_aio_server, serve_until_signalled


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bare_server")
    parser.add_argument("--pause-ms", type=float, default=0.0,
                        help="each Check waits this long first (0: not at all)")
    parser.add_argument("--group-commit", action="store_true",
                        help="and waits it as one batch of a GroupCommitter shared by all calls")
    parser.add_argument("--asyncio", action="store_true",
                        help="a grpc.aio server (one event loop, no thread pool) instead;"
                             " its batches go through an AsyncLane")
    arguments = parser.parse_args(argv)
    settings = Settings.load()
    if arguments.asyncio:
        asyncio.run(serve_asyncio(settings, pause_s=arguments.pause_ms / 1000,
                                  group_commit=arguments.group_commit))
        return
    health = HealthServicer(service_names=[], watch_lifetime_ms=settings.open_service_stream_lifetime_ms)
    health.set_all(health_pb2.HealthCheckResponse.SERVING)
    if arguments.pause_ms > 0:
        health.Check = paused(health.Check, pause_s=arguments.pause_ms / 1000,
                              group_commit=arguments.group_commit, settings=settings)
    server = new_grpc_server(settings, interceptors=[])
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.add_insecure_port(settings.listen_address)
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    server.start()
    stopping.wait()
    server.stop(grace=1).wait()


def paused(check, *, pause_s: float, group_commit: bool, settings: Settings):
    """check, after a wait of pause_s: its own, or its batch's (in a
    GroupCommitter set as the server's)."""
    if not group_commit:
        def check_after_pause(request, context):
            time.sleep(pause_s)
            return check(request, context)
        return check_after_pause

    def commit_batch(items: list) -> list:
        time.sleep(pause_s)
        return [None] * len(items)

    committer = GroupCommitter(commit_batch, lanes=settings.group_commit_lanes,
                               batch_size_max=settings.group_commit_batch_size_max,
                               queue_length_max=settings.group_commit_queue_length_max)
    item = SimpleNamespace(org_id="bench")  # one lane, as a hot pool

    def check_after_batch(request, context):
        committer.submit(item)
        return check(request, context)
    return check_after_batch


async def serve_asyncio(settings: Settings, *, pause_s: float, group_commit: bool) -> None:
    """The same health service on a grpc.aio server with the same options:
    what the serving layer would cost without gRPC's thread pool."""
    health = health_aio.HealthServicer()
    if pause_s > 0:
        async def commit_batch(items: list) -> list:
            await asyncio.sleep(pause_s)
            return [None] * len(items)

        check = health.Check
        lane = AsyncLane(commit_batch, batch_size_max=settings.group_commit_batch_size_max)

        async def check_after_pause(request, context):
            await (lane.submit(None) if group_commit else asyncio.sleep(pause_s))
            return await check(request, context)
        health.Check = check_after_pause
    server = new_aio_server(settings)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    await serve_until_signalled(server, settings.listen_address)


if __name__ == "__main__":
    main()
