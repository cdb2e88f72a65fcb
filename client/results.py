"""What the client's calls return: the charging path's results as plain
frozen values, every other RPC's response message wrapped with what the
call adds to it (replay flag, key, request ID)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar

from orgbilling.client.errors import OrgBillingError

Response = TypeVar("Response")


@dataclass(frozen=True, kw_only=True)
class Check:
    """Whether an amount fits right now; nothing was changed."""
    sufficient: bool
    allocation_remaining_millicredits: int
    pool_spendable_millicredits: int
    request_id: str | None


@dataclass(frozen=True, kw_only=True)
class Deduction:
    """A charge, or (`replayed`) the stored result of the same charge sent
    earlier with the same key: then nothing was charged this time."""
    deduction_id: str
    allocation_remaining_millicredits: int
    pool_spendable_millicredits: int
    replayed: bool
    idempotency_key: str
    request_id: str | None


@dataclass(frozen=True, kw_only=True)
class BatchDeductions:
    """One item per deduction, in order: a Deduction, or the error that
    DeductCredits would have raised for it (nothing charged for that one)."""
    items: tuple[Deduction | OrgBillingError, ...]
    request_id: str | None

    @property
    def deductions(self) -> list[Deduction]:
        return [item for item in self.items if isinstance(item, Deduction)]

    @property
    def errors(self) -> dict[int, OrgBillingError]:
        return {i: item for i, item in enumerate(self.items) if isinstance(item, OrgBillingError)}


@dataclass(frozen=True, kw_only=True)
class Reservation:
    """An open hold: `expire_time` is when it counts as released if neither
    committed nor released before."""
    reservation_id: str
    expire_time: datetime
    allocation_remaining_millicredits: int
    pool_spendable_millicredits: int
    replayed: bool
    idempotency_key: str
    request_id: str | None


@dataclass(frozen=True, kw_only=True)
class Release:
    allocation_remaining_millicredits: int
    pool_spendable_millicredits: int
    replayed: bool
    idempotency_key: str
    request_id: str | None


@dataclass(frozen=True, kw_only=True)
class Refund:
    refund_id: str
    allocation_remaining_millicredits: int
    pool_spendable_millicredits: int
    replayed: bool
    idempotency_key: str
    request_id: str | None


@dataclass(frozen=True, kw_only=True)
class Result(Generic[Response]):
    """The response of an administrative or report RPC. `replayed` and
    `idempotency_key` are for mutations (False and None otherwise)."""
    response: Response
    replayed: bool
    idempotency_key: str | None
    request_id: str | None
