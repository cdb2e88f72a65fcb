"""The standard health service, SERVING only while the database answers.

`HealthServicer` replaces grpc_health's servicer, which deadlocked (it held its
lock while sending the first Watch reply, and gRPC's event thread waited for
that lock to close a cancelled stream) and kept an entry for every service
name ever watched. Here the set of names is fixed when the server is built;
Check and Watch are coroutines on the server's event loop (server.app): a
Watch keeps nothing in the servicer, holds no thread and no lock while it
waits, ends when its call does (gRPC cancels it), and ends by itself after a
set lifetime. The probe port's server, a threaded one, asks the same
servicer's statuses (probe_server)."""

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthServicer(health_pb2_grpc.HealthServicer):
    """grpc.health.v1.Health over a fixed set of names: "" (the server as a
    whole) and each service name, every one NOT_SERVING until set.

    All state is one dict of statuses (its keys never change), set from
    any thread under a lock held for a few instructions, and one Event the
    Watches wait on, set and replaced on the event loop on every change."""

    def __init__(self, *, service_names: list[str], watch_lifetime_ms: int,
                 clock: Callable[[], float] = time.monotonic):
        if watch_lifetime_ms <= 0:
            raise ValueError(f"watch_lifetime_ms must be > 0, not {watch_lifetime_ms}")
        self._statuses: dict[str, int] = dict.fromkeys(["", *service_names], NOT_SERVING)
        self._watch_lifetime_s = watch_lifetime_ms / 1000
        self._clock = clock
        self._lock = threading.Lock()
        self._shutting_down = False
        # The event loop the Watches run on, known from the first one.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None

    @property
    def names(self) -> frozenset[str]:
        """The names this servicer answers for ("" is the whole server)."""
        return frozenset(self._statuses)

    def status(self, service: str) -> int | None:
        """The status of a known name; None for a name not in the set."""
        with self._lock:
            return self._statuses.get(service)

    def set(self, service: str, status: int) -> None:
        """Sets one name's status. A name not in the set is a programming
        error (KeyError); after enter_graceful_shutdown() this does nothing."""
        if service not in self._statuses:
            raise KeyError(f"unknown health service name {service!r}")
        self._update({service: status})

    def set_all(self, status: int) -> None:
        """Sets every name's status at once; does nothing once shutting down."""
        self._update(dict.fromkeys(self._statuses, status))

    def enter_graceful_shutdown(self) -> None:
        """Sets every name NOT_SERVING for good: later set() and set_all()
        calls are ignored. Watchers are sent NOT_SERVING."""
        with self._lock:
            self._shutting_down = True
            self._apply_locked(dict.fromkeys(self._statuses, NOT_SERVING))

    def _update(self, statuses: dict[str, int]) -> None:
        for status in statuses.values():
            if status not in (SERVING, NOT_SERVING):
                raise ValueError(f"a health status is SERVING or NOT_SERVING, not {status!r}")
        with self._lock:
            if not self._shutting_down:
                self._apply_locked(statuses)

    def _apply_locked(self, statuses: dict[str, int]) -> None:
        changed = False
        for service, status in statuses.items():
            if self._statuses[service] != status:
                self._statuses[service] = status
                changed = True
        if changed and self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake_watchers)

    def _wake_watchers(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def Check(self, request, context):
        status = self.status(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request, context) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """The name's status now (SERVICE_UNKNOWN for a name not in the set,
        which never changes), then each change, until the call ends or the
        Watch has lived watch_lifetime_ms; then it returns OK, and the client
        watches again. Nothing about the Watch is stored in the servicer."""
        if self._loop is None:
            self._changed = asyncio.Event()
            self._loop = asyncio.get_running_loop()
        deadline = self._clock() + self._watch_lifetime_s
        sent = None
        while True:
            changed = self._changed  # before the status: a change after it sets this one
            with self._lock:
                status = self._statuses.get(request.service, SERVICE_UNKNOWN)
            if status != sent:
                sent = status
                yield health_pb2.HealthCheckResponse(status=status)
            remaining = deadline - self._clock()
            if remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)


