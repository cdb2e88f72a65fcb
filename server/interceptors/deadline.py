"""Remembers the caller's deadline for the call, so that waiting for a
connection, the statement timeout and waiting in a group commit all end when
the caller stops waiting, not later."""

import time

from orgbilling.server.interceptors import Call, Interceptor
from orgbilling.server.request_context import call_deadline_var

# grpc reports "no deadline" as a huge time remaining rather than None.
_NO_DEADLINE_S = 365 * 24 * 3600


class DeadlineInterceptor(Interceptor):
    def intercept(self, call: Call):
        remaining = call.context.time_remaining()
        if remaining is not None and remaining < _NO_DEADLINE_S:
            call_deadline_var.set(time.monotonic() + remaining)
        return None
