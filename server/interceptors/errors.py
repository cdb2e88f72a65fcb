"""Turns every exception of a call into the status the design promises:
a ServiceError as it is, a database failure as UNAVAILABLE (fail closed), a
full connection queue as RESOURCE_EXHAUSTED, and anything else, a bug, as
INTERNAL with a generic message; its details go to the log only."""

import logging

import grpc
import psycopg
import psycopg_pool

from server.errors import ServiceError, unavailable
from server.interceptors import wrap_unary
from server.request_context import current_request_id

log = logging.getLogger(__name__)


def status_for(error: Exception) -> ServiceError:
    if isinstance(error, ServiceError):
        return error
    if isinstance(error, psycopg_pool.TooManyRequests):
        return ServiceError(
            grpc.StatusCode.RESOURCE_EXHAUSTED, "SERVER_BUSY",
            "too many calls are waiting for the database", retry_after_s=0.1,
        )
    if isinstance(error, psycopg_pool.PoolTimeout):
        return unavailable("no database connection was free in time")
    if isinstance(error, psycopg.errors.QueryCanceled):
        return unavailable("the database did not answer in time")
    if isinstance(error, psycopg.OperationalError):
        return unavailable("the database is unavailable")
    log.exception("internal error in request %s", current_request_id())
    return ServiceError(grpc.StatusCode.INTERNAL, "INTERNAL", "internal error")


class ErrorInterceptor(grpc.ServerInterceptor):
    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary
        method = handler_call_details.method

        def behavior(request, context):
            try:
                return inner(request, context)
            except Exception as error:  # noqa: BLE001: every failure gets a status
                if context.code() is not None and not isinstance(error, ServiceError):
                    raise  # already aborted by an inner layer
                status = status_for(error)
                if status.code is not grpc.StatusCode.INTERNAL:
                    log.info("%s failed: %s %s", method, status.code.name, status.reason)
                context.abort_with_status(status.to_status())

        return wrap_unary(handler, behavior)
