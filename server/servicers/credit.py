from google.protobuf.timestamp_pb2 import Timestamp

from orgbilling.v1 import credit_service_pb2 as pb
from orgbilling.v1 import credit_service_pb2_grpc
from orgbilling.v1 import types_pb2
from orgbilling.server import convert
from orgbilling.server.errors import ServiceError, batch_not_applied, refusal
from orgbilling.server.group_commit import GroupCommitter
from orgbilling.server.metrics import Metrics
from orgbilling.server.page_tokens import Layout, read_page_size, read_position
from orgbilling.server.request_context import current_request_id, fingerprint
from orgbilling.server.store import (
    CreditCheck, Deduction, DeductionResult, Refund, Reservation, ReservationCommit, ReservationRelease, Store,
)
from orgbilling.server.validation import Checks

# ListReservations pages end at a reservation id (newest first).
RESERVATIONS_PAGE = Layout("reservations", "u")
REFUND_REASON_CHARS_MAX = 256


class CreditServicer(credit_service_pb2_grpc.CreditServiceServicer):
    """The calls that queue in a GroupCommitter's lanes (checks, deductions,
    holds and their ends) are coroutines, run on the server's event loop;
    the others run in the interceptor chain's thread pool (server.interceptors)."""

    def __init__(self, store: Store, *, committer: GroupCommitter, checks: GroupCommitter,
                 batch_items_max: int,
                 reservation_ttl_default_ms: int, reservation_ttl_min_ms: int,
                 reservation_ttl_max_ms: int, page_size_default: int, page_size_max: int,
                 metrics: Metrics | None = None):
        self._store = store
        # Charges and refunds applied, for metrics; replays are not new ones.
        self._charged = metrics.charge if metrics else _uncounted
        self._refunded = metrics.refund if metrics else _uncounted
        self._committer = committer
        # CheckCredits' coalescer (Store.check_batch).
        self._checks = checks
        self._batch_items_max = batch_items_max
        self._ttl_default_ms = reservation_ttl_default_ms
        self._ttl_min_ms = reservation_ttl_min_ms
        self._ttl_max_ms = reservation_ttl_max_ms
        self._page_size_default = page_size_default
        self._page_size_max = page_size_max

    async def CheckCredits(self, request, context):
        checks = Checks()
        checks.identifier("org_id", request.org_id)
        checks.identifier("user_id", request.user_id)
        checks.amount("amount_millicredits", request.amount_millicredits)
        checks.done()
        result = await self._checks.submit(CreditCheck(
            org_id=request.org_id, user_id=request.user_id,
            amount_millicredits=request.amount_millicredits))
        if result.outcome != "OK":
            raise refusal(result.outcome)
        return pb.CheckCreditsResponse(
            sufficient=result.sufficient,
            allocation_remaining_millicredits=result.allocation_remaining_millicredits,
            pool_spendable_millicredits=result.pool_spendable_millicredits,
        )

    async def DeductCredits(self, request, context):
        checks = Checks()
        deduction = checked_deduction(checks, request, request_id=current_request_id())
        checks.done()
        result = await self._committer.submit(deduction)
        if result.outcome != "OK":
            raise deduction_refusal(result, request.amount_millicredits)
        if not result.replayed:
            self._charged(request.amount_millicredits)
        return set_deduction_response(pb.DeductCreditsResponse(), result)

    def DeductCreditsBatch(self, request, context):
        checks = Checks()
        count = len(request.deductions)
        if not 1 <= count <= self._batch_items_max:
            checks.fail("deductions", f"must hold 1 to {self._batch_items_max} deductions")
        request_id = current_request_id()
        deductions = [
            checked_deduction(checks, item, request_id=request_id, prefix=f"deductions[{index}].")
            for index, item in enumerate(request.deductions[: self._batch_items_max])
        ]
        checks.done()
        results = self._store.deduct_batch(deductions, all_or_nothing=request.all_or_nothing)
        refused = [i for i, r in enumerate(results) if r.outcome not in ("OK", "NOT_APPLIED")]
        if request.all_or_nothing and refused:
            raise batch_not_applied(refused_items=refused, item_count=count,
                                    first_refused_reason=results[refused[0]].outcome)
        response = pb.DeductCreditsBatchResponse()
        add_result = response.results.add
        for result, item in zip(results, request.deductions):
            if result.outcome == "OK" and not result.replayed:
                self._charged(item.amount_millicredits)
            set_batch_result(add_result(), result, item.amount_millicredits)
        return response

    # Reservations (holds).

    async def ReserveCredits(self, request, context):
        checks = Checks()
        checks.identifier("org_id", request.org_id)
        checks.identifier("user_id", request.user_id)
        checks.amount("amount_millicredits", request.amount_millicredits)
        ttl_ms = self._ttl_default_ms
        if request.HasField("ttl"):
            ttl_ms = checks.duration_ms("ttl", request.ttl, minimum_ms=self._ttl_min_ms,
                                        maximum_ms=self._ttl_max_ms)
        checks.service_type("service_type", request.service_type)
        checks.service_name("service_name", request.service_name)
        checks.idempotency_key(request.idempotency_key)
        metadata = entries(request.metadata)
        checks.metadata("metadata", metadata)
        checks.done()
        result = await self._committer.submit(Reservation(
            org_id=request.org_id, user_id=request.user_id,
            amount_millicredits=request.amount_millicredits, ttl_ms=ttl_ms,
            service_type=request.service_type, service_name=request.service_name,
            idempotency_key=request.idempotency_key, request_hash=fingerprint(request),
            request_id=current_request_id(), metadata=metadata,
        ))
        if result["outcome"] != "OK":
            raise reservation_refusal(result, request.amount_millicredits)
        expire_time = Timestamp()
        expire_time.FromMicroseconds(result["expires_at_us"])
        return pb.ReserveCreditsResponse(
            reservation_id=result["reservation_id"], expire_time=expire_time,
            allocation_remaining_millicredits=result["allocation_remaining"],
            pool_spendable_millicredits=result["pool_spendable"], replayed=result["replayed"],
        )

    async def CommitReservation(self, request, context):
        checks = Checks()
        checks.identifier("org_id", request.org_id)
        checks.uuid("reservation_id", request.reservation_id)
        checks.amount("amount_millicredits", request.amount_millicredits)
        metadata = entries(request.metadata)
        checks.metadata("metadata", metadata)
        checks.idempotency_key(request.idempotency_key)
        checks.done()
        result = await self._committer.submit(ReservationCommit(
            org_id=request.org_id, reservation_id=request.reservation_id,
            amount_millicredits=request.amount_millicredits,
            idempotency_key=request.idempotency_key, request_hash=fingerprint(request),
            request_id=current_request_id(), metadata=metadata,
        ))
        if result["outcome"] != "OK":
            raise reservation_refusal(result, request.amount_millicredits)
        if not result["replayed"]:
            self._charged(request.amount_millicredits)
        return pb.CommitReservationResponse(
            deduction_id=result["deduction_id"],
            allocation_remaining_millicredits=result["allocation_remaining"],
            pool_spendable_millicredits=result["pool_spendable"], replayed=result["replayed"],
        )

    async def ReleaseReservation(self, request, context):
        checks = Checks()
        checks.identifier("org_id", request.org_id)
        checks.uuid("reservation_id", request.reservation_id)
        checks.idempotency_key(request.idempotency_key)
        checks.done()
        result = await self._committer.submit(ReservationRelease(
            org_id=request.org_id, reservation_id=request.reservation_id,
            idempotency_key=request.idempotency_key, request_hash=fingerprint(request),
            request_id=current_request_id(),
        ))
        if result["outcome"] != "OK":
            raise reservation_refusal(result, None)
        return pb.ReleaseReservationResponse(
            allocation_remaining_millicredits=result["allocation_remaining"],
            pool_spendable_millicredits=result["pool_spendable"], replayed=result["replayed"],
        )

    def GetReservation(self, request, context):
        checks = Checks()
        checks.identifier("org_id", request.org_id)
        checks.uuid("reservation_id", request.reservation_id)
        checks.done()
        found = self._store.get_reservation(request.org_id, reservation_id=request.reservation_id)
        if found is None:
            raise refusal("RESERVATION_NOT_FOUND")
        return pb.GetReservationResponse(reservation=convert.reservation(found))

    def ListReservations(self, request, context):
        checks = Checks()
        checks.identifier("org_id", request.org_id)
        if request.state not in types_pb2.ReservationState.values():
            checks.fail("state", "must be a ReservationState")
        page_size = read_page_size(checks, request.page_size, default=self._page_size_default,
                                   maximum=self._page_size_max)
        scope = (request.org_id, request.state)
        position = read_position(checks, RESERVATIONS_PAGE, request.page_token, scope=scope)
        checks.done()
        state = (None if request.state == types_pb2.RESERVATION_STATE_UNSPECIFIED
                 else convert.enum_name(types_pb2.ReservationState, "RESERVATION_STATE", request.state))
        rows = self._store.list_reservations(
            request.org_id, state=state, before_id=position[0] if position else None,
            limit=page_size + 1,
        )
        page = rows[:page_size]
        next_token = (RESERVATIONS_PAGE.encode((page[-1]["reservation_id"],), scope=scope)
                      if len(rows) > page_size else "")
        return pb.ListReservationsResponse(
            reservations=[convert.reservation(r) for r in page], next_page_token=next_token)


    # Refunds.

    def RefundCredits(self, request, context):
        checks = Checks()
        checks.identifier("org_id", request.org_id)
        checks.uuid("deduction_id", request.deduction_id)
        checks.amount("amount_millicredits", request.amount_millicredits)
        if not request.reason:
            checks.fail("reason", f"must be 1 to {REFUND_REASON_CHARS_MAX} characters")
        checks.text("reason", request.reason, chars_max=REFUND_REASON_CHARS_MAX)
        checks.idempotency_key(request.idempotency_key)
        checks.done()
        result = self._store.refund(Refund(
            org_id=request.org_id, deduction_id=request.deduction_id,
            amount_millicredits=request.amount_millicredits, reason=request.reason,
            idempotency_key=request.idempotency_key, request_hash=fingerprint(request),
            request_id=current_request_id(),
        ))
        if result["outcome"] == "REFUND_EXCEEDS_DEDUCTION":
            raise refusal(result["outcome"], refundable_millicredits=result["refundable"],
                          requested_millicredits=request.amount_millicredits)
        if result["outcome"] != "OK":
            raise refusal(result["outcome"])
        if not result["replayed"]:
            self._refunded(request.amount_millicredits)
        return pb.RefundCreditsResponse(
            refund_id=result["refund_id"],
            allocation_remaining_millicredits=result["allocation_remaining"],
            pool_spendable_millicredits=result["pool_spendable"], replayed=result["replayed"],
        )


