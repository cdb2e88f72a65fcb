"""The error model: every failure is a google.rpc.Status with one ErrorInfo.

Servicers and the store raise ServiceError; the error interceptor turns it
(and any database failure or bug) into the status the caller sees.
"""

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "orgbilling"


class ServiceError(Exception):
    """A failure the caller can act on, with its gRPC code and reason."""

    def __init__(
        self,
        code: grpc.StatusCode,
        reason: str,
        message: str,
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

    def to_status(self) -> grpc.Status:
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
        return rpc_status.to_status(
            status_pb2.Status(
                code=getattr(code_pb2, self.code.name), message=self.message, details=packed
            )
        )


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
}


def refusal(outcome: str, **metadata) -> ServiceError:
    """The ServiceError for a ledger function's refusal outcome."""
    code, message = _OUTCOMES.get(outcome, (grpc.StatusCode.INTERNAL, "internal error"))
    if code is grpc.StatusCode.INTERNAL:
        raise AssertionError(f"unknown ledger outcome {outcome!r}")
    return ServiceError(code, outcome, message, metadata=metadata)


def deadline_exceeded() -> ServiceError:
    return ServiceError(
        grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED",
        "the caller's deadline passed before the work was done",
    )


def server_busy(message: str) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "SERVER_BUSY", message, retry_after_s=0.1
    )
