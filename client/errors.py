"""What a call can end in besides a result: one class per thing a caller does
about it, built from the status's ErrorInfo (reason and metadata) and never
from its message text. Every error keeps the call's request ID.

    OrgBillingError
    ├── InvalidArgument            fix the request (field_violations says where)
    ├── Unauthenticated            fix the credentials
    ├── PermissionDenied           this credential may not do this
    ├── NotFound                   OrgNotFound, SubscriptionNotFound, ReservationNotFound, DeductionNotFound
    ├── AlreadyExists
    ├── FailedPrecondition         InsufficientCredits, AllocationNotFound, KeyReused, ReservationNotOpen, BatchNotApplied
    ├── Unavailable                nothing known to be done: retry later with the same idempotency key
    │   ├── DeadlineExceeded       (the outcome is unknown)
    │   └── Overloaded             (refused before any work: rate limit or busy server)
    └── InternalError
"""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2

ERROR_DOMAIN = "orgbilling"
REQUEST_ID_HEADER = "x-request-id"
_STATUS_DETAILS_HEADER = "grpc-status-details-bin"


class OrgBillingError(Exception):
    """A call that did not succeed. `reason` is the ErrorInfo's reason (the
    status code's name when the failure came from the transport, before the
    service answered); `metadata` the numbers that go with it;
    `idempotency_key` the key the operation was sent with, to retry it
    later; `attempts` how many times it was sent."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str, *,
                 metadata: dict[str, str] | None = None, request_id: str | None = None,
                 field_violations: tuple[tuple[str, str], ...] = (),
                 retry_delay_s: float | None = None, from_service: bool = True):
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.metadata = dict(metadata or {})
        self.request_id = request_id
        self.field_violations = tuple(field_violations)
        self.retry_delay_s = retry_delay_s
        self.from_service = from_service
        self.idempotency_key: str | None = None
        self.attempts = 1

    def __str__(self) -> str:
        return f"{self.code.name} {self.reason}: {self.message} (request ID {self.request_id})"

    def _int(self, name: str) -> int | None:
        value = self.metadata.get(name)
        return None if value in (None, "", "None") else int(value)


class InvalidArgument(OrgBillingError):
    """The request is malformed or out of range; field_violations lists the fields."""


class Unauthenticated(OrgBillingError):
    """No, malformed, invalid or expired credentials (metadata `cause`)."""


class PermissionDenied(OrgBillingError):
    """A valid credential without the scope, or not for this organization."""


class NotFound(OrgBillingError):
    pass


class OrgNotFound(NotFound):
    pass


class SubscriptionNotFound(NotFound):
    pass


class ReservationNotFound(NotFound):
    pass


class DeductionNotFound(NotFound):
    pass


class AlreadyExists(OrgBillingError):
    pass


class FailedPrecondition(OrgBillingError):
    """The request is well formed but the ledger refuses it as things are."""


class InsufficientCredits(FailedPrecondition):
    """Not enough credits: nothing was charged or held."""

    @property
    def available_millicredits(self) -> int | None:
        return self._int("available_millicredits")

    @property
    def requested_millicredits(self) -> int | None:
        return self._int("requested_millicredits")

    @property
    def allocation_remaining_millicredits(self) -> int | None:
        return self._int("allocation_remaining_millicredits")

    @property
    def pool_spendable_millicredits(self) -> int | None:
        return self._int("pool_spendable_millicredits")


class AllocationNotFound(FailedPrecondition):
    """The user has no allocation in this organization."""


class KeyReused(FailedPrecondition):
    """This idempotency key was already used for a different request."""


class ReservationNotOpen(FailedPrecondition):
    """The reservation was already committed, released or expired (`state`)."""

    @property
    def state(self) -> str | None:
        return self.metadata.get("state")


class BatchNotApplied(FailedPrecondition):
    """An all-or-nothing batch with refused items: nothing was charged. The
    refusals stay under their keys (the same batch again is refused again):
    to try the refused items again, send them under new keys."""

    @property
    def refused_items(self) -> list[int]:
        listed = self.metadata.get("refused_items", "")
        return [int(index) for index in listed.split(",") if index]


class Unavailable(OrgBillingError):
    """The service could not be reached or could not tell, within the retry
    budget. Nothing is known to have happened: send the same operation again
    later with the same `idempotency_key` and it is done at most once."""


class DeadlineExceeded(Unavailable):
    """The deadline passed: the operation may or may not have been done."""


class Overloaded(Unavailable):
    """Refused before any work (rate limit, busy or stopping server)."""


class InternalError(OrgBillingError):
    """A bug in the service: the request ID finds its log lines."""


_BY_REASON: dict[str, type[OrgBillingError]] = {
    "INSUFFICIENT_CREDITS": InsufficientCredits,
    "ALLOCATION_NOT_FOUND": AllocationNotFound,
    "IDEMPOTENCY_KEY_REUSED": KeyReused,
    "RESERVATION_NOT_OPEN": ReservationNotOpen,
    "BATCH_NOT_APPLIED": BatchNotApplied,
    "ORG_NOT_FOUND": OrgNotFound,
    "SUBSCRIPTION_NOT_FOUND": SubscriptionNotFound,
    "RESERVATION_NOT_FOUND": ReservationNotFound,
    "DEDUCTION_NOT_FOUND": DeductionNotFound,
}

_BY_CODE: dict[grpc.StatusCode, type[OrgBillingError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.INTERNAL: InternalError,
}

# Failures from the transport rather than the service (no ErrorInfo of
# ours): the request may or may not have reached the service, so they are
# retried like UNAVAILABLE, the idempotency key making that safe.
_TRANSPORT_UNKNOWN_OUTCOME = {
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED,
}


def error_class(code: grpc.StatusCode, reason: str, *, from_service: bool) -> type[OrgBillingError]:
    if not from_service and code in _TRANSPORT_UNKNOWN_OUTCOME:
        return DeadlineExceeded if code is grpc.StatusCode.DEADLINE_EXCEEDED else Unavailable
    return _BY_REASON.get(reason) or _BY_CODE.get(code, OrgBillingError)


def make_error(code: grpc.StatusCode, reason: str, message: str, *, from_service: bool = True,
               **fields) -> OrgBillingError:
    return error_class(code, reason, from_service=from_service)(
        code, reason, message, from_service=from_service, **fields)


def request_id_in(metadata) -> str | None:
    for key, value in metadata or ():
        if key == REQUEST_ID_HEADER:
            return value
    return None


def error_from_status(code: grpc.StatusCode, details: str | None, trailing_metadata) -> OrgBillingError:
    """The typed error for a failed call, from its code and trailers: the
    google.rpc.Status in grpc-status-details-bin carries the ErrorInfo, the
    BadRequest and the RetryInfo."""
    status = None
    for key, value in trailing_metadata or ():
        if key == _STATUS_DETAILS_HEADER:
            status = status_pb2.Status.FromString(value)
    info, violations, retry_delay_s = None, (), None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations = tuple((v.field, v.description) for v in bad_request.field_violations)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry_info = error_details_pb2.RetryInfo()
            detail.Unpack(retry_info)
            retry_delay_s = retry_info.retry_delay.ToNanoseconds() / 1e9
    from_service = info is not None and info.domain == ERROR_DOMAIN
    return make_error(
        code, info.reason if from_service else code.name,
        status.message if status is not None else (details or code.name),
        from_service=from_service,
        metadata=dict(info.metadata) if from_service else None,
        request_id=request_id_in(trailing_metadata),
        field_violations=violations, retry_delay_s=retry_delay_s,
    )


def error_from_rpc_error(error: grpc.RpcError) -> OrgBillingError:
    """The typed error for a grpc (sync) RpcError."""
    return error_from_status(error.code(), error.details(), error.trailing_metadata())