def _uncounted(amount_millicredits: int) -> None:
    """What counts charges when metrics are off."""


def reservation_refusal(result: dict, requested: int | None) -> ServiceError:
    """The error for a refused reserve, commit or release (35_reservations.sql)."""
    outcome = result["outcome"]
    if outcome == "INSUFFICIENT_CREDITS":
        remaining, spendable = result["allocation_remaining"], result["pool_spendable"]
        extra = {"held_millicredits": result["held"]} if "held" in result else {}
        return refusal(
            outcome, available_millicredits=min(remaining, spendable),
            requested_millicredits=requested, allocation_remaining_millicredits=remaining,
            pool_spendable_millicredits=spendable, **extra,
        )
    if outcome == "RESERVATION_NOT_OPEN":
        return refusal(outcome, state=result["state"])
    return refusal(outcome)


def entries(metadata) -> dict[str, str]:
    """A request's metadata map as a dict. Iterating the map's keys is its
    own code; dict(map) and map.items() go through Python's Mapping mixins,
    twice the time (0.72 against 0.36 us for two entries, measured)."""
    return {key: metadata[key] for key in metadata}


def checked_deduction(checks: Checks, request, *, request_id: str, prefix: str = "") -> Deduction:
    """A DeductCreditsRequest's fields checked (any violation added to
    checks, field names after prefix), as the Deduction the store takes."""
    metadata = entries(request.metadata)
    checks.identifier(prefix + "org_id", request.org_id)
    checks.identifier(prefix + "user_id", request.user_id)
    checks.amount(prefix + "amount_millicredits", request.amount_millicredits)
    checks.service_type(prefix + "service_type", request.service_type)
    checks.service_name(prefix + "service_name", request.service_name)
    checks.idempotency_key(request.idempotency_key, field=prefix + "idempotency_key")
    checks.metadata(prefix + "metadata", metadata)
    return Deduction(
        org_id=request.org_id,
        user_id=request.user_id,
        amount_millicredits=request.amount_millicredits,
        service_type=request.service_type,
        service_name=request.service_name,
        idempotency_key=request.idempotency_key,
        request_hash=fingerprint(request),
        request_id=request_id,
        metadata=metadata,
    )


