"""The client library: charging exactly once made the easy path.

    from orgbilling.client import CreditClient, InsufficientCredits, Tls

CreditClient (blocking) and AsyncCreditClient (asyncio) share one
implementation of the rules (operations.py, policy.py, channel.py); the
errors are in errors.py, the results in results.py."""

from orgbilling.client.aio import AsyncCreditClient, AsyncHold
from orgbilling.client.channel import ClientSettings, Tls
from orgbilling.client.errors import (
    AllocationNotFound,
    AlreadyExists,
    BatchNotApplied,
    DeadlineExceeded,
    DeductionNotFound,
    FailedPrecondition,
    InsufficientCredits,
    InternalError,
    InvalidArgument,
    KeyReused,
    NotFound,
    OrgBillingError,
    OrgNotFound,
    Overloaded,
    PermissionDenied,
    ReservationNotFound,
    ReservationNotOpen,
    SubscriptionNotFound,
    Unauthenticated,
    Unavailable,
)
from orgbilling.client.operations import deduction_request, new_idempotency_key
from orgbilling.client.policy import NO_RETRIES, RetryPolicy
from orgbilling.client.results import (
    BatchDeductions,
    Check,
    Deduction,
    Refund,
    Release,
    Reservation,
    Result,
)
from orgbilling.client.sync import CreditClient, Hold

__all__ = [
    "AllocationNotFound", "AlreadyExists", "AsyncCreditClient", "AsyncHold", "BatchDeductions",
    "BatchNotApplied", "Check", "ClientSettings", "CreditClient", "DeadlineExceeded",
    "Deduction", "DeductionNotFound", "FailedPrecondition", "Hold", "InsufficientCredits",
    "InternalError", "InvalidArgument", "KeyReused", "NO_RETRIES", "NotFound",
    "OrgBillingError", "OrgNotFound", "Overloaded", "PermissionDenied", "Refund", "Release",
    "Reservation", "ReservationNotFound", "ReservationNotOpen", "Result", "RetryPolicy",
    "SubscriptionNotFound", "Tls", "Unauthenticated", "Unavailable", "deduction_request",
    "new_idempotency_key",
]
