"""Per-caller rate limits: a token bucket per authenticated principal (never
the peer address: callers behind one proxy are not one caller), with
separate budgets for reads and writes (rate_limit_reads_per_s /
rate_limit_read_burst, rate_limit_writes_per_s / rate_limit_write_burst).

Past its budget a call gets RESOURCE_EXHAUSTED, reason RATE_LIMITED, with a
RetryInfo saying when a token will be there. Each call costs one token,
whatever it carries (a DeductCreditsBatch too). Taking a token is a few
arithmetic operations under a lock that is never held across I/O. The
buckets live in each replica's memory: N replicas allow N times the budget.
"""

import threading
import time

import grpc

from server.auth.caller import current_caller
from server.auth.scopes import is_read
from server.errors import ServiceError
from server.interceptors import wrap_unary


class TokenBuckets:
    """One token bucket per key, all with the same rate and burst."""

    def __init__(self, rate_per_s: float, burst: int, keys_max: int, clock=time.monotonic):
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._keys_max = keys_max
        self._prune_at = keys_max
        self._clock = clock
        self._lock = threading.Lock()
        # key -> (tokens, when they were counted)
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> float:
        """Takes a token for `key`: 0.0 if there was one, else how many
        seconds until there is."""
        with self._lock:
            now = self._clock()
            tokens, counted_at = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - counted_at) * self.rate_per_s)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                wait_s = 0.0
            else:
                self._buckets[key] = (tokens, now)
                wait_s = (1.0 - tokens) / self.rate_per_s
            if len(self._buckets) > self._prune_at:
                self._prune(now)
            return wait_s

    def _prune(self, now: float) -> None:
        """Forgets buckets that have refilled: a full bucket is the same as
        none. If most are still busy, waits for the count to double before
        trying again, so pruning stays rare."""
        self._buckets = {
            key: (tokens, counted_at) for key, (tokens, counted_at) in self._buckets.items()
            if tokens + (now - counted_at) * self.rate_per_s < self.burst
        }
        self._prune_at = max(self._keys_max, 2 * len(self._buckets))


def _rate_limited(budget: str, buckets: TokenBuckets, wait_s: float) -> ServiceError:
    wait_ms = max(1, round(wait_s * 1000))
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED",
        f"this caller made too many {budget} calls; retry in {wait_ms} ms",
        metadata={"budget": budget, "rate_per_s": buckets.rate_per_s, "burst": buckets.burst,
                  "retry_after_ms": wait_ms},
        retry_after_s=wait_s,
    )


class RateLimitInterceptor(grpc.ServerInterceptor):
    """Must run inside the AuthInterceptor, which names the caller. A budget
    of None is unlimited."""

    def __init__(self, reads: TokenBuckets | None, writes: TokenBuckets | None):
        self._reads = reads
        self._writes = writes

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        read = is_read(handler_call_details.method)
        buckets, budget = (self._reads, "read") if read else (self._writes, "write")
        if buckets is None:
            return handler
        inner = handler.unary_unary

        def behavior(request, context):
            caller = current_caller()
            # No caller: an open service (health, reflection), not limited here.
            if caller is not None:
                wait_s = buckets.take(caller.principal)
                if wait_s > 0:
                    context.abort_with_status(_rate_limited(budget, buckets, wait_s).to_status())
            return inner(request, context)

        return wrap_unary(handler, behavior)
