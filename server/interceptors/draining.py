"""Lets a stopping server finish what it started: once draining, new calls
get UNAVAILABLE SHUTTING_DOWN (retryable, nothing done) while calls already
running complete; `wait_quiet` returns when none is left and none has
arrived for a moment. Stopping the gRPC server any sooner would cancel the
calls still in its transport with CANCELLED, which a caller cannot tell from
a lost answer."""

import threading
import time

from orgbilling.server.errors import shutting_down
from orgbilling.server.interceptors import Call, Interceptor


class DrainingInterceptor(Interceptor):
    def __init__(self):
        self._draining = False
        self._running = 0
        self._last_arrival = time.monotonic()
        self._idle = threading.Condition()

    def begin_draining(self) -> None:
        with self._idle:
            self._draining = True

    def wait_quiet(self, quiet_s: float, timeout_s: float) -> bool:
        """Waits until no call runs and none arrived for quiet_s; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while True:
                now = time.monotonic()
                quiet_until = self._last_arrival + quiet_s
                if self._running == 0 and now >= quiet_until:
                    return True
                if now >= deadline:
                    return False
                self._idle.wait(min(deadline, max(quiet_until, now + 0.01)) - now)

    def intercept(self, call: Call):
        with self._idle:
            self._last_arrival = time.monotonic()
            if self._draining:
                raise shutting_down()
            self._running += 1
        return self._ended

    def _ended(self) -> None:
        with self._idle:
            self._running -= 1
            if self._running == 0:
                self._idle.notify_all()
