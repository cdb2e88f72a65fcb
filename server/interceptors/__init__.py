"""The server's interceptor chain: the plumbing for the four kinds of RPC,
written once, around small interceptors that each do one thing.

An interceptor implements `intercept(call)`: it runs before the rest of the
chain and the servicer, may refuse the call by raising a ServiceError, and
may return a function to run when the call ends, however it ends (a unary
response returned, a stream exhausted, cancelled or failed). Whether it
applies to a method is decided once per method (`applies_to`), so the chain
is built once per method and reused: rebuilding it on every call cost 8% of
the server's time. Nothing here does blocking I/O in intercept_service,
which runs on gRPC's serving thread; the work runs in the call's worker.

The chain itself does what every call needs and no interceptor may skip:
- Error mapping, outermost of all: any exception becomes the status the
  design promises (server.errors.status_for), sent as a trailers-only
  response (nothing is sent before it), so that a client's retry policy
  can retry it (gRFC A6 never retries a call that received headers).
- The request ID (server.interceptors.request_id), in the trailing metadata
  of every answer, failures included.
- Decoding the request: handlers receive bytes, and the request is decoded
  only when an interceptor or the servicer first asks for it, so an
  unauthenticated caller learns nothing about its request (not even whether
  it decodes), and bytes that are not a message get INVALID_ARGUMENT
  MALFORMED_REQUEST with an ErrorInfo rather than gRPC's bare INTERNAL.
"""

import time
from typing import Callable, Iterator

import grpc

from orgbilling.server.errors import ServiceError, malformed_request, status_for
from orgbilling.server.interceptors.request_id import REQUEST_ID_HEADER, request_id_from
from orgbilling.server.request_context import request_id_var

class Method:
    """What the chain knows of a method before any call: its path and kind."""

    __slots__ = ("path", "service", "request_streaming", "response_streaming")

    def __init__(self, path: str, handler: grpc.RpcMethodHandler):
        self.path = path
        self.service = path.lstrip("/").split("/", 1)[0]
        self.request_streaming = handler.request_streaming
        self.response_streaming = handler.response_streaming


class Call:
    """One call as the interceptors see it. `request` is decoded on first use
    (None for a streamed request); `ends_by` (time.monotonic) cuts a stream
    short, checked between messages."""

    __slots__ = ("method", "context", "request_id", "caller", "ends_by", "failure", "_raw",
                 "_deserialize")

    def __init__(self, method: Method, context: grpc.ServicerContext, *, raw, deserialize):
        self.method = method
        self.context = context
        self.request_id = request_id_from(context.invocation_metadata())
        self.caller = None
        self.ends_by: float | None = None
        # The status the chain ended the call with, when it failed; for the
        # functions run at its end.
        self.failure: ServiceError | None = None
        self._raw = raw
        self._deserialize = deserialize

    @property
    def request(self):
        if self._deserialize is None:
            return self._raw
        try:
            self._raw = self._deserialize(self._raw)
        except Exception:  # noqa: BLE001: whatever the bytes, the caller gets the same answer
            raise malformed_request() from None
        self._deserialize = None
        return self._raw


class Interceptor:
    """One concern of the chain. Subclasses override what they need."""

    def applies_to(self, method: Method) -> bool:
        return True

    def intercept(self, call: Call) -> Callable[[], None] | None:
        """Runs before the rest of the chain; raises ServiceError to refuse.
        May return a function that runs when the call ends."""
        return None


class InterceptorChain(grpc.ServerInterceptor):
    """Runs `interceptors`, outermost first, around every call."""

    def __init__(self, interceptors: list[Interceptor]):
        self._interceptors = list(interceptors)
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    def intercept_service(self, continuation, handler_call_details):
        path = handler_call_details.method
        handler = self._handlers.get(path)
        if handler is None:
            inner = continuation(handler_call_details)
            if inner is None:
                return None  # unknown methods are not remembered: callers cannot grow the cache
            handler = self._handlers[path] = self._wrap(Method(path, inner), inner)
        return handler

    def _wrap(self, method: Method, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        interceptors = [i for i in self._interceptors if i.applies_to(method)]
        deserialize = handler.request_deserializer
        streamed = handler.request_streaming
        fail = self._fail

        def new_call(request_or_iterator, context) -> Call:
            # A streamed request is decoded message by message (decoded), not by the Call.
            if streamed:
                return Call(method, context, raw=None, deserialize=None)
            return Call(method, context, raw=request_or_iterator, deserialize=deserialize)

        def request_of(call: Call, request_or_iterator):
            return decoded(call, request_or_iterator) if streamed else call.request

        def begin(call: Call, ends: list[Callable[[], None]]) -> None:
            """Runs the interceptors, adding to ends what each asks to run at
            the call's end; the caller runs them after the call's status is
            set, even when an interceptor refused the call."""
            request_id_var.set(call.request_id)
            call.context.set_trailing_metadata(((REQUEST_ID_HEADER, call.request_id),))
            for interceptor in interceptors:
                end = interceptor.intercept(call)
                if end is not None:
                    ends.append(end)

        def finish(ends: list[Callable[[], None]]) -> None:
            for end in reversed(ends):
                end()

        def decoded(call: Call, request_iterator) -> Iterator:
            for raw in _until(call, request_iterator):
                try:
                    request = deserialize(raw)
                except Exception:  # noqa: BLE001: whatever the bytes, the caller gets the same answer
                    raise malformed_request() from None
                yield request

        options = {"request_deserializer": None, "response_serializer": handler.response_serializer}

        if handler.unary_unary or handler.stream_unary:
            behavior = handler.unary_unary or handler.stream_unary

            def unary_response(request_or_iterator, context):
                call = new_call(request_or_iterator, context)
                ends = []
                try:
                    begin(call, ends)
                    return behavior(request_of(call, request_or_iterator), context)
                except Exception as error:  # noqa: BLE001: every failure gets a status
                    fail(call, error)
                finally:
                    finish(ends)

            factory = (grpc.stream_unary_rpc_method_handler if streamed
                       else grpc.unary_unary_rpc_method_handler)
            return factory(unary_response, **options)

        behavior = handler.unary_stream or handler.stream_stream

        def stream_response(request_or_iterator, context):
            call = new_call(request_or_iterator, context)
            ends = []
            try:
                begin(call, ends)
                yield from _until(call, behavior(request_of(call, request_or_iterator), context))
            except Exception as error:  # noqa: BLE001: every failure gets a status
                fail(call, error)
            finally:
                finish(ends)

        factory = (grpc.stream_stream_rpc_method_handler if streamed
                   else grpc.unary_stream_rpc_method_handler)
        return factory(stream_response, **options)

    def _fail(self, call: Call, error: Exception) -> None:
        """Ends the call with the status `error` calls for; always raises."""
        context = call.context
        if context.code() is not None and not isinstance(error, ServiceError):
            raise error  # the servicer set its own status (context.abort): keep it
        status = call.failure = status_for(error)
        context.abort_with_status(status.to_status(((REQUEST_ID_HEADER, call.request_id),)))


def _until(call: Call, messages) -> Iterator:
    """`messages` until the call's `ends_by`, if it has one: a stream ends
    normally at its limit, the caller may open another."""
    if call.ends_by is None:
        yield from messages
        return
    for message in messages:
        if time.monotonic() >= call.ends_by:
            return
        yield message
