"""Admission control: at most `calls_max` calls in progress (setting
concurrent_rpcs_max); past it, RESOURCE_EXHAUSTED SERVER_BUSY with a
RetryInfo at once, never a queue. Health is exempt: a busy replica is not a
dead one, and its probe must say so.

The worker pool is sized for blocked calls (setting worker_threads, far
above this limit, which is also gRPC's own cap): a thread waiting for a
slow client's message costs memory, not CPU, while this limit bounds the
calls actually working."""

import threading
from collections.abc import Callable

from orgbilling.server.errors import server_busy
from orgbilling.server.interceptors import Call, Interceptor, Method

HEALTH_SERVICE = "grpc.health.v1.Health"


class Slots:
    """At most `limit` held at once; past it, SERVER_BUSY at once (never a
    queue), naming `setting` and saying `busy_message`."""

    def __init__(self, *, limit: int, setting: str, busy_message: str, retry_after_ms: int):
        self._limit = limit
        self._setting = setting
        self._busy_message = busy_message
        self._retry_after_s = retry_after_ms / 1000
        self._lock = threading.Lock()
        self._held = 0

    def take(self) -> Callable[[], None]:
        """Takes a slot; returns the function that gives it back."""
        with self._lock:
            if self._held >= self._limit:
                raise server_busy(self._busy_message, limit=self._setting,
                                  retry_after_s=self._retry_after_s)
            self._held += 1
        return self._give_back

    def _give_back(self) -> None:
        with self._lock:
            self._held -= 1


class AdmissionInterceptor(Interceptor):
    def __init__(self, *, calls_max: int, retry_after_ms: int):
        self._slots = Slots(
            limit=calls_max, setting="concurrent_rpcs_max", retry_after_ms=retry_after_ms,
            busy_message=f"the server has {calls_max} calls in progress; retry shortly")

    def applies_to(self, method: Method) -> bool:
        return method.service != HEALTH_SERVICE

    def intercept(self, call: Call):
        return self._slots.take()
