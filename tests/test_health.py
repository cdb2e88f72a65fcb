"""The health servicer (server/health.py) against a real grpc.aio server on
loopback, as the main server serves it: no deadlock under Watch-and-cancel,
no memory kept per watched name, Watch streams that end, and graceful
shutdown. No database is needed; the probe port's Check is tested in
test_probe_port.py."""

import asyncio
import contextlib
import gc
import os
import subprocess
import sys
import threading
import time
import tracemalloc

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orgbilling.server.event_loop import EventLoopThread
from orgbilling.server.health import NOT_SERVING, SERVICE_UNKNOWN, SERVING, HealthServicer

NAMES = ["orgbilling.v1.CreditService", "orgbilling.v1.OrgBillingService"]
MIB = 1024 * 1024

pytestmark = pytest.mark.timeout(60)


def new_servicer(**overrides) -> HealthServicer:
    options = {"service_names": NAMES, "watch_lifetime_ms": 60_000, **overrides}
    return HealthServicer(**options)


@contextlib.contextmanager
def serving(servicer: HealthServicer, calls_max: int | None = None):
    """A grpc.aio server on 127.0.0.1 with only this servicer, taking
    calls_max calls at once (None: any number); yields (server, address)."""
    server = LoopServer(servicer, calls_max)
    assert server.port != 0
    try:
        yield server, f"127.0.0.1:{server.port}"
    finally:
        server.stop(0).wait(5)
        server.close()


class LoopServer:
    """A grpc.aio server on a loop of its own, stopped as a grpc.server is."""

    def __init__(self, servicer: HealthServicer, calls_max: int | None):
        self._event_loop = EventLoopThread(name="health-test")

        def new_server():
            server = grpc.aio.server(maximum_concurrent_rpcs=calls_max)
            health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
            return server, server.add_insecure_port("127.0.0.1:0")

        self._server, self.port = self._event_loop.call(new_server)
        self._event_loop.run(self._server.start())
        self._stopped = None

    def stop(self, grace: float | None) -> threading.Event:
        if self._stopped is None:
            self._stopped = threading.Event()
            asyncio.run_coroutine_threadsafe(self._server.stop(grace), self._event_loop.loop) \
                .add_done_callback(lambda _: self._stopped.set())
        return self._stopped

    def close(self) -> None:
        self._event_loop.close()


def request(service: str = "") -> health_pb2.HealthCheckRequest:
    return health_pb2.HealthCheckRequest(service=service)


