"""When to send an operation again, written once for both clients: the
clients run the loop (one sleeps, one awaits), this decides."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from orgbilling.client.errors import OrgBillingError, Unavailable, error_from_rpc_error


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How long one operation may keep trying. Only failures that leave
    nothing known to be done (Unavailable and its kinds: UNAVAILABLE,
    DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, a lost connection) are retried,
    always with the operation's one idempotency key, after an exponential
    backoff with full jitter, and never sooner than the server's RetryInfo
    asks. It stops at `attempts_max` sends or once `budget_s` (sleeps
    included) would be passed, and raises the last failure."""

    attempts_max: int = 10
    budget_s: float = 30.0
    backoff_initial_s: float = 0.05
    backoff_max_s: float = 2.0
    backoff_multiplier: float = 2.0

    def __post_init__(self):
        if self.attempts_max < 1:
            raise ValueError("attempts_max must be at least 1")
        if self.budget_s <= 0 or self.backoff_initial_s < 0 or self.backoff_max_s < 0:
            raise ValueError("budget_s must be positive, the backoffs not negative")
        if self.backoff_multiplier < 1:
            raise ValueError("backoff_multiplier must be at least 1")


NO_RETRIES = RetryPolicy(attempts_max=1)


class Attempts:
    """One operation's attempts under a policy: each attempt's deadline and,
    after a failure, how long to wait before the next (or None: give up)."""

    def __init__(self, policy: RetryPolicy, *, call_timeout_s: float,
                 deadline_within_budget: bool = True, clock=time.monotonic):
        self._policy = policy
        self._call_timeout_s = call_timeout_s
        # A stream's attempt may outlast the budget, which then bounds only
        # the waits between its attempts.
        self._deadline_within_budget = deadline_within_budget
        self._clock = clock
        self._ends_at = clock() + policy.budget_s
        self.count = 0

    def next_timeout_s(self) -> float:
        """The deadline of the attempt about to be sent: the call timeout,
        cut to what is left of the budget."""
        self.count += 1
        if not self._deadline_within_budget:
            return self._call_timeout_s
        return max(0.001, min(self._call_timeout_s, self._ends_at - self._clock()))

    def after_failure(self, error, *, idempotency_key: str | None,
                      request_id: str) -> tuple[OrgBillingError, float | None]:
        """The typed error for a failed attempt (a grpc RpcError, sync or
        aio), and the wait before the next attempt, None to give up. The
        request ID is the one sent when no answer came back with one."""
        failure = error_from_rpc_error(error)
        failure.idempotency_key = idempotency_key
        failure.request_id = failure.request_id or request_id
        return failure, self.delay_before_retry_s(failure)

    def delay_before_retry_s(self, failure: OrgBillingError) -> float | None:
        failure.attempts = self.count
        if not isinstance(failure, Unavailable) or self.count >= self._policy.attempts_max:
            return None
        policy = self._policy
        ceiling_s = min(policy.backoff_max_s,
                        policy.backoff_initial_s * policy.backoff_multiplier ** (self.count - 1))
        delay_s = max(random.uniform(0, ceiling_s), failure.retry_delay_s or 0.0)
        if self._clock() + delay_s >= self._ends_at:
            return None
        return delay_s
