"""Baseline A0: a bare grpcio server, the floor a no-op call can reach in
Python on this machine. It serves the same health service as `orgbilling
serve`, built by the same function (server.app.new_grpc_server: the same
thread pool and options), and nothing else: no interceptors, no database.
Our no-op over it is what our interceptor chain costs.

    python -m benchmarks.bare_server    # listens on ORGBILLING_LISTEN_ADDRESS until SIGTERM
"""

import signal
import threading

from grpc_health.v1 import health_pb2, health_pb2_grpc

from orgbilling.server.app import new_grpc_server
from orgbilling.server.health import HealthServicer
from orgbilling.server.settings import Settings


def main() -> None:
    settings = Settings.load()
    health = HealthServicer(service_names=[], watch_lifetime_ms=settings.open_service_stream_lifetime_ms)
    health.set_all(health_pb2.HealthCheckResponse.SERVING)
    server = new_grpc_server(settings, interceptors=[])
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.add_insecure_port(settings.listen_address)
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    server.start()
    stopping.wait()
    server.stop(grace=1).wait()


if __name__ == "__main__":
    main()
