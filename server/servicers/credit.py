from orgbilling.v1 import credit_service_pb2 as pb
from orgbilling.v1 import credit_service_pb2_grpc
from server.errors import refusal
from server.request_context import current_request_id, fingerprint
from server.store import Deduction, Store
from server.validation import Checks


class CreditServicer(credit_service_pb2_grpc.CreditServiceServicer):
    def __init__(self, store: Store):
        self._store = store

    def CheckCredits(self, request, context):
        checks = Checks()
        checks.identifier("org_id", request.org_id)
        checks.identifier("user_id", request.user_id)
        checks.amount("amount_millicredits", request.amount_millicredits)
        checks.done()
        result = self._store.check(request.org_id, request.user_id, request.amount_millicredits)
        if result.outcome != "OK":
            raise refusal(result.outcome)
        return pb.CheckCreditsResponse(
            sufficient=result.sufficient,
            allocation_remaining_millicredits=result.allocation_remaining_millicredits,
            pool_spendable_millicredits=result.pool_spendable_millicredits,
        )

    def DeductCredits(self, request, context):
        checks = Checks()
        checks.identifier("org_id", request.org_id)
        checks.identifier("user_id", request.user_id)
        checks.amount("amount_millicredits", request.amount_millicredits)
        checks.service_type("service_type", request.service_type)
        checks.service_name("service_name", request.service_name)
        checks.idempotency_key(request.idempotency_key)
        checks.metadata("metadata", request.metadata)
        checks.done()
        result = self._store.deduct(deduction_from(request))
        if result.outcome != "OK":
            raise _deduction_refusal(result, request.amount_millicredits)
        return pb.DeductCreditsResponse(
            deduction_id=result.deduction_id,
            allocation_remaining_millicredits=result.allocation_remaining_millicredits,
            pool_spendable_millicredits=result.pool_spendable_millicredits,
            replayed=result.replayed,
        )


def deduction_from(request) -> Deduction:
    return Deduction(
        org_id=request.org_id,
        user_id=request.user_id,
        amount_millicredits=request.amount_millicredits,
        service_type=request.service_type,
        service_name=request.service_name,
        idempotency_key=request.idempotency_key,
        request_hash=fingerprint(request),
        request_id=current_request_id(),
        metadata=dict(request.metadata),
    )


def _deduction_refusal(result, requested: int):
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
