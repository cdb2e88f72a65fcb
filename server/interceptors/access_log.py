"""The access log: a line per call, as the operator chose (setting
access_log): `failures` (the default) logs the calls that failed, `all`
every call, `off` none (the interceptor is then not in the chain at all).
It replaces the refusal log, whose lines were the failures' lines: one line
per call at most, whatever the mode.

Failure lines are limited to `failure_lines_per_s` a second, in every mode:
a flood of refused calls (an attack, a misconfigured client) costs the
attacker nothing and must not flood the log. What was left out is counted on
the next failure line written. Success lines are not limited: an operator who
asks for every call gets every call (and callers that succeed were admitted,
rate limited per caller and did work).

Each line is an INFO record of the logger orgbilling.server.access whose
message reads well as text and whose fields (method, code, reason,
duration_ms, principal, caller_name, request_id) a JSON log carries as they
are (server.app.configure_logging). Nothing of the credentials is logged:
the principal is the credential's id ("apikey:<key id>", never the secret),
the caller name the key's or token's name."""

import logging
import threading
import time
from collections.abc import Callable

import grpc

from orgbilling.server.interceptors import Call, Interceptor

log = logging.getLogger("orgbilling.server.access")


class AccessLogInterceptor(Interceptor):
    def __init__(self, *, log_successes: bool, failure_lines_per_s: int, clock=time.monotonic):
        self._log_successes = log_successes
        self._failure_lines_per_s = failure_lines_per_s
        self._clock = clock
        self._lock = threading.Lock()
        self._window_started = clock()
        self._written = 0
        self._left_out = 0

    def intercept(self, call: Call) -> Callable[[], None]:
        started = time.perf_counter()
        return lambda: self.ended(call, started)

    def ended(self, call: Call, started: float) -> None:
        """Logs `call`, which has just ended (its status set), if the mode and
        the failure lines' rate allow. Cheap when it logs nothing: it runs at
        the end of every call."""
        context = call.context
        failure = call.failure
        if failure is not None:
            code, reason, message = failure.code, failure.reason, failure.message
        else:
            code = context.code()  # a status the servicer set itself (health's NOT_FOUND)
            if code is None and context.cancelled():
                # Ended from the caller's side: cancelled, past its deadline
                # or disconnected (a stream whose generator gRPC closed).
                code = grpc.StatusCode.CANCELLED
                message = "the caller left before the call's end"
            elif code is None or code is grpc.StatusCode.OK:
                if self._log_successes and log.isEnabledFor(logging.INFO):
                    self._write(call, started, grpc.StatusCode.OK, "OK", reason=None, left_out=0)
                return
            else:
                message = context.details()
            reason = None
        if not log.isEnabledFor(logging.INFO):
            return
        with self._lock:
            now = self._clock()
            if now - self._window_started >= 1.0:
                self._window_started, self._written = now, 0
            if self._written >= self._failure_lines_per_s:
                self._left_out += 1
                return
            self._written += 1
            left_out, self._left_out = self._left_out, 0
        if isinstance(message, bytes):  # gRPC keeps a servicer's own details encoded
            message = message.decode("utf-8", "replace")
        outcome = f"failed: {code.name} {reason or '-'}: {message or ''}"
        self._write(call, started, code, outcome, reason=reason, left_out=left_out)

    @staticmethod
    def _write(call: Call, started: float, code: grpc.StatusCode, outcome: str, *,
               reason: str | None, left_out: int) -> None:
        duration_ms = round((time.perf_counter() - started) * 1000, 3)
        caller = call.caller
        principal = caller.principal if caller is not None else None
        fields = {
            "method": call.method.path,
            "code": code.name,
            "duration_ms": duration_ms,
            "principal": principal,
            "caller_name": caller.display_name if caller is not None else None,
            # Given, not left to the log filter's context variable: a stream
            # the caller abandons may end when its generator is collected.
            "request_id": call.request_id,
        }
        if reason is not None:
            fields["reason"] = reason
        suffix = ""
        if left_out:
            fields["failures_not_logged"] = left_out
            suffix = f"; {left_out} more failed calls not logged"
        log.info("%s %s (%.1f ms, %s%s)", call.method.path, outcome, duration_ms,
                 principal or "no caller", suffix, extra=fields)