def assert_check_answers_quickly(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        started = time.monotonic()
        status = health_pb2_grpc.HealthStub(channel).Check(request(), timeout=1).status
        assert status in (SERVING, NOT_SERVING)
        assert time.monotonic() - started < 1


def assert_stops_quickly(server: grpc.Server) -> None:
    assert server.stop(1).wait(5), "the server did not stop within 5 s"


def watch_and_cancel_loop(address: str, seconds: float, name_of, read_first: bool) -> int:
    """Watches and cancels at once, over and over, on its own channel;
    returns how many Watches it made."""
    stop_at = time.monotonic() + seconds
    made = 0
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < stop_at:
            call = stub.Watch(request(name_of(made)), timeout=5)
            if read_first and made % 2:
                with contextlib.suppress(grpc.RpcError, StopIteration):
                    next(call)
            call.cancel()
            made += 1
    return made


def run_threads(targets) -> list:
    results = [None] * len(targets)
    errors = []

    def run(index, target):
        try:
            results[index] = target()
        except BaseException as failure:  # noqa: BLE001: reported below
            errors.append(failure)

    threads = [threading.Thread(target=run, args=(i, t), daemon=True) for i, t in enumerate(targets)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive(), "a client thread is stuck"
    assert not errors, errors
    return results


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_watch_and_cancel_from_four_threads_does_not_wedge_the_server():
    """Four threads looping Watch + immediate cancel for 5 s (while statuses
    change) leave a server that answers Check within 1 s and stops within 5 s."""
    servicer = new_servicer()
    with serving(servicer) as (server, address):
        toggling = threading.Event()

        def toggle():
            flips = 0
            while not toggling.is_set():
                servicer.set_all(SERVING if flips % 2 else NOT_SERVING)
                flips += 1
                time.sleep(0.001)
            return flips

        toggler = threading.Thread(target=toggle, daemon=True)
        toggler.start()
        names = ["", NAMES[0], "unknown.Service"]
        made = run_threads([
            lambda i=i: watch_and_cancel_loop(address, 5, lambda n: names[n % 3], read_first=i % 2 == 0)
            for i in range(4)
        ])
        toggling.set()
        toggler.join(5)
        assert sum(made) > 100, made
        assert_check_answers_quickly(address)
        assert_stops_quickly(server)


# The client loop of the 1 MB test runs in its own process, like the attack's:
# sharing this process's GIL with the server, it rarely hits the race at all.
ONE_MEGABYTE_CLIENT = """
import contextlib, random, sys, time
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
address, seconds = sys.argv[1], float(sys.argv[2])
stop_at = time.monotonic() + seconds
made = 0
with grpc.insecure_channel(address) as channel:
    stub = health_pb2_grpc.HealthStub(channel)
    while time.monotonic() < stop_at:
        name = f"{made:08d}".ljust(1 << 20, "x")
        call = stub.Watch(health_pb2.HealthCheckRequest(service=name), timeout=5)
        if made % 2:
            with contextlib.suppress(grpc.RpcError, StopIteration):
                next(call)
        else:
            time.sleep(random.random() * 0.004)
        call.cancel()
        made += 1
print(made)
"""


def test_watch_and_cancel_with_one_megabyte_names_does_not_wedge_the_server():
    """One client looping Watch + cancel with distinct 1 MB service names for
    4 s leaves a server that answers Check within 1 s and stops within 5 s."""
    servicer = new_servicer()
    with serving(servicer) as (server, address):
        client = subprocess.run(
            [sys.executable, "-c", ONE_MEGABYTE_CLIENT, address, "4"],
            capture_output=True, text=True, timeout=30, check=False,
        )
        assert client.returncode == 0, client.stderr[-3000:]
        assert int(client.stdout) > 10, client.stdout
        assert_check_answers_quickly(address)
        assert_stops_quickly(server)
    assert servicer.names == frozenset(["", *NAMES])


def test_watching_many_distinct_names_keeps_no_memory_per_name():
    """300 distinct 300 KB names, each watched then cancelled, leave no state
    in the servicer: its names are unchanged, Python memory retained after
    the watches stays under 8 MiB (the names alone are 88 MiB), and process
    RSS grows by under 24 MiB in all and under 12 MiB over the last 150 names
    (a leak would add 44 MiB there): memory does not grow with the names."""
    size = 300 * 1024
    servicer = new_servicer()
    with serving(servicer) as (server, address):
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            def watch_names(first: int, count: int) -> None:
                for n in range(first, first + count):
                    call = stub.Watch(request(f"{n:08d}".ljust(size, "y")), timeout=5)
                    assert next(call).status == SERVICE_UNKNOWN
                    call.cancel()

            watch_names(0, 20)  # warm up: channels, threads, allocator arenas
            time.sleep(0.3)
            gc.collect()
            rss_before = rss_bytes()
            tracemalloc.start()
            try:
                watch_names(1_000, 150)
                time.sleep(0.3)  # the cancelled Watches end
                gc.collect()
                rss_half = rss_bytes()
                watch_names(2_000, 150)
                time.sleep(0.3)
                gc.collect()
                retained, _peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            rss_after = rss_bytes()
            assert_check_answers_quickly(address)
    assert servicer.names == frozenset(["", *NAMES])
    assert len(servicer._statuses) == 3
    assert retained < 8 * MIB, f"{retained / MIB:.1f} MiB retained after 300 watched names"
    assert rss_after - rss_before < 24 * MIB, (
        f"RSS grew {(rss_after - rss_before) / MIB:.1f} MiB over 300 names")
    assert rss_after - rss_half < 12 * MIB, (
        f"RSS grew {(rss_after - rss_half) / MIB:.1f} MiB over the last 150 names")


def test_watch_sends_the_status_then_each_change_then_ends_after_its_lifetime():
    """A Watch gets SERVING at once, then NOT_SERVING when it is set, then
    ends OK by itself after watch_lifetime_ms (500 ms), not much later."""
    servicer = new_servicer(watch_lifetime_ms=500)
    servicer.set(NAMES[0], SERVING)
    with serving(servicer) as (_server, address):
        with grpc.insecure_channel(address) as channel:
            started = time.monotonic()
            call = health_pb2_grpc.HealthStub(channel).Watch(request(NAMES[0]), timeout=5)
            assert next(call).status == SERVING
            servicer.set(NAMES[1], NOT_SERVING)  # another name: nothing is sent
            servicer.set(NAMES[0], NOT_SERVING)
            assert next(call).status == NOT_SERVING
            with pytest.raises(StopIteration):
                next(call)
            lived = time.monotonic() - started
            assert call.code() == grpc.StatusCode.OK
            assert 0.45 <= lived < 1.5, lived


def test_watch_of_an_unknown_name_is_service_unknown_and_stores_nothing():
    """A Watch of a name not in the set gets SERVICE_UNKNOWN, then ends
    after its lifetime; the name is not added anywhere."""
    servicer = new_servicer(watch_lifetime_ms=300)
    with serving(servicer) as (_server, address):
        with grpc.insecure_channel(address) as channel:
            call = health_pb2_grpc.HealthStub(channel).Watch(request("no.Such"), timeout=5)
            assert [reply.status for reply in call] == [SERVICE_UNKNOWN]
            assert call.code() == grpc.StatusCode.OK
    assert servicer.names == frozenset(["", *NAMES])
    assert servicer.status("no.Such") is None


def test_cancelled_watches_end_with_their_calls():
    """On a server that takes 4 calls at once, 50 Watches that would live
    60 s, started and cancelled one after another, each get their first
    reply, and Check still answers within 1 s: every cancelled Watch ended."""
    servicer = new_servicer()
    with serving(servicer, calls_max=4) as (server, address):
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            started = time.monotonic()
            for _ in range(50):
                call = stub.Watch(request(""), timeout=3)
                assert next(call).status == NOT_SERVING
                call.cancel()
            assert time.monotonic() - started < 10
        assert_check_answers_quickly(address)
        assert_stops_quickly(server)


def test_check_of_an_unknown_name_is_not_found():
    """Check answers a known name's status and NOT_FOUND for any other name."""
    servicer = new_servicer()
    servicer.set("", SERVING)
    with serving(servicer) as (_server, address):
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            assert stub.Check(request(""), timeout=1).status == SERVING
            assert stub.Check(request(NAMES[0]), timeout=1).status == NOT_SERVING
            with pytest.raises(grpc.RpcError) as raised:
                stub.Check(request("no.Such"), timeout=1)
            assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert servicer.names == frozenset(["", *NAMES])
    with pytest.raises(KeyError):
        servicer.set("no.Such", SERVING)


def test_graceful_shutdown_is_not_serving_for_good():
    """After enter_graceful_shutdown every name is NOT_SERVING (open Watches
    are told so) and later set() / set_all() calls change nothing."""
    servicer = new_servicer()
    servicer.set_all(SERVING)
    with serving(servicer) as (_server, address):
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            call = stub.Watch(request(NAMES[1]), timeout=5)
            assert next(call).status == SERVING
            servicer.enter_graceful_shutdown()
            assert next(call).status == NOT_SERVING
            call.cancel()
            servicer.set("", SERVING)
            servicer.set_all(SERVING)
            for name in ["", *NAMES]:
                assert stub.Check(request(name), timeout=1).status == NOT_SERVING
