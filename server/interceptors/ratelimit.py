"""Per-caller rate limits: a token bucket per authenticated principal (never
the peer address: callers behind one proxy are not one caller), with
separate budgets for reads and writes (rate_limit_reads_per_s /
rate_limit_read_burst, rate_limit_writes_per_s / rate_limit_write_burst).

Past its budget a call gets RESOURCE_EXHAUSTED, reason RATE_LIMITED, with a
RetryInfo saying when a token will be there. A call costs one token, a
DeductCreditsBatch one per item (refused items too: each stores its
answer), at most a whole burst. Taking tokens is a few arithmetic
operations under a lock that is never held across I/O. The buckets live in
each replica's memory: N replicas allow N times the budget.
"""

import threading
import time

from orgbilling.server.auth.scopes import is_read
from orgbilling.server.errors import rate_limited
from orgbilling.server.interceptors import Call, Interceptor, Method

# Methods that cost more than one token: path -> tokens for a request.
_COSTS = {
    "/orgbilling.v1.CreditService/DeductCreditsBatch": lambda request: len(request.deductions),
}


class TokenBuckets:
    """One token bucket per key, all with the same rate and burst."""

    def __init__(self, *, rate_per_s: float, burst: int, keys_max: int, clock=time.monotonic):
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._keys_max = keys_max
        self._prune_at = keys_max
        self._clock = clock
        self._lock = threading.Lock()
        # key -> (tokens, when they were counted)
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str, count: int = 1) -> float:
        """Takes `count` tokens (at most a burst) for `key`: 0.0 if there were
        enough, else how many seconds until there are."""
        count = min(max(count, 1), self.burst)
        with self._lock:
            now = self._clock()
            tokens, counted_at = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - counted_at) * self.rate_per_s)
            if tokens >= count:
                self._buckets[key] = (tokens - count, now)
                wait_s = 0.0
            else:
                self._buckets[key] = (tokens, now)
                wait_s = (count - tokens) / self.rate_per_s
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


class RateLimitInterceptor(Interceptor):
    """Must run inside the AuthInterceptor, which names the caller. A budget
    of None is unlimited."""

    def __init__(self, *, reads: TokenBuckets | None, writes: TokenBuckets | None):
        self._reads = reads
        self._writes = writes

    def applies_to(self, method: Method) -> bool:
        return (self._reads if is_read(method.path) else self._writes) is not None

    def intercept(self, call: Call):
        # No caller: an open service (health, reflection), not limited here.
        if call.caller is None:
            return None
        read = is_read(call.method.path)
        buckets = self._reads if read else self._writes
        cost = _COSTS.get(call.method.path)
        wait_s = buckets.take(call.caller.principal, cost(call.request) if cost else 1)
        if wait_s > 0:
            raise rate_limited(budget="read" if read else "write", rate_per_s=buckets.rate_per_s,
                               burst=buckets.burst, wait_s=wait_s)
        return None
