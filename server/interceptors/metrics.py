"""Counts and times every call for Prometheus (server.metrics)."""

import time
from collections.abc import Callable

import grpc

from orgbilling.server.interceptors import Call, Interceptor, Method
from orgbilling.server.metrics import Metrics, method_labels


class MetricsInterceptor(Interceptor):
    """Counts and times every call, outermost of the interceptors so that
    calls refused by any of them are counted too. Each method's label
    children are bound once, not looked up per call."""

    def __init__(self, metrics: Metrics):
        self._metrics = metrics
        self._per_method: dict[str, tuple] = {}

    def intercept(self, call: Call) -> Callable[[], None]:
        method = call.method
        bound = self._per_method.get(method.path)
        if bound is None:
            bound = self._per_method[method.path] = self._bind(method)
        started, in_flight, handling, handled_by_code = bound
        started.inc()
        in_flight.inc()
        began = time.perf_counter()

        def end() -> None:
            handling.observe(time.perf_counter() - began)
            in_flight.dec()
            code = call.context.code() or grpc.StatusCode.OK
            handled = handled_by_code.get(code)
            if handled is None:
                handled = handled_by_code[code] = self._metrics.handled.labels(
                    *method_labels(method), code.name)
            handled.inc()
            if call.failure is not None and code is not grpc.StatusCode.INTERNAL:
                self._metrics.refusals.labels(code.name, call.failure.reason).inc()

        return end

    def _bind(self, method: Method) -> tuple:
        labels = method_labels(method)
        m = self._metrics
        return (m.started.labels(*labels), m.in_flight.labels(*labels),
                m.handling_seconds.labels(*labels), {})