def set_deduction_response(response: pb.DeductCreditsResponse,
                           result: DeductionResult) -> pb.DeductCreditsResponse:
    """Fills response in place: a message given to another's constructor is
    copied, so a batch's thousand answers are built where they end up
    (0.5 against 1.4 us an item, measured)."""
    response.deduction_id = result.deduction_id
    response.allocation_remaining_millicredits = result.allocation_remaining_millicredits
    response.pool_spendable_millicredits = result.pool_spendable_millicredits
    response.replayed = result.replayed
    return response


def deduction_refusal(result: DeductionResult, requested: int) -> ServiceError:
    if result.outcome == "INSUFFICIENT_CREDITS":
        return refusal(
            result.outcome,
            available_millicredits=min(
                result.allocation_remaining_millicredits, result.pool_spendable_millicredits
            ),
            requested_millicredits=requested,
            allocation_remaining_millicredits=result.allocation_remaining_millicredits,
            pool_spendable_millicredits=result.pool_spendable_millicredits,
        )
    return refusal(result.outcome)


def set_batch_result(target: pb.DeductCreditsBatchResult, result: DeductionResult,
                     requested: int) -> None:
    if result.outcome == "OK":
        set_deduction_response(target.deduction, result)
        return
    error = deduction_refusal(result, requested)
    target.error.code = error.code.value[0]
    target.error.reason = error.reason
    target.error.message = error.message
    target.error.metadata.update(error.metadata)
