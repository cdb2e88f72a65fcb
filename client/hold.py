"""A reservation as a context manager: held on entry, released on the way
out unless committed, so an exception never leaves credits held until the
hold expires. The state machine is here once; client.sync and client.aio
add the calls."""

from __future__ import annotations

import logging

from orgbilling.client.errors import OrgBillingError, ReservationNotOpen
from orgbilling.client.operations import new_idempotency_key
from orgbilling.client.results import Deduction, Release, Reservation

log = logging.getLogger("orgbilling.client")


class HoldState:
    """`state` is PENDING (not reserved yet), OPEN, COMMITTED, RELEASED,
    EXPIRED, or UNKNOWN (a release failed on the way out: the hold ends at
    its expiry at the latest). The commit and the release each have one key
    for the hold's life, so calling commit again after an Unavailable
    retries the same commit, never a second one."""

    def __init__(self, client, reserve_fields: dict):
        self._client = client
        self._reserve_fields = reserve_fields
        self.reservation: Reservation | None = None
        self.deduction: Deduction | None = None
        self.state = "PENDING"
        self.commit_idempotency_key = new_idempotency_key()
        self.release_idempotency_key = new_idempotency_key()

    @property
    def reservation_id(self) -> str:
        if self.reservation is None:
            raise RuntimeError("not reserved yet: use the hold inside its with block")
        return self.reservation.reservation_id

    def _commit_fields(self, amount_millicredits: int, metadata, timeout_s) -> dict:
        if self.state != "OPEN":
            raise RuntimeError(f"this hold is {self.state}, not OPEN: it resolves once")
        return dict(org_id=self._reserve_fields["org_id"], reservation_id=self.reservation_id,
                    amount_millicredits=amount_millicredits, metadata=metadata,
                    idempotency_key=self.commit_idempotency_key, timeout_s=timeout_s)

    def _release_fields(self) -> dict:
        return dict(org_id=self._reserve_fields["org_id"], reservation_id=self.reservation_id,
                    idempotency_key=self.release_idempotency_key)

    def _reserved(self, reservation: Reservation) -> None:
        self.reservation, self.state = reservation, "OPEN"

    def _committed(self, deduction: Deduction) -> Deduction:
        self.deduction, self.state = deduction, "COMMITTED"
        return deduction

    def _release_settled(self, release: Release | None, error: OrgBillingError | None) -> None:
        """What the release on the way out found: released, or already
        resolved (a commit whose answer was lost did land), or unknown."""
        if error is None:
            self.state = "RELEASED"
        elif isinstance(error, ReservationNotOpen):
            self.state = error.state or "UNKNOWN"
        else:
            self.state = "UNKNOWN"
            log.warning("could not release reservation %s (it ends at its expiry, %s): %s",
                        self.reservation_id, self.reservation.expire_time, error)

    def _should_release(self) -> bool:
        return self.state == "OPEN"

