"""Gives every call a request ID: the caller's x-request-id if it is sane,
otherwise a new one. It is sent back in the initial metadata, logged on every
line of the call and stored on the rows the call writes."""

import re
import uuid

import grpc

from server.interceptors import wrap_unary
from server.request_context import request_id_var

REQUEST_ID_HEADER = "x-request-id"
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/-]{1,128}")


def request_id_from(metadata) -> str:
    for key, value in metadata or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str) and _SANE_REQUEST_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex


class RequestIdInterceptor(grpc.ServerInterceptor):
    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary

        def behavior(request, context):
            request_id = request_id_from(context.invocation_metadata())
            token = request_id_var.set(request_id)
            try:
                context.send_initial_metadata(((REQUEST_ID_HEADER, request_id),))
                return inner(request, context)
            finally:
                request_id_var.reset(token)

        return wrap_unary(handler, behavior)
