"""Remembers the caller's deadline for the call, so that waiting for a
connection, the statement timeout and waiting in a group commit all end when
the caller stops waiting, not later."""

import time

import grpc

from server.interceptors import wrap_unary
from server.request_context import call_deadline_var

# grpc reports "no deadline" as a huge time remaining rather than None.
_NO_DEADLINE_S = 365 * 24 * 3600


class DeadlineInterceptor(grpc.ServerInterceptor):
    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary

        def behavior(request, context):
            remaining = context.time_remaining()
            has_deadline = remaining is not None and remaining < _NO_DEADLINE_S
            token = call_deadline_var.set(time.monotonic() + remaining if has_deadline else None)
            try:
                return inner(request, context)
            finally:
                call_deadline_var.reset(token)

        return wrap_unary(handler, behavior)
