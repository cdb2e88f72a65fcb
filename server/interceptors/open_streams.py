"""Streams of the open services (reflection, health Watch) are limited in
number (streams_max at once, across them) and in lifetime (lifetime_ms,
after which the stream ends normally at its next message; a silent one is
cut when its connection reaches its age, setting connection_age_max_ms).
Anyone may open them, so without a limit a few callers could hold every
worker thread."""

import threading
import time

from orgbilling.server.errors import server_busy
from orgbilling.server.interceptors import Call, Interceptor, Method


class OpenStreamsInterceptor(Interceptor):
    def __init__(self, *, open_services: frozenset[str], streams_max: int, lifetime_ms: int,
                 retry_after_ms: int):
        self._open_services = open_services
        self._streams_max = streams_max
        self._lifetime_s = lifetime_ms / 1000
        self._retry_after_s = retry_after_ms / 1000
        self._lock = threading.Lock()
        self._open = 0

    def applies_to(self, method: Method) -> bool:
        return method.service in self._open_services and (
            method.request_streaming or method.response_streaming)

    def intercept(self, call: Call):
        with self._lock:
            if self._open >= self._streams_max:
                raise server_busy(
                    f"{self._streams_max} streams of the open services are open already",
                    limit="open_service_streams_max", retry_after_s=self._retry_after_s,
                )
            self._open += 1
        call.ends_by = time.monotonic() + self._lifetime_s
        return self._ended

    def _ended(self) -> None:
        with self._lock:
            self._open -= 1
