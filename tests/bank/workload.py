"""The callers: a seeded random mix of charges, holds (reserved, then
committed, released or left to expire), refunds of acknowledged charges,
checks, top-ups and allocation changes over a few organizations, each
operation retried with its own key until it resolves."""

import collections
import dataclasses
import random
import threading
import time

import grpc

from orgbilling.v1 import credit_service_pb2 as credit_pb
from orgbilling.v1 import org_billing_service_pb2 as billing_pb
from orgbilling.v1 import types_pb2
from tests.bank.connect import Connection
from tests.bank.history import (
    SERVER_BUGS, UNEXPECTED_REFUSAL_REASONS, History, Operation, Outcome, outcome_of,
)
from tests.support import error_reason

SERVICE_OF_METHOD = {
    "CheckCredits": "credits", "DeductCredits": "credits",
    "ReserveCredits": "credits", "CommitReservation": "credits", "ReleaseReservation": "credits",
    "RefundCredits": "credits",
    "CreateSubscription": "billing", "AddCredits": "billing",
    "AllocateCredits": "billing", "RevokeAllocation": "billing",
}
MUTATIONS = frozenset({"DeductCredits", "CreateSubscription", "AddCredits",
                       "AllocateCredits", "RevokeAllocation", "ReserveCredits",
                       "CommitReservation", "ReleaseReservation", "RefundCredits"})


@dataclasses.dataclass(frozen=True)
class WorkloadShape:
    """Few organizations and users, many callers: contention is the point.
    The pools are small next to the rate of charges, so they run dry, and
    top-ups and raises keep them hovering near zero."""

    orgs: int = 3
    users_per_org: int = 4
    callers: int = 32
    initial_pool_millicredits: int = 200_000
    initial_limit_millicredits: int = 40_000
    # Relative weights of the kinds of operation.
    mix: tuple[tuple[str, int], ...] = (
        ("deduct", 57), ("hold", 12), ("refund", 6), ("check", 15), ("add", 8),
        ("allocate_raise", 10), ("allocate_lower", 6), ("revoke", 4),
    )
    # One acknowledged charge in this many is offered to refunds, and
    # refunds pick among the last few offered: so each offered charge gets
    # several refunds, some at once from different callers, whose sum often
    # passes what it charged (the last of them is then refused).
    refund_offer_every: int = 8
    refund_candidates: int = 8
    # The deadline of one attempt, in seconds, with weights: the short ones
    # cancel calls mid-flight.
    attempt_timeouts_s: tuple[tuple[float, int], ...] = (
        (3.0, 60), (1.0, 20), (0.3, 10), (0.1, 6), (0.02, 4),
    )

    def org_ids(self) -> list[str]:
        return [f"bank-org-{n}" for n in range(self.orgs)]

    def user_ids(self) -> list[str]:
        return [f"user-{n}" for n in range(self.users_per_org)]


class UsageHints:
    """What callers last saw of each allocation's use, so that raises and
    cuts land near it, and the charges lately acknowledged, so that refunds
    name real deductions. Approximate on purpose: only the choice of
    operations depends on it, never a check."""

    def __init__(self, shape: WorkloadShape):
        self._lock = threading.Lock()
        self._used: dict[tuple[str, str], int] = {}
        self._offer_every = shape.refund_offer_every
        self._charges_seen = 0
        self._refund_candidates: collections.deque[Operation] = collections.deque(
            maxlen=shape.refund_candidates)
        self._given_back: collections.Counter[str] = collections.Counter()  # deduction_id -> refunded

    def used(self, org_id: str, user_id: str) -> int:
        with self._lock:
            return self._used.get((org_id, user_id), 0)

    def charged(self, org_id: str, user_id: str, amount: int) -> None:
        with self._lock:
            self._used[(org_id, user_id)] = self._used.get((org_id, user_id), 0) + amount

    def saw(self, org_id: str, user_id: str, used: int) -> None:
        with self._lock:
            self._used[(org_id, user_id)] = max(used, self._used.get((org_id, user_id), 0))

    def acknowledged_charge(self, charge: Operation) -> None:
        with self._lock:
            self._charges_seen += 1
            if self._charges_seen % self._offer_every == 0:
                self._refund_candidates.append(charge)

    def refunded(self, deduction_id: str, amount: int) -> None:
        with self._lock:
            self._given_back[deduction_id] += amount

    def charge_to_refund(self, rng: random.Random) -> tuple[Operation, int] | None:
        """One of the charges lately offered to refunds, and how much of it
        callers have seen refunded; None before any."""
        with self._lock:
            candidates = list(self._refund_candidates)
            if not candidates:
                return None
            charge = rng.choice(candidates)
            return charge, self._given_back[charge.effect_id]


