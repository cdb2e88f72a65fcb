from orgbilling.v1 import credit_service_pb2 as pb
from orgbilling.v1 import credit_service_pb2_grpc
from orgbilling.server.errors import ServiceError, batch_not_applied, refusal
from orgbilling.server.group_commit import GroupCommitter
from orgbilling.server.request_context import current_request_id, fingerprint
from orgbilling.server.store import Deduction, DeductionResult, Store
from orgbilling.server.validation import Checks


class CreditServicer(credit_service_pb2_grpc.CreditServiceServicer):
    def __init__(self, store: Store, *, committer: GroupCommitter, batch_items_max: int):
        self._store = store
        self._committer = committer
        self._batch_items_max = batch_items_max

    def CheckCredits(self, request, context):
        checks = Checks()
        checks.identifier("org_id", request.org_id)
        checks.identifier("user_id", request.user_id)
        checks.amount("amount_millicredits", request.amount_millicredits)
        checks.done()
        result = self._store.check(request.org_id, user_id=request.user_id,
                                   amount_millicredits=request.amount_millicredits)
        if result.outcome != "OK":
            raise refusal(result.outcome)
        return pb.CheckCreditsResponse(
            sufficient=result.sufficient,
            allocation_remaining_millicredits=result.allocation_remaining_millicredits,
            pool_spendable_millicredits=result.pool_spendable_millicredits,
        )

    def DeductCredits(self, request, context):
        checks = Checks()
        check_deduction(checks, request)
        checks.done()
        result = self._committer.deduct(deduction_from(request))
        if result.outcome != "OK":
            raise deduction_refusal(result, request.amount_millicredits)
        return deduction_response(result)

    def DeductCreditsBatch(self, request, context):
        checks = Checks()
        count = len(request.deductions)
        if not 1 <= count <= self._batch_items_max:
            checks.fail("deductions", f"must hold 1 to {self._batch_items_max} deductions")
        for index, item in enumerate(request.deductions[: self._batch_items_max]):
            check_deduction(checks, item, prefix=f"deductions[{index}].")
        checks.done()
        results = self._store.deduct_batch(
            [deduction_from(item) for item in request.deductions],
            all_or_nothing=request.all_or_nothing,
        )
        refused = [i for i, r in enumerate(results) if r.outcome not in ("OK", "NOT_APPLIED")]
        if request.all_or_nothing and refused:
            raise batch_not_applied(refused_items=refused, item_count=count,
                                    first_refused_reason=results[refused[0]].outcome)
        return pb.DeductCreditsBatchResponse(
            results=[
                batch_result(result, item.amount_millicredits)
                for result, item in zip(results, request.deductions)
            ]
        )


def check_deduction(checks: Checks, request, prefix: str = "") -> None:
    checks.identifier(prefix + "org_id", request.org_id)
    checks.identifier(prefix + "user_id", request.user_id)
    checks.amount(prefix + "amount_millicredits", request.amount_millicredits)
    checks.service_type(prefix + "service_type", request.service_type)
    checks.service_name(prefix + "service_name", request.service_name)
    checks.idempotency_key(request.idempotency_key, field=prefix + "idempotency_key")
    checks.metadata(prefix + "metadata", request.metadata)


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


def deduction_response(result: DeductionResult) -> pb.DeductCreditsResponse:
    return pb.DeductCreditsResponse(
        deduction_id=result.deduction_id,
        allocation_remaining_millicredits=result.allocation_remaining_millicredits,
        pool_spendable_millicredits=result.pool_spendable_millicredits,
        replayed=result.replayed,
    )


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


def batch_result(result: DeductionResult, requested: int) -> pb.DeductCreditsBatchResult:
    if result.outcome == "OK":
        return pb.DeductCreditsBatchResult(deduction=deduction_response(result))
    error = deduction_refusal(result, requested)
    return pb.DeductCreditsBatchResult(
        error=pb.DeductCreditsBatchError(
            code=error.code.value[0], reason=error.reason, message=error.message,
            metadata=error.metadata,
        )
    )
