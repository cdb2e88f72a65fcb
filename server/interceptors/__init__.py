"""The server's interceptor chain: the plumbing for the four kinds of RPC,
written once, around small interceptors that each do one thing.

An interceptor implements `intercept(call)`: it runs before the rest of the
chain and the servicer, may refuse the call by raising a ServiceError, and
may return a function to run when the call ends, however it ends (a unary
response returned, a stream exhausted, cancelled or failed). Whether it
applies to a method is decided once per method (`applies_to`), so the chain
is built once per method and reused: rebuilding it on every call cost 8% of
the server's time.

The server is grpc.aio's (server.app), and to gRPC every handler is a
coroutine. A method whose servicer is one (the calls that queue for a group
commit, health, reflection) runs on the event loop, the interceptors with
it; for them an interceptor must not block for long: it reads snapshots in
memory (the API keys, the JWKS, the rate limits), and the rare reload it
may wait for is bounded by a timeout of its own. A servicer that is plain
code runs in the chain's thread pool, its interceptors with it, each call
in context variables of its own (a thread does not carry its last call's),
with a ThreadContext for a context; its status is sent from the loop when
it returns. grpc.aio's own way of running such servicers was not used: it
never tells one that its caller has left (a stream its caller cancelled
would not be logged CANCELLED, nor its span ended) and its abort from a
stream's thread can race the stream's last message.

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

import asyncio
import contextvars
import inspect
import time
from collections.abc import Container
from concurrent.futures import Executor
from typing import AsyncIterator, Callable, Iterator

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

    __slots__ = ("method", "context", "metadata", "request_id", "caller", "ends_by", "failure",
                 "_raw", "_deserialize")

    def __init__(self, method: Method, context: grpc.ServicerContext, *, raw, deserialize):
        self.method = method
        self.context = context
        # The caller's metadata, read from gRPC once for every layer that needs it.
        self.metadata = context.invocation_metadata() or ()
        self.request_id = request_id_from(self.metadata)
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


class InterceptorChain:
    """Runs `interceptors`, outermost first, around every call of the
    services added through `services(server)`. A servicer that is plain
    code (not a coroutine) runs in `threads`, and the chain's part of its
    call with it.

    The chain wraps each method's handler once, as its service is added,
    rather than being one of grpc.aio's interceptors, which it asks for the
    handler of every call (a coroutine and a lookup a call)."""

    def __init__(self, interceptors: list[Interceptor], *, threads: Executor):
        self._interceptors = list(interceptors)
        self._threads = threads
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    def services(self, server: grpc.aio.Server, *,
                 registered: Container[str] | None = None) -> "ChainedServices":
        """The server as the generated add_*_to_server functions should see
        it: each handler they add goes through this chain. Only the methods
        whose paths are in registered (all when None) are also registered
        methods (ChainedServices says why)."""
        return ChainedServices(server, self, registered=registered)

    def handler(self, path: str, inner: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """inner wrapped in the chain, once per method."""
        handler = self._handlers.get(path)
        if handler is None:
            handler = self._handlers[path] = self._wrap(Method(path, inner), inner)
        return handler

    def _wrap(self, method: Method, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        plumbing = _Plumbing(method, handler, [i for i in self._interceptors if i.applies_to(method)])
        behavior = (handler.unary_unary or handler.unary_stream or handler.stream_unary
                    or handler.stream_stream)
        if inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior):
            return _on_the_loop(plumbing, behavior)
        if handler.request_streaming:
            raise TypeError(f"{method.path}: a servicer of streamed requests must be a coroutine")
        return _in_threads(plumbing, behavior, self._threads)


class ChainedServices:
    """A grpc.aio server as the generated add_*_to_server functions see it,
    adding every handler in the chain. The methods not in `registered` are
    served by their service's generic handler only.

    grpc.aio's accept loop keeps a request open in gRPC's core for every
    registered method, and one for all generic handlers; each time it
    accepts calls, it hands all those requests to asyncio.wait, whose cost
    grows with their number: with our 35 methods registered, about 20 us a
    call (benchmarks.micro.accept_loop). But one request accepts one call at
    a time: calls of two methods at once, through the one generic request,
    cost more than through a request each. So the methods called on every
    request of other services stay registered, and the others are generic
    (server.app; benchmarks/README.md, "The accept loop's open requests")."""

    def __init__(self, server: grpc.aio.Server, chain: InterceptorChain, *,
                 registered: Container[str] | None):
        self._server = server
        self._chain = chain
        self._registered = registered

    def add_generic_rpc_handlers(self, handlers) -> None:
        self._server.add_generic_rpc_handlers(tuple(_Chained(h, self._chain) for h in handlers))

    def add_registered_method_handlers(self, service_name: str, method_handlers: dict) -> None:
        chosen = {}
        for name, handler in method_handlers.items():
            path = f"/{service_name}/{name}"
            if self._registered is None or path in self._registered:
                chosen[name] = self._chain.handler(path, handler)
        if chosen:
            self._server.add_registered_method_handlers(service_name, chosen)


class _Chained(grpc.GenericRpcHandler):
    """A generic handler's handlers, in the chain."""

    def __init__(self, inner: grpc.GenericRpcHandler, chain: InterceptorChain):
        self._inner = inner
        self._chain = chain

    def service(self, handler_call_details):
        inner = self._inner.service(handler_call_details)
        if inner is None:
            return None  # unknown methods are not remembered: callers cannot grow the cache
        return self._chain.handler(handler_call_details.method, inner)


