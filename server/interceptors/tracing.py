"""A server span per call (server.tracing), on the chain's own base.

Not opentelemetry-instrumentation-grpc's server interceptor: it would sit
outside our chain and see every refusal as OK. The chain ends a failed call
with context.abort_with_status, which that interceptor's context wrapper
passes through without setting the span's status or its
rpc.grpc.status_code (it only watches abort and set_code); it also builds a
new handler on every call, which our chain avoids for its cost. Here the
span ends in the function the chain runs at the call's end, once the status
is set (call.context.code(), call.failure), and carries the request ID.

The caller's context is read with the global text-map propagator: W3C
`traceparent` and `tracestate` (and baggage) unless OTEL_PROPAGATORS says
otherwise; the SDK configures it from the environment, we never set it.
"""

from collections.abc import Callable

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from orgbilling.server.interceptors import Call, Interceptor, Method

# The attribute names of the RPC semantic conventions the OpenTelemetry
# instrumentations use, and two of our own.
RPC_SYSTEM = "rpc.system"
RPC_SERVICE = "rpc.service"
RPC_METHOD = "rpc.method"
RPC_GRPC_STATUS_CODE = "rpc.grpc.status_code"
REQUEST_ID = "orgbilling.request_id"
ERROR_REASON = "orgbilling.error.reason"

# As the conventions say for a server span: these codes are the server's
# failures, and set its status to ERROR; the others (an unknown org, a
# refused deduction, a bad key...) are answers to the caller's request and
# leave it unset. Every code is in rpc.grpc.status_code, every refusal's
# reason in orgbilling.error.reason.
SERVER_FAILURES = frozenset({
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS,
})


class TracingInterceptor(Interceptor):
    """Outermost of the interceptors, so that the span covers the others
    and the statements they run (the API key lookup), and calls any of them
    refuses are traced too."""

    def __init__(self, tracer: trace.Tracer):
        self._tracer = tracer
        # Each method's name and attributes, made once.
        self._per_method: dict[str, tuple[str, dict]] = {}

    def intercept(self, call: Call) -> Callable[[], None]:
        method = call.method
        named = self._per_method.get(method.path)
        if named is None:
            named = self._per_method[method.path] = _name_and_attributes(method)
        name, attributes = named
        caller = propagate.extract({m.key: m.value for m in call.metadata})
        span = self._tracer.start_span(name, context=caller, kind=SpanKind.SERVER,
                                       attributes={**attributes, REQUEST_ID: call.request_id})
        # Current for the rest of the call: the statements' spans and the
        # group-commit batches are its children. The chain runs a call from
        # its start to its end in one context (its task on the event loop,
        # or context variables of its own in the thread pool), streams included.
        token = otel_context.attach(trace.set_span_in_context(span, caller))

        def end() -> None:
            code = call.context.code() or grpc.StatusCode.OK
            span.set_attribute(RPC_GRPC_STATUS_CODE, code.value[0])
            failure = call.failure
            if failure is not None:
                span.set_attribute(ERROR_REASON, failure.reason)
            if code in SERVER_FAILURES:
                reason = failure.reason if failure is not None else "set by the servicer"
                span.set_status(Status(StatusCode.ERROR, f"{code.name}: {reason}"))
            otel_context.detach(token)
            span.end()

        return end


def _name_and_attributes(method: Method) -> tuple[str, dict]:
    # The conventions' span name: package.Service/Method, without the leading slash.
    name = method.path.lstrip("/")
    return name, {RPC_SYSTEM: "grpc", RPC_SERVICE: method.service,
                  RPC_METHOD: name.rsplit("/", 1)[1]}
