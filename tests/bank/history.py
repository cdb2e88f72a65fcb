"""What the callers did: every operation with its idempotency key, each
attempt's outcome, and how it finally resolved."""

import collections
import dataclasses
import enum
import threading

import grpc


class Outcome(enum.Enum):
    ACKNOWLEDGED = "acknowledged"
    REFUSED = "refused"  # a definite error: the operation did nothing
    INDETERMINATE = "indeterminate"  # it may or may not have happened


# Codes that say the operation was not applied (and never will be, by this
# key): the server looked at it and said no.
DEFINITE_REFUSALS = frozenset({
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
})

# Codes no valid request may ever get: a bug. They are retried like
# indeterminate answers, and reported as violations.
SERVER_BUGS = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                         grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.DATA_LOSS})

# Refusals the harness's requests are built never to get: a refund always
# names a deduction acknowledged in its org, so it is never NOT_FOUND.
UNEXPECTED_REFUSAL_REASONS = frozenset({"IDEMPOTENCY_KEY_REUSED", "INVALID_ARGUMENT",
                                        "DEDUCTION_NOT_FOUND"})


def outcome_of(code: grpc.StatusCode) -> Outcome:
    """DEADLINE_EXCEEDED, CANCELLED, UNAVAILABLE (connection lost, refused,
    database down), RESOURCE_EXHAUSTED and ABORTED leave the operation's fate
    open: it is retried with the same key until it resolves."""
    if code in DEFINITE_REFUSALS:
        return Outcome.REFUSED
    return Outcome.INDETERMINATE


@dataclasses.dataclass
class Operation:
    """One logical operation: one idempotency key, one request, however many
    attempts it takes."""

    number: int
    kind: str  # deduct, hold, commit, release, refund, check, add, allocate_raise, ...
    method: str  # the RPC's name
    request: object
    org_id: str
    user_id: str
    # The charge (a refund's is negative: it gives back), the credits added,
    # or the new limit.
    amount_millicredits: int
    idempotency_key: str
    attempts: int = 0
    indeterminate_attempts: int = 0
    outcome: Outcome = Outcome.INDETERMINATE
    reason: str = ""  # of a refusal
    effect_id: str = ""  # the deduction_id, event_id, reservation_id or refund_id acknowledged
    refunded_deduction_id: str = ""  # of a refund: the deduction it gives back
    # (replica, deadline s, sent at, answered at, code, reason) of each
    # attempt, times as time.time(): to explain a violation, next to the
    # servers' logs and the uuidv7 ids of the rows.
    trail: list[tuple] = dataclasses.field(default_factory=list)

    def describe_trail(self) -> str:
        return "; ".join(f"{replica} deadline {deadline:g}s sent {sent:.3f} answered {answered:.3f}"
                         f" {code}{' ' + reason if reason else ''}"
                         for replica, deadline, sent, answered, code, reason in self.trail)


class History:
    """Thread-safe log of operations and counters."""

    def __init__(self):
        self._lock = threading.Lock()
        self._operations: list[Operation] = []
        self.counters: collections.Counter[str] = collections.Counter()
        self.client_violations: list[str] = []

    def begin(self, operation: Operation) -> None:
        """Recorded before the first attempt is sent, so that any effect the
        checker finds belongs to a known operation."""
        with self._lock:
            self._operations.append(operation)
            self.counters["attempted"] += 1
            self.counters[f"attempted/{operation.kind}"] += 1

    def count(self, name: str, by: int = 1) -> None:
        with self._lock:
            self.counters[name] += by

    def violation(self, description: str) -> None:
        with self._lock:
            self.client_violations.append(description)

    def resolve(self, operation: Operation, outcome: Outcome, reason: str = "",
                effect_id: str = "") -> None:
        with self._lock:
            operation.reason = reason
            operation.effect_id = effect_id
            operation.outcome = outcome
            # Never sent again: keeping only what the checker reads bounds
            # the memory of a long soak.
            operation.request = None

    def snapshot(self) -> list[Operation]:
        """Copies of the operations so far, each as it stood at one moment."""
        with self._lock:
            return [dataclasses.replace(operation) for operation in self._operations]