class _Plumbing:
    """What every call of one method needs, whichever way it runs."""

    def __init__(self, method: Method, handler: grpc.RpcMethodHandler, interceptors: list[Interceptor]):
        self.method = method
        self.interceptors = interceptors
        self.deserialize = handler.request_deserializer
        self.streamed = handler.request_streaming
        self.response_streaming = handler.response_streaming
        self.options = {"request_deserializer": None, "response_serializer": handler.response_serializer}

    def new_call(self, request_or_iterator, context) -> Call:
        # A streamed request is decoded message by message, not by the Call.
        if self.streamed:
            return Call(self.method, context, raw=None, deserialize=None)
        return Call(self.method, context, raw=request_or_iterator, deserialize=self.deserialize)

    def begin(self, call: Call, ends: list[Callable[[], None]]) -> None:
        """Runs the interceptors, adding to ends what each asks to run at
        the call's end; the caller runs them after the call's status is
        set, even when an interceptor refused the call."""
        request_id_var.set(call.request_id)
        call.context.set_trailing_metadata(((REQUEST_ID_HEADER, call.request_id),))
        for interceptor in self.interceptors:
            end = interceptor.intercept(call)
            if end is not None:
                ends.append(end)

    @staticmethod
    def finish(ends: list[Callable[[], None]]) -> None:
        """Runs the ends, innermost first, once: a second finish of the
        same call runs nothing."""
        while ends:
            ends.pop()()

    @staticmethod
    def status(call: Call, error: Exception) -> grpc.Status | None:
        """The status that ends a failed call: the one `error` calls for,
        with the request ID; None when the servicer set a status of its own
        before it raised (health's NOT_FOUND, an unimplemented method's
        UNIMPLEMENTED), which stands."""
        if call.context.code() is not None and not isinstance(error, ServiceError):
            return None
        status = call.failure = status_for(error)
        return status.to_status(((REQUEST_ID_HEADER, call.request_id),))


def _on_the_loop(plumbing: _Plumbing, behavior) -> grpc.RpcMethodHandler:
    """The handler of a method whose servicer is a coroutine or an async
    generator: the chain runs on the event loop with it."""

    async def decoded(call: Call, request_iterator) -> AsyncIterator:
        async for raw in request_iterator:
            if call.ends_by is not None and time.monotonic() >= call.ends_by:
                return
            try:
                request = plumbing.deserialize(raw)
            except Exception:  # noqa: BLE001: whatever the bytes, the caller gets the same answer
                raise malformed_request() from None
            yield request

    def request_of(call: Call, request_or_iterator):
        return decoded(call, request_or_iterator) if plumbing.streamed else call.request

    async def end_failed(call: Call, error: Exception, ends: list) -> None:
        # The ends run before the status is sent (grpc.aio's abort sends it
        # at once): a caller that has its answer finds the call logged,
        # counted and its span ended. They see the status in the context.
        status = plumbing.status(call, error)
        if status is None:
            plumbing.finish(ends)
            raise error  # grpc.aio sends the servicer's own status
        call.context.set_code(status.code)
        call.context.set_details(status.details)
        plumbing.finish(ends)
        await call.context.abort(status.code, status.details, status.trailing_metadata)

    if not plumbing.response_streaming:
        async def unary_response(request_or_iterator, context):
            call = plumbing.new_call(request_or_iterator, context)
            ends = []
            try:
                plumbing.begin(call, ends)
                return await behavior(request_of(call, request_or_iterator), context)
            except Exception as error:  # noqa: BLE001: every failure gets a status
                await end_failed(call, error, ends)
            finally:
                plumbing.finish(ends)

        factory = (grpc.stream_unary_rpc_method_handler if plumbing.streamed
                   else grpc.unary_unary_rpc_method_handler)
        return factory(unary_response, **plumbing.options)

    async def stream_response(request_or_iterator, context):
        call = plumbing.new_call(request_or_iterator, context)
        ends = []
        try:
            plumbing.begin(call, ends)
            async for message in behavior(request_of(call, request_or_iterator), context):
                if call.ends_by is not None and time.monotonic() >= call.ends_by:
                    return
                yield message
        except Exception as error:  # noqa: BLE001: every failure gets a status
            await end_failed(call, error, ends)
        finally:
            plumbing.finish(ends)

    factory = (grpc.stream_stream_rpc_method_handler if plumbing.streamed
               else grpc.unary_stream_rpc_method_handler)
    return factory(stream_response, **plumbing.options)


