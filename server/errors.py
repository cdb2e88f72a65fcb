"""The error model: every failure is a google.rpc.Status with one ErrorInfo.

Every reason the server sends is built here, by one function each, so that
a reason's code, message and metadata are the same wherever it is raised.
Servicers, interceptors and the store raise the ServiceError these build;
the interceptor chain (server.interceptors) turns it, and any database
failure or bug, into the status the caller sees (status_for).
"""

import logging

import grpc
import psycopg
import psycopg_pool
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "orgbilling"

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """A failure the caller can act on, with its gRPC code and reason."""

    def __init__(
        self,
        code: grpc.StatusCode,
        reason: str,
        message: str,
        *,
        metadata: dict[str, object] | None = None,
        field_violations: list[tuple[str, str]] = (),
        retry_after_s: float | None = None,
    ):
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.metadata = {key: str(value) for key, value in (metadata or {}).items()}
        self.field_violations = list(field_violations)
        self.retry_after_s = retry_after_s

    def to_status(self, trailing_metadata: tuple[tuple[str, str], ...] = ()) -> grpc.Status:
        """The status for abort_with_status; `trailing_metadata` travels with it."""
        details = [
            error_details_pb2.ErrorInfo(
                reason=self.reason, domain=ERROR_DOMAIN, metadata=self.metadata
            )
        ]
        if self.field_violations:
            details.append(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                        for f, d in self.field_violations
                    ]
                )
            )
        if self.retry_after_s is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(self.retry_after_s * 1e9))
            details.append(error_details_pb2.RetryInfo(retry_delay=delay))
        packed = []
        for detail in details:
            holder = any_pb2.Any()
            holder.Pack(detail)
            packed.append(holder)
        status = rpc_status.to_status(
            status_pb2.Status(
                code=getattr(code_pb2, self.code.name), message=self.message, details=packed
            )
        )
        if trailing_metadata:
            status = status._replace(trailing_metadata=(*trailing_metadata, *status.trailing_metadata))
        return status


def invalid_argument(violations: list[tuple[str, str]]) -> ServiceError:
    fields = ", ".join(field for field, _ in violations)
    return ServiceError(
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        f"invalid request: {fields}",
        metadata={"fields": fields},
        field_violations=violations,
    )


def unavailable(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE", message)


# What each refusal from the ledger functions means to the caller.
_OUTCOMES: dict[str, tuple[grpc.StatusCode, str]] = {
    "INSUFFICIENT_CREDITS": (grpc.StatusCode.FAILED_PRECONDITION, "not enough credits"),
    "INSUFFICIENT_UNALLOCATED_CREDITS": (
        grpc.StatusCode.FAILED_PRECONDITION,
        "the pool has not enough unallocated credits for this limit",
    ),
    "ALLOCATION_NOT_FOUND": (
        grpc.StatusCode.FAILED_PRECONDITION,
        "the user has no allocation in this organization",
    ),
    "IDEMPOTENCY_KEY_REUSED": (
        grpc.StatusCode.FAILED_PRECONDITION,
        "this idempotency key was already used for a different request",
    ),
    "PLAN_UNCHANGED": (
        grpc.StatusCode.FAILED_PRECONDITION,
        "the subscription is already on this plan and cycle",
    ),
    "POOL_TOTAL_LIMIT_EXCEEDED": (
        grpc.StatusCode.FAILED_PRECONDITION,
        "the pool's total would exceed its limit",
    ),
    "ORG_NOT_FOUND": (grpc.StatusCode.NOT_FOUND, "unknown organization"),
    "SUBSCRIPTION_NOT_FOUND": (
        grpc.StatusCode.NOT_FOUND,
        "the organization has no live subscription",
    ),
    "SUBSCRIPTION_EXISTS": (
        grpc.StatusCode.ALREADY_EXISTS,
        "the organization already has a live subscription",
    ),
    "PAYMENT_ALREADY_RECORDED": (
        grpc.StatusCode.ALREADY_EXISTS,
        "this payment reference was already recorded",
    ),
    "INVALID_AMOUNT": (grpc.StatusCode.INVALID_ARGUMENT, "the amount is out of range"),
    "INVALID_TTL": (grpc.StatusCode.INVALID_ARGUMENT, "the reservation's ttl is out of range"),
    # Reservations (35_reservations.sql). A reservation of another
    # organization is not found either: ids are global, lookups are per org.
    "RESERVATION_NOT_FOUND": (
        grpc.StatusCode.NOT_FOUND,
        "the organization has no reservation with this id",
    ),
    # Metadata: the reservation's `state` (COMMITTED, RELEASED or EXPIRED).
    "RESERVATION_NOT_OPEN": (
        grpc.StatusCode.FAILED_PRECONDITION,
        "the reservation was already committed, released or expired: it resolves once",
    ),
    # Refunds (37_refunds.sql). A deduction of another organization is not
    # found either, nor is a refund's own id: only deductions are refunded.
    "DEDUCTION_NOT_FOUND": (
        grpc.StatusCode.NOT_FOUND,
        "the organization has no deduction with this id",
    ),
    # Metadata: `refundable_millicredits`, what the deduction may still give
    # back, and `requested_millicredits`.
    "REFUND_EXCEEDS_DEDUCTION": (
        grpc.StatusCode.FAILED_PRECONDITION,
        "the refunds of a deduction may not add up to more than it charged",
    ),
    # SetOverage (40_pools_and_allocations.sql). Metadata: `in_use_millicredits`,
    # the overage in use now (used plus reserved beyond total), the least
    # limit allowed, and `requested_millicredits`.
    "OVERAGE_IN_USE": (
        grpc.StatusCode.FAILED_PRECONDITION,
        "the overage limit may not be below the overage in use",
    ),
    # RecordInvoice (55_invoices.sql). Metadata: INVOICE_FINAL carries the
    # invoice's `current_status`; INVOICE_MISMATCH (and IDEMPOTENCY_KEY_REUSED,
    # for a recorded event) the request `field` whose value differs.
    "INVOICE_FINAL": (
        grpc.StatusCode.FAILED_PRECONDITION,
        "the invoice is already paid or voided: it takes no other status",
    ),
    "INVOICE_MISMATCH": (
        grpc.StatusCode.FAILED_PRECONDITION,
        "the invoice was first recorded with another amount, currency or period",
    ),
}


def refusal(outcome: str, **metadata) -> ServiceError:
    """The ServiceError for a ledger function's refusal outcome."""
    if outcome not in _OUTCOMES:
        raise AssertionError(f"unknown ledger outcome {outcome!r}")
    code, message = _OUTCOMES[outcome]
    return ServiceError(code, outcome, message, metadata=metadata)


def batch_not_applied(*, refused_items: list[int], item_count: int,
                      first_refused_reason: str) -> ServiceError:
    """An all-or-nothing batch in which some items were refused, so it
    charged nothing (an item replaying an earlier call's charge stays as
    that call left it). At most 100 item indexes are listed, so that a batch
    of thousands cannot make the error itself too large to send."""
    return ServiceError(
        grpc.StatusCode.FAILED_PRECONDITION, "BATCH_NOT_APPLIED",
        f"{len(refused_items)} of {item_count} deductions were refused, so this call charged none",
        metadata={
            "refused_items": ",".join(map(str, refused_items[:100])),
            "refused_count": len(refused_items),
            "first_refused_item": refused_items[0],
            "first_refused_reason": first_refused_reason,
        },
    )


# Authentication and authorization (server.auth, server.interceptors.auth).


def unauthenticated(cause: str, message: str) -> ServiceError:
    """No or bad credentials. `cause` is one of missing, malformed, invalid,
    expired, unsupported: what the caller has to fix."""
    return ServiceError(
        grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", message, metadata={"cause": cause}
    )


def credentials_unverifiable(message: str) -> ServiceError:
    """The server cannot tell whether the credentials are good right now
    (keys not loaded yet, identity provider unreachable): fail closed, retryable."""
    return ServiceError(grpc.StatusCode.UNAVAILABLE, "CREDENTIALS_UNVERIFIABLE", message)


def missing_scope(method: str, scope: str) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.PERMISSION_DENIED, "MISSING_SCOPE",
        f"this credential lacks the scope {scope}, which {method} requires",
        metadata={"required_scope": scope, "method": method},
    )


