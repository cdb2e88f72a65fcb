"""Lets a stopping server finish what it started: once draining, new calls
get UNAVAILABLE (retryable, nothing done) while calls already running
complete; `wait_quiet` returns when none is left and none has arrived for a
moment. Stopping the gRPC server any sooner would cancel the calls still in
its transport with CANCELLED, which a caller cannot tell from a lost answer."""

import threading
import time

import grpc

from server.errors import ServiceError
from server.interceptors import wrap_unary

_SHUTTING_DOWN = ServiceError(
    grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN", "the server is shutting down; retry on another replica"
)


class DrainingInterceptor(grpc.ServerInterceptor):
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

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary

        def behavior(request, context):
            with self._idle:
                self._last_arrival = time.monotonic()
                refused = self._draining
                if not refused:
                    self._running += 1
            if refused:
                context.abort_with_status(_SHUTTING_DOWN.to_status())
            try:
                return inner(request, context)
            finally:
                with self._idle:
                    self._running -= 1
                    if self._running == 0:
                        self._idle.notify_all()

        return wrap_unary(handler, behavior)