def _in_threads(plumbing: _Plumbing, behavior, threads: Executor) -> grpc.RpcMethodHandler:
    """The handler of a method whose servicer is plain code: the call runs
    in `threads` (the interceptors, which may wait for a key reload,
    included), each call in context variables of its own, with a
    ThreadContext; its status is sent from the loop when it returns. A
    stream runs there message by message."""

    def unary_in_thread(call: Call):
        ends = []
        try:
            plumbing.begin(call, ends)
            return behavior(call.request, call.context)
        except Exception as error:  # noqa: BLE001: every failure gets a status
            call.context.fail(plumbing.status(call, error))
            return None
        finally:
            plumbing.finish(ends)

    def stream_in_thread(call: Call) -> Iterator:
        ends = []
        try:
            plumbing.begin(call, ends)
            yield from _until(call, behavior(call.request, call.context))
        except Exception as error:  # noqa: BLE001: every failure gets a status
            call.context.fail(plumbing.status(call, error))
        finally:
            plumbing.finish(ends)

    if not plumbing.response_streaming:
        async def unary_response(request, context):
            in_thread = ThreadContext(context)
            try:
                response = await asyncio.get_running_loop().run_in_executor(
                    threads, contextvars.Context().run, unary_in_thread,
                    plumbing.new_call(request, in_thread))
            except asyncio.CancelledError:
                in_thread.caller_left()
                raise
            await in_thread.end()
            return response

        return grpc.unary_unary_rpc_method_handler(unary_response, **plumbing.options)

    async def stream_response(request, context):
        loop = asyncio.get_running_loop()
        in_thread = ThreadContext(context)
        run = contextvars.Context().run
        steps = run(stream_in_thread, plumbing.new_call(request, in_thread))
        step = None
        try:
            while True:
                step = threads.submit(run, next, steps, _DONE)
                message = await asyncio.wrap_future(step, loop=loop)
                step = None
                if message is _DONE:
                    break
                yield message
        except (asyncio.CancelledError, GeneratorExit):  # the caller has gone
            in_thread.caller_left()

            def close(_=None):
                # In a thread, in the call's context, once no step runs: its
                # interceptors' ends run there, as the call's other steps did.
                threads.submit(run, steps.close)

            if step is None:
                close()
            else:
                # The thread's own future: it is done when the step has
                # returned (the awaited wrapper is done as soon as cancelled).
                step.add_done_callback(close)
            raise
        await in_thread.end()

    return grpc.unary_stream_rpc_method_handler(stream_response, **plumbing.options)


# What the next step of a stream in a thread returns once the stream is done.
_DONE = object()


class ThreadContext:
    """A call's context for its servicer and interceptors in a thread: the
    parts of grpc.ServicerContext they use, over grpc.aio's context. What
    it reads (metadata, peer, deadline) it reads from the aio context; what
    it sets (trailing metadata, the status) it keeps until the call returns
    to the event loop (end), which sends it: the aio context is the loop's."""

    class Aborted(Exception):
        """Raised by abort(): the servicer's own status ends the call."""

    __slots__ = ("_context", "_trailing_metadata", "_code", "_details", "_left")

    def __init__(self, context: grpc.aio.ServicerContext):
        self._context = context
        self._trailing_metadata = ()
        self._code: grpc.StatusCode | None = None
        self._details: str | None = None
        self._left = False

    def invocation_metadata(self):
        return self._context.invocation_metadata()

    def auth_context(self):
        return self._context.auth_context()

    def peer(self) -> str:
        return self._context.peer()

    def time_remaining(self) -> float | None:
        return self._context.time_remaining()

    def set_trailing_metadata(self, metadata) -> None:
        self._trailing_metadata = tuple(metadata)

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str | None:
        return self._details

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def abort(self, code: grpc.StatusCode, details: str = ""):
        self._code, self._details = code, details
        raise ThreadContext.Aborted(details)

    def fail(self, status: grpc.Status | None) -> None:
        """Ends the call with `status` (its trailing metadata included), or
        with the one the servicer set (None)."""
        if status is not None:
            self._trailing_metadata = tuple(status.trailing_metadata)
            self._code, self._details = status.code, status.details

    def cancelled(self) -> bool:
        """Whether the call ended from the caller's side: cancelled, past its
        deadline or disconnected."""
        return self._left

    def is_active(self) -> bool:
        return not self._left

    def caller_left(self) -> None:
        self._left = True

    async def end(self) -> None:
        """Sends the call's trailing metadata, and its status if it failed."""
        if self._code is None or self._code is grpc.StatusCode.OK:
            self._context.set_trailing_metadata(self._trailing_metadata)
            return
        await self._context.abort(self._code, self._details or "", self._trailing_metadata)


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
