"""Admission control: at most `calls_max` calls in progress (setting
concurrent_rpcs_max); past it, RESOURCE_EXHAUSTED SERVER_BUSY with a
RetryInfo at once, never a queue. Health is exempt: a busy replica is not a
dead one, and its probe must say so.

The worker pool is sized for blocked calls (setting worker_threads, far
above this limit, which is also gRPC's own cap): a thread waiting for a
slow client's message costs memory, not CPU, while this limit bounds the
calls actually working."""

import threading

from orgbilling.server.errors import server_busy
from orgbilling.server.interceptors import Call, Interceptor, Method

HEALTH_SERVICE = "grpc.health.v1.Health"


class AdmissionInterceptor(Interceptor):
    def __init__(self, *, calls_max: int, retry_after_ms: int):
        self._calls_max = calls_max
        self._retry_after_s = retry_after_ms / 1000
        self._lock = threading.Lock()
        self._running = 0

    def applies_to(self, method: Method) -> bool:
        return method.service != HEALTH_SERVICE

    @property
    def running(self) -> int:
        return self._running

    def intercept(self, call: Call):
        with self._lock:
            if self._running >= self._calls_max:
                raise server_busy(
                    f"the server has {self._calls_max} calls in progress; retry shortly",
                    limit="concurrent_rpcs_max", retry_after_s=self._retry_after_s,
                )
            self._running += 1
        return self._ended

    def _ended(self) -> None:
        with self._lock:
            self._running -= 1