class DatabaseHealthMonitor:
    """Asks the database every interval whether it answers and sets every
    service's health to match. Runs in its own thread, off the request path.

    `ping(timeout_s)` raises unless each of the server's pools hands out a
    connection within timeout_s that answers; `replace_dead_connections()`
    has each pool test its idle connections and replace the dead ones."""

    def __init__(self, *, ping: Callable[[float], None], replace_dead_connections: Callable[[], None],
                 servicer: HealthServicer, service_names: list[str], interval_ms: int):
        self._ping_database = ping
        self._replace_dead_connections = replace_dead_connections
        self._servicer = servicer
        self._names = ["", *service_names]
        self._interval_s = interval_ms / 1000
        self._stopping = threading.Event()
        self._healthy: bool | None = None
        self._thread = threading.Thread(target=self._run, name="health-monitor", daemon=True)
        # The database work runs here, not in the monitor: a stalled link
        # neither answers nor fails, and would freeze the monitor at SERVING.
        self._database_worker = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="health-ping")
        self._ping: concurrent.futures.Future | None = None

    @property
    def healthy(self) -> bool:
        """Whether the last check found the database answering."""
        return bool(self._healthy)

    def start(self) -> None:
        self._set(False)
        self._thread.start()

    def stop(self) -> None:
        """Reports NOT_SERVING for good: the server is shutting down."""
        self._stopping.set()
        self._servicer.enter_graceful_shutdown()
        self._database_worker.shutdown(wait=False, cancel_futures=True)

    def check_once(self) -> bool:
        """Whether the database answered a ping in time. A ping still
        hanging from an earlier check is waited for, not sent again.

        An error (refused, pool exhausted) counts at once. Silence counts only
        after a few intervals: on a busy machine a ping may wait its turn for
        a CPU, and a replica that flaps to NOT_SERVING under load sheds the
        load onto the others."""
        pool_wait_s = max(self._interval_s, 0.5)
        answer_wait_s = max(2.0, 3 * self._interval_s)
        try:
            if self._ping is None or self._ping.done():
                self._ping = self._database_worker.submit(self._ping_database, pool_wait_s)
            self._ping.result(timeout=answer_wait_s)
            return True
        except RuntimeError:  # the worker is shut down: the server is stopping
            return False
        except concurrent.futures.TimeoutError:
            error = f"no answer within {answer_wait_s} s"
        except Exception as failure:  # noqa: BLE001: any failure means not serving
            error = failure
        if self._healthy is not False:
            log.warning("database does not answer: %s", error)
        return False

    def _run(self) -> None:
        while not self._stopping.is_set():
            healthy = self.check_once()
            if healthy and self._healthy is False:
                # Connections opened before an outage are dead: replace them now
                # rather than fail one call on each.
                with contextlib.suppress(RuntimeError):  # stopping
                    self._database_worker.submit(self._replace_dead_connections)
                log.info("database answers: SERVING")
            self._set(healthy)
            self._stopping.wait(self._interval_s)

    def _set(self, healthy: bool) -> None:
        if self._stopping.is_set():
            return
        self._healthy = healthy
        status = SERVING if healthy else NOT_SERVING
        for name in self._names:
            self._servicer.set(name, status)


def probe_server(servicer: HealthServicer, *, address: str, threads: int) -> tuple[grpc.Server, int]:
    """A small server of its own for orchestrators' probes: health Check
    only (no Watch, which would hold one of its few threads), no
    interceptors, its own threads, so that a probe never waits behind the
    main server's calls, whatever they are. Returns it, not started, and
    its port (0 if it could not listen)."""
    def check(request, context):
        status = servicer.status(request.service)
        if status is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return health_pb2.HealthCheckResponse(status=status)

    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="probe"),
                         maximum_concurrent_rpcs=threads)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health",
        {"Check": grpc.unary_unary_rpc_method_handler(
            check,
            request_deserializer=health_pb2.HealthCheckRequest.FromString,
            response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
        )},
    ),))
    return server, server.add_insecure_port(address)
