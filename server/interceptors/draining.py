"""Lets a stopping server finish what it started: once draining, new calls
get UNAVAILABLE SHUTTING_DOWN (retryable, nothing done) while calls already
running complete; `wait_quiet` returns when none is left and none has
arrived for a moment. Stopping the gRPC server any sooner would cancel the
calls still in its transport with CANCELLED, which a caller cannot tell from
a lost answer."""

import time

from orgbilling.server.errors import shutting_down
from orgbilling.server.interceptors import Call, Interceptor

# How often wait_quiet looks again while calls run.
_POLL_S = 0.01


class DrainingInterceptor(Interceptor):
    """The running calls are a set, which calls on the loop and in the
    chain's threads add themselves to and leave, each in one step (set.add,
    set.discard), with no lock to take at both ends of every call: only a
    stopping server asks whether any runs, and it can look every few
    milliseconds."""

    def __init__(self):
        self._draining = False
        self._running: set[Call] = set()
        self._last_arrival = time.monotonic()

    def begin_draining(self) -> None:
        self._draining = True

    def wait_quiet(self, quiet_s: float, timeout_s: float) -> bool:
        """Waits until no call runs and none arrived for quiet_s; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            now = time.monotonic()
            quiet_until = self._last_arrival + quiet_s
            if not self._running and now >= quiet_until:
                return True
            if now >= deadline:
                return False
            time.sleep(min(deadline - now, max(quiet_until - now, _POLL_S)))

    def intercept(self, call: Call):
        self._last_arrival = time.monotonic()
        # Running before it reads _draining: a call that began before the
        # server started draining is waited for.
        self._running.add(call)
        if self._draining:
            self._running.discard(call)
            raise shutting_down()
        return lambda: self._running.discard(call)
