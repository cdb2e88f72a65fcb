"""What a call carries besides its message: its request ID, and the
fingerprint that tells a retry from a different request under the same key."""

import contextvars
import hashlib
import time

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


def current_request_id() -> str:
    return request_id_var.get()


def fingerprint(request) -> bytes:
    """SHA-256 of the request without its idempotency key."""
    copy = type(request)()
    copy.CopyFrom(request)
    copy.ClearField("idempotency_key")
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).digest()


# time.monotonic() by which the caller stops waiting; None when it set no deadline.
call_deadline_var: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "call_deadline", default=None
)


def seconds_left() -> float | None:
    """What is left of the caller's deadline, or None if it has none."""
    deadline = call_deadline_var.get()
    return None if deadline is None else deadline - time.monotonic()