def org_not_permitted(org_id: str | None) -> ServiceError:
    """`org_id` None: the call names no organization at all."""
    if org_id is None:
        message = "this credential is limited to some organizations, and this call names none"
        metadata = None
    else:
        message = f"this credential may not act on organization {org_id!r}"
        metadata = {"org_id": org_id}
    return ServiceError(grpc.StatusCode.PERMISSION_DENIED, "ORG_NOT_PERMITTED", message,
                        metadata=metadata)


def scope_not_declared(method: str) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.PERMISSION_DENIED, "SCOPE_NOT_DECLARED",
        f"{method} has no required scope declared, so nobody may call it",
        metadata={"method": method},
    )


# The server's own state and limits.


def deadline_exceeded() -> ServiceError:
    return ServiceError(
        grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED",
        "the caller's deadline passed before the work was done",
    )


def server_busy(message: str, *, limit: str, retry_after_s: float = 0.1) -> ServiceError:
    """Too much at once: retry after `retry_after_s`, here or on another
    replica. `limit` names the setting that refused the call."""
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "SERVER_BUSY", message,
        metadata={"limit": limit}, retry_after_s=retry_after_s,
    )


def shutting_down() -> ServiceError:
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN",
        "the server is shutting down; retry on another replica",
    )


def malformed_request() -> ServiceError:
    return ServiceError(
        grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST",
        "the request is not a valid protocol buffer message of this method's request type",
    )


def internal() -> ServiceError:
    """A bug: the caller learns nothing but the request ID; the log has the rest."""
    return ServiceError(grpc.StatusCode.INTERNAL, "INTERNAL", "internal error")


def rate_limited(*, budget: str, rate_per_s: float, burst: int, wait_s: float) -> ServiceError:
    wait_ms = max(1, round(wait_s * 1000))
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED",
        f"this caller made too many {budget} calls; retry in {wait_ms} ms",
        metadata={"budget": budget, "rate_per_s": rate_per_s, "burst": burst,
                  "retry_after_ms": wait_ms},
        retry_after_s=wait_s,
    )


def status_for(error: Exception) -> ServiceError:
    """What the caller is told about `error`: a ServiceError as it is, a
    database failure as UNAVAILABLE (fail closed), a full connection queue as
    SERVER_BUSY, and anything else, a bug, as INTERNAL (logged here, with the
    request ID, never sent)."""
    if isinstance(error, ServiceError):
        return error
    if isinstance(error, psycopg_pool.TooManyRequests):
        return server_busy("too many calls are waiting for the database", limit="pool_waiting_max")
    if isinstance(error, psycopg_pool.PoolTimeout):
        return unavailable("no database connection was free in time")
    if isinstance(error, psycopg.errors.QueryCanceled):
        return unavailable("the database did not answer in time")
    if isinstance(error, psycopg.OperationalError):
        return unavailable("the database is unavailable")
    log.error("internal error", exc_info=error)
    return internal()
