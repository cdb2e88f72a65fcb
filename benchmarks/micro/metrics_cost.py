"""CPU per call of the metrics on the hot path, measured alone: the metrics
interceptor's intercept and end for one DeductCredits call, and the charge
counter. The end-to-end figure is make bench's `metrics` server variant;
on a shared 2-core machine its noop control moves by more than the 3%
budget, so this is the figure that resolves it.

    .venv/bin/python -m benchmarks.micro.metrics_cost
"""

import time

from orgbilling.server.interceptors import Method
from orgbilling.server.interceptors.metrics import MetricsInterceptor
from orgbilling.server.metrics import Metrics

CALLS = 200_000


class _Handler:
    request_streaming = False
    response_streaming = False


class _Context:
    def code(self):
        return None  # a call that succeeded


class _Call:
    __slots__ = ("method", "context", "failure")

    def __init__(self, method: Method):
        self.method, self.context, self.failure = method, _Context(), None


def cpu_us_per(work, count: int) -> float:
    started = time.process_time()
    for _ in range(count):
        work()
    return (time.process_time() - started) / count * 1e6


def main() -> None:
    metrics = Metrics()
    interceptor = MetricsInterceptor(metrics)
    call = _Call(Method("/orgbilling.v1.CreditService/DeductCredits", _Handler()))
    cpu_us_per(lambda: interceptor.intercept(call)(), 1000)  # label children bound
    print(f"interceptor, intercept and end: {cpu_us_per(lambda: interceptor.intercept(call)(), CALLS):.2f}"
          f" us of CPU a call; charge(): {cpu_us_per(lambda: metrics.charge(1), CALLS):.2f} us")


if __name__ == "__main__":
    main()