class OperationFactory:
    """Draws the next operation of one caller from its own random stream."""

    def __init__(self, shape: WorkloadShape, hints: UsageHints, key_prefix: str):
        self._shape = shape
        self._hints = hints
        self._key_prefix = key_prefix
        self._kinds = [kind for kind, _ in shape.mix]
        self._weights = [weight for _, weight in shape.mix]
        self._numbers = 0

    def next(self, rng: random.Random) -> Operation:
        self._numbers += 1
        kind = rng.choices(self._kinds, self._weights)[0]
        org_id = rng.choice(self._shape.org_ids())
        user_id = rng.choice(self._shape.user_ids())
        key = f"{self._key_prefix}-{self._numbers}"
        if kind == "refund":
            # Of whichever org and user the charge was: which charge depends
            # on timing, as the limits that hints choose do.
            chosen = self._hints.charge_to_refund(rng)
            if chosen is not None:
                return self._refund(rng, *chosen, key)
            kind = "deduct"  # nothing acknowledged yet to give back
        build = getattr(self, f"_{kind}")
        method, request, amount = build(rng, org_id, user_id, key)
        return Operation(self._numbers, kind, method, request, org_id, user_id, amount, key)

    def _deduct(self, rng, org_id, user_id, key):
        amount = rng.randint(1, 4_000)
        return "DeductCredits", credit_pb.DeductCreditsRequest(
            org_id=org_id, user_id=user_id, amount_millicredits=amount, service_type="llm",
            service_name="bank", idempotency_key=key, metadata={"workload": "bank"},
        ), amount

    def _hold(self, rng, org_id, user_id, key):
        # Short TTLs among them, so that some holds expire under the callers.
        amount = rng.randint(1, 4_000)
        request = credit_pb.ReserveCreditsRequest(
            org_id=org_id, user_id=user_id, amount_millicredits=amount, service_type="llm",
            service_name="bank", idempotency_key=key, metadata={"workload": "bank"})
        request.ttl.FromSeconds(rng.choice([1, 2, 30]))
        return "ReserveCredits", request, amount

    def follow_up(self, rng: random.Random, hold: Operation) -> Operation | None:
        """What becomes of an acknowledged hold: a commit (of less or more
        than held), a release, or nothing (it expires)."""
        roll = rng.random()
        if roll >= 0.85:
            return None
        self._numbers += 1
        key = f"{self._key_prefix}-{self._numbers}"
        if roll < 0.55:
            amount = rng.randint(1, hold.amount_millicredits * 3 // 2 + 1)
            method, kind = "CommitReservation", "commit"
            request = credit_pb.CommitReservationRequest(
                org_id=hold.org_id, reservation_id=hold.effect_id, amount_millicredits=amount,
                idempotency_key=key, metadata={"tokens": str(amount)})
        else:
            amount, method, kind = 0, "ReleaseReservation", "release"
            request = credit_pb.ReleaseReservationRequest(
                org_id=hold.org_id, reservation_id=hold.effect_id, idempotency_key=key)
        return Operation(self._numbers, kind, method, request, hold.org_id, hold.user_id, amount, key)

    def _refund(self, rng: random.Random, charge: Operation, seen_refunded: int, key: str) -> Operation:
        """Gives back part or all of a charge; or exactly what seems left of
        it (the boundary: all of it if nothing raced it, else refused); now
        and then more than it charged, which is refused whatever came before."""
        roll = rng.random()
        if roll < 0.1:
            amount = charge.amount_millicredits + rng.randint(1, 1_000)
        elif roll < 0.3:
            amount = max(1, charge.amount_millicredits - seen_refunded)
        else:
            amount = rng.randint(1, charge.amount_millicredits)
        request = credit_pb.RefundCreditsRequest(
            org_id=charge.org_id, deduction_id=charge.effect_id, amount_millicredits=amount,
            reason="bank", idempotency_key=key)
        # Negative: what a refund takes off the charges of its allocation and pool.
        return Operation(self._numbers, "refund", "RefundCredits", request, charge.org_id,
                         charge.user_id, -amount, key, refunded_deduction_id=charge.effect_id)

    def _check(self, rng, org_id, user_id, key):
        amount = rng.randint(1, 4_000)
        return "CheckCredits", credit_pb.CheckCreditsRequest(
            org_id=org_id, user_id=user_id, amount_millicredits=amount), amount

    def _add(self, rng, org_id, user_id, key):
        # Small next to what is charged, so unallocated credits run out and
        # raises and removals get refused too.
        roll = rng.random()
        if roll < 0.15:
            cents = 1
            return "AddCredits", billing_pb.AddCreditsRequest(
                org_id=org_id, source=types_pb2.CREDIT_SOURCE_PURCHASE, amount_paid_cents=cents,
                currency="USD", payment_reference=f"pay-{key}", idempotency_key=key,
            ), cents * 10_000
        if roll < 0.30:
            amount = -rng.randint(1_000, 10_000)  # a removal, refused when it would overdraw
            source = types_pb2.CREDIT_SOURCE_ADJUSTMENT
        else:
            amount = rng.randint(1_000, 8_000)
            source = types_pb2.CREDIT_SOURCE_GRANT
        return "AddCredits", billing_pb.AddCreditsRequest(
            org_id=org_id, source=source, amount_millicredits=amount, reason="bank",
            idempotency_key=key,
        ), amount

    def _allocate(self, org_id, user_id, key, limit):
        return "AllocateCredits", billing_pb.AllocateCreditsRequest(
            org_id=org_id, user_id=user_id, limit_millicredits=limit,
            reset_period=types_pb2.RESET_PERIOD_NEVER, idempotency_key=key,
        ), limit

    def _allocate_raise(self, rng, org_id, user_id, key):
        return self._allocate(org_id, user_id, key,
                              self._hints.used(org_id, user_id) + rng.randint(2_000, 30_000))

    def _allocate_lower(self, rng, org_id, user_id, key):
        # Often below what is used: remaining is then 0 and charges are refused.
        return self._allocate(org_id, user_id, key,
                              max(0, self._hints.used(org_id, user_id) + rng.randint(-5_000, 1_000)))

    def _revoke(self, rng, org_id, user_id, key):
        return "RevokeAllocation", billing_pb.RevokeAllocationRequest(
            org_id=org_id, user_id=user_id, idempotency_key=key), 0


class Settler:
    """Sends an operation to random replicas until it resolves: each attempt
    with the same key and request, and a deadline drawn from the shape."""

    def __init__(self, connections: list[Connection], history: History, hints: UsageHints,
                 shape: WorkloadShape):
        self._connections = connections
        self._history = history
        self._hints = hints
        self._timeouts = [timeout for timeout, _ in shape.attempt_timeouts_s]
        self._timeout_weights = [weight for _, weight in shape.attempt_timeouts_s]

    def settle(self, operation: Operation, rng: random.Random, give_up, timeout_s: float | None = None) -> bool:
        """Attempts until the operation resolves (True) or give_up() says to
        stop (False: it stays indeterminate, for the resolution phase)."""
        backoff_s = 0.02
        while True:
            connection = rng.choice(self._connections)
            attempt_timeout = timeout_s or rng.choices(self._timeouts, self._timeout_weights)[0]
            if self._attempt(operation, connection, attempt_timeout):
                return True
            if give_up():
                return False
            time.sleep(backoff_s * rng.uniform(0.5, 1.5))
            backoff_s = min(1.0, backoff_s * 2)

    def _attempt(self, operation: Operation, connection: Connection, timeout_s: float) -> bool:
        stub = getattr(connection, SERVICE_OF_METHOD[operation.method])
        operation.attempts += 1
        self._history.count("attempts")
        sent = time.time()
        try:
            response = getattr(stub, operation.method)(
                operation.request, timeout=timeout_s, metadata=connection.metadata)
        except grpc.RpcError as error:
            operation.trail.append((connection.address, timeout_s, sent, time.time(),
                                    error.code().name, error_reason(error)))
            return self._failed(operation, error)
        operation.trail.append((connection.address, timeout_s, sent, time.time(), "OK", None))
        self._acknowledged(operation, response)
        return True

    def _failed(self, operation: Operation, error: grpc.RpcError) -> bool:
        code = error.code()
        if outcome_of(code) is Outcome.REFUSED:
            reason = error_reason(error)
            if reason is None:
                self._history.violation(f"{operation.method} {operation.idempotency_key}: "
                                        f"{code.name} without ErrorInfo: {error.details()}")
            elif reason in UNEXPECTED_REFUSAL_REASONS:
                self._history.violation(f"{operation.method} {operation.idempotency_key}: "
                                        f"refused {code.name} {reason} (attempt {operation.attempts})")
            self._history.count(f"reason {reason or code.name}")
            self._history.resolve(operation, Outcome.REFUSED, reason=reason or code.name)
            return True
        if code in SERVER_BUGS:
            self._history.violation(f"{operation.method} {operation.idempotency_key}: "
                                    f"{code.name}: {error.details()}")
        operation.indeterminate_attempts += 1
        self._history.count(f"indeterminate attempts {code.name}")
        return False

    def _acknowledged(self, operation: Operation, response) -> None:
        for problem in ack_problems(operation, response):
            self._history.violation(f"{operation.method} {operation.idempotency_key}: {problem}")
        if getattr(response, "replayed", False):
            # On a first attempt this is the server's own retry on a fresh
            # connection after the first one died past its commit: correct
            # (charged once), so counted, not a violation.
            replay = ("acknowledged as a replay" if operation.indeterminate_attempts
                      else "replayed on the first attempt")
            self._history.count(replay)
            self._history.count(f"{replay}/{operation.kind}")
        self._history.resolve(operation, Outcome.ACKNOWLEDGED,
                              effect_id=getattr(response, "deduction_id", "") or getattr(response, "event_id", "")
                              or getattr(response, "reservation_id", "") or getattr(response, "refund_id", ""))
        if operation.method in ("DeductCredits", "CommitReservation"):
            self._hints.acknowledged_charge(operation)
        elif operation.method == "RefundCredits":
            self._hints.refunded(operation.refunded_deduction_id, -operation.amount_millicredits)
        if operation.method in ("DeductCredits", "CommitReservation", "RefundCredits") and not response.replayed:
            self._hints.charged(operation.org_id, operation.user_id, operation.amount_millicredits)
        elif operation.method == "AllocateCredits":
            self._hints.saw(operation.org_id, operation.user_id, response.allocation.used_millicredits)


def ack_problems(operation: Operation, response) -> list[str]:
    """What an acknowledgement alone shows to be wrong."""
    problems = []
    if operation.method in ("DeductCredits", "CommitReservation", "ReserveCredits", "RefundCredits"):
        if min(response.allocation_remaining_millicredits, response.pool_spendable_millicredits) < 0:
            problems.append(f"a negative balance acknowledged: {response}")
        id_field = {"ReserveCredits": "reservation_id", "RefundCredits": "refund_id"}.get(
            operation.method, "deduction_id")
        if not getattr(response, id_field):
            problems.append(f"acknowledged without a {id_field}")
    elif operation.method == "AddCredits":
        if response.added_millicredits != operation.amount_millicredits:
            problems.append(f"added {response.added_millicredits}, asked {operation.amount_millicredits}")
    elif operation.method == "AllocateCredits":
        if response.allocation.limit_millicredits != operation.amount_millicredits:
            problems.append(f"limit {response.allocation.limit_millicredits}, asked {operation.amount_millicredits}")
    return problems


class Caller(threading.Thread):
    """One client thread: draws operations and settles each in turn until
    the run's end. Its operations come from its own seeded stream; timing
    (replica, deadline, backoff) from another, so that faults and retries do
    not shift the sequence of operations."""

    def __init__(self, index: int, seed: int, shape: WorkloadShape, settler: Settler,
                 history: History, hints: UsageHints, stop: threading.Event):
        super().__init__(name=f"caller-{index}", daemon=True)
        self._operations_rng = random.Random(f"{seed}:operations:{index}")
        self._timing_rng = random.Random(f"{seed}:timing:{index}")
        self._factory = OperationFactory(shape, hints, key_prefix=f"s{seed}-c{index}")
        self._settler = settler
        self._history = history
        self._stopping = stop
        self.unresolved: list[Operation] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self._stopping.is_set():
                operation = self._factory.next(self._operations_rng)
                self._history.begin(operation)
                if not self._settler.settle(operation, self._timing_rng, self._stopping.is_set):
                    self.unresolved.append(operation)
                elif operation.method == "ReserveCredits" and operation.outcome is Outcome.ACKNOWLEDGED:
                    follow_up = self._factory.follow_up(self._operations_rng, operation)
                    if follow_up is not None:
                        self._history.begin(follow_up)
                        if not self._settler.settle(follow_up, self._timing_rng, self._stopping.is_set):
                            self.unresolved.append(follow_up)
        except BaseException as error:  # noqa: BLE001: reported by the run, not lost in a thread
            self.error = error
