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
class Answer:
    """What a mutation of the charging path answers: the balances after it,
    and whether it was a replay (the stored result of the same operation
    sent earlier with the same key: nothing was done this time)."""
    allocation_remaining_millicredits: int
    pool_spendable_millicredits: int
    replayed: bool
    idempotency_key: str
    request_id: str | None


@dataclass(frozen=True, kw_only=True)
class Deduction(Answer):
    """A charge (DeductCredits, a batch's item, CommitReservation)."""
    deduction_id: str


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
class Reservation(Answer):
    """An open hold: `expire_time` (UTC) is when it counts as released if
    neither committed nor released before."""
    reservation_id: str
    expire_time: datetime


class Release(Answer):
    """A hold released whole."""


@dataclass(frozen=True, kw_only=True)
class Refund(Answer):
    refund_id: str


@dataclass(frozen=True, kw_only=True)
class Result(Generic[Response]):
    """The response of an administrative or report RPC. `replayed` and
    `idempotency_key` are for mutations (False and None otherwise)."""
    response: Response
    replayed: bool
    idempotency_key: str | None
    request_id: str | None
