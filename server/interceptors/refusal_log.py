"""A line in the log per refused call, at most `lines_per_s` a second: a
flood of refused calls (an attack, a misconfigured client) must not flood
the log. What was left out is counted on the next line written."""

import logging
import threading
import time

from orgbilling.server.errors import ServiceError

log = logging.getLogger("orgbilling.server.refusals")


class RefusalLog:
    def __init__(self, *, lines_per_s: int, clock=time.monotonic):
        self._lines_per_s = lines_per_s
        self._clock = clock
        self._lock = threading.Lock()
        self._window_started = clock()
        self._written = 0
        self._left_out = 0

    def refused(self, method: str, status: ServiceError) -> None:
        if not log.isEnabledFor(logging.INFO):
            return
        with self._lock:
            now = self._clock()
            if now - self._window_started >= 1.0:
                self._window_started, self._written = now, 0
            if self._written >= self._lines_per_s:
                self._left_out += 1
                return
            self._written += 1
            left_out, self._left_out = self._left_out, 0
        suffix = f" ({left_out} more refusals not logged)" if left_out else ""
        log.info("%s failed: %s %s: %s%s", method, status.code.name, status.reason, status.message, suffix)
