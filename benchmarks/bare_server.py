"""Baseline A0: a bare gRPC server, the floor a no-op call can reach in
Python on this machine. It serves the same health service as `orgbilling
serve` (server.health.HealthServicer: Check on the event loop), built
by the same function (server.app.new_grpc_server: grpc.aio, the same
options), and nothing else: no interceptors, no database. Our
no-op over it is what our interceptor chain costs.

    python -m benchmarks.bare_server    # listens on ORGBILLING_LISTEN_ADDRESS until SIGTERM

With --batch-ms, each health Check first waits in a GroupCommitter
(server.group_commit) whose batches each await that long on the loop, as a
deduction waits for its batch while the batch awaits the database. Next to the bare no-op (`python -m
benchmarks.profile --bare --bare-batch-ms 0.3`), that is what waiting for a
batch costs a call in the serving layer, with no database competing for
the cores (benchmarks/README.md).
"""

import argparse
import asyncio
import signal
from types import SimpleNamespace

import uvloop
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orgbilling.server.app import new_grpc_server
from orgbilling.server.group_commit import GroupCommitter
from orgbilling.server.health import HealthServicer
from orgbilling.server.settings import Settings


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bare_server")
    parser.add_argument("--batch-ms", type=float, default=0.0,
                        help="each Check waits in a group commit whose batches take this long"
                             " (0: it does not wait)")
    arguments = parser.parse_args(argv)
    # On uvloop's loop, as the server's (server.event_loop).
    uvloop.run(serve(Settings.load(), batch_s=arguments.batch_ms / 1000))


async def serve(settings: Settings, *, batch_s: float) -> None:
    health = HealthServicer(service_names=[], watch_lifetime_ms=settings.open_service_stream_lifetime_ms)
    health.set_all(health_pb2.HealthCheckResponse.SERVING)
    committer = None
    if batch_s > 0:
        async def commit(items):
            await asyncio.sleep(batch_s)
            return [None] * len(items)

        committer = GroupCommitter(commit,
                                   lanes=settings.group_commit_lanes,
                                   batch_size_max=settings.group_commit_batch_size_max,
                                   queue_length_max=settings.group_commit_queue_length_max)
        check = health.Check
        item = SimpleNamespace(org_id="bench")  # one lane, as a hot pool

        async def check_after_batch(request, context):
            await committer.submit(item)
            return await check(request, context)
        health.Check = check_after_batch
    server = new_grpc_server(settings)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.add_insecure_port(settings.listen_address)
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stopping.set)
    await server.start()
    await stopping.wait()
    await server.stop(grace=1)


if __name__ == "__main__":
    main()
