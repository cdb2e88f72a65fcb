"""The standard health service, SERVING only while the database answers."""

import concurrent.futures
import contextlib
import logging
import threading

from grpc_health.v1 import health, health_pb2

from server.store import Store

log = logging.getLogger(__name__)


class DatabaseHealthMonitor:
    """Asks the database every interval whether it answers and sets every
    service's health to match. Runs in its own thread, off the request path."""

    def __init__(self, store: Store, servicer: health.HealthServicer, service_names: list[str],
                 interval_ms: int):
        self._store = store
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
                self._ping = self._database_worker.submit(self._store.ping, timeout_s=pool_wait_s)
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
                    self._database_worker.submit(self._store.pool.check)
                log.info("database answers: SERVING")
            self._set(healthy)
            self._stopping.wait(self._interval_s)

    def _set(self, healthy: bool) -> None:
        if self._stopping.is_set():
            return
        self._healthy = healthy
        status = (
            health_pb2.HealthCheckResponse.SERVING if healthy
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in self._names:
            self._servicer.set(name, status)
