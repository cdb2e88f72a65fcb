"""Authentication and authorization, before anything else a call does.

For every call outside the open services (health and reflection by default,
setting unauthenticated_services) it checks, in this order, and refuses at
the first failure:
1. the credentials (UNAUTHENTICATED): before the request is even looked at,
   so a bad caller learns nothing about its request's validity;
2. the scope the method requires, from server.auth.scopes (PERMISSION_DENIED,
   MISSING_SCOPE; a method with no declared scope is refused to everyone);
3. the organizations the request names, for a credential limited to some
   (PERMISSION_DENIED, ORG_NOT_PERMITTED).
The admitted Caller is then available to inner layers (the rate limiter)
through server.auth.caller.current_caller().

The work happens in the wrapped behavior, in the call's worker thread:
intercept_service itself only decides which wrapper to return.
"""

import logging

import grpc

from server.auth.authenticator import Authenticator
from server.auth.caller import (
    Caller, caller_var, missing_scope, org_not_permitted, scope_not_declared,
)
from server.auth.orgs import org_ids_in
from server.auth.scopes import required_scope, service_of
from server.errors import ServiceError

log = logging.getLogger(__name__)

_INTERNAL = ServiceError(grpc.StatusCode.INTERNAL, "INTERNAL", "internal error")


class AuthInterceptor(grpc.ServerInterceptor):
    def __init__(self, authenticator: Authenticator, open_services: frozenset[str]):
        self._authenticator = authenticator
        self._open_services = open_services

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if service_of(method) in self._open_services:
            return handler
        return _guarded(handler, lambda request, context: self._admit(method, request, context))

    def _admit(self, method: str, request, context) -> Caller:
        """The caller, if it may make this call; aborts the call otherwise."""
        try:
            caller = self._authenticator.authenticate(
                context.invocation_metadata(), context.auth_context()
            )
            _authorize(method, caller, request)
            return caller
        except ServiceError as refusal:
            log.info("%s refused: %s %s: %s", method, refusal.code.name, refusal.reason, refusal.message)
            context.abort_with_status(refusal.to_status())
        except Exception:  # noqa: BLE001: a bug here must not become UNKNOWN
            log.exception("authenticating a call to %s failed", method)
            context.abort_with_status(_INTERNAL.to_status())
        raise AssertionError("abort_with_status returned")  # it always raises


def _authorize(method: str, caller: Caller, request) -> None:
    """Raises the refusal when `caller` may not call `method` with `request`
    (None for a streamed request)."""
    scope = required_scope(method)
    if scope is None:
        log.error("%s has no scope in server/auth/scopes.py: refused to everyone", method)
        raise scope_not_declared(method)
    if scope and scope not in caller.scopes:
        raise missing_scope(method, scope)
    if caller.org_ids is None or scope == "":
        return
    org_ids = org_ids_in(request) if request is not None else set()
    if not org_ids:
        raise org_not_permitted(None)
    for org_id in sorted(org_ids):
        if not caller.may_act_on(org_id):
            raise org_not_permitted(org_id)


def _guarded(handler: grpc.RpcMethodHandler, admit) -> grpc.RpcMethodHandler:
    """`handler` with `admit(request or None, context)` run before its behavior."""
    options = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        inner = handler.unary_unary

        def unary_unary(request, context):
            token = caller_var.set(admit(request, context))
            try:
                return inner(request, context)
            finally:
                caller_var.reset(token)

        return grpc.unary_unary_rpc_method_handler(unary_unary, **options)
    if handler.unary_stream is not None:
        inner = handler.unary_stream

        def unary_stream(request, context):
            admit(request, context)
            yield from inner(request, context)

        return grpc.unary_stream_rpc_method_handler(unary_stream, **options)
    if handler.stream_unary is not None:
        inner = handler.stream_unary

        def stream_unary(request_iterator, context):
            admit(None, context)
            return inner(request_iterator, context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, **options)
    inner = handler.stream_stream

    def stream_stream(request_iterator, context):
        admit(None, context)
        yield from inner(request_iterator, context)

    return grpc.stream_stream_rpc_method_handler(stream_stream, **options)
