"""The probe port (probe_listen_address) answers health Check on threads of
its own: with every worker of the main port held by requests whose message
never comes, the main port refuses even health, the probe port answers."""

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
WORKERS = 4


def check(address: str) -> grpc.StatusCode | int:
    with grpc.insecure_channel(address) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1).status
        except grpc.RpcError as error:
            return error.code()


def wait_for(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_probes_answer_on_their_own_port_while_the_main_port_is_full(start_server, database_url):
    server = start_server(database_url, probe_listen_address="127.0.0.1:0", worker_threads=WORKERS,
                          concurrent_rpcs_max=2, open_service_streams_max=1)
    main, probe = f"127.0.0.1:{server.port}", f"127.0.0.1:{server.probe_port}"
    wait_for(lambda: check(probe) == SERVING)
    release = threading.Event()
    channel = grpc.insecure_channel(main)
    stalled_method = channel.stream_unary("/orgbilling.v1.CreditService/DeductCredits",
                                          request_serializer=None, response_deserializer=None)

    def never_a_message():
        release.wait(30)
        return
        yield

    stalled = [stalled_method.future(never_a_message(), timeout=30) for _ in range(WORKERS)]
    try:
        # Every worker waits for a message: gRPC's own cap refuses the rest, health included.
        def main_port_full() -> bool:
            # A health check that takes a slot while the stalled calls arrive
            # (a loaded machine) gets one of them refused: start it again.
            for n, call in enumerate(stalled):
                if call.done():
                    stalled[n] = stalled_method.future(never_a_message(), timeout=30)
            return check(main) == grpc.StatusCode.RESOURCE_EXHAUSTED

        wait_for(main_port_full)
        assert check(probe) == SERVING
        with grpc.insecure_channel(probe) as probe_channel:
            with pytest.raises(grpc.RpcError) as watch:
                next(health_pb2_grpc.HealthStub(probe_channel).Watch(health_pb2.HealthCheckRequest(),
                                                                     timeout=1))
        assert watch.value.code() == grpc.StatusCode.UNIMPLEMENTED  # Check only: no thread held
    finally:
        for call in stalled:
            call.cancel()
        release.set()
        channel.close()
    wait_for(lambda: check(main) == SERVING)
