import datetime
import re

from orgbilling.v1 import org_billing_service_pb2 as pb
from orgbilling.v1 import org_billing_service_pb2_grpc, types_pb2
from orgbilling.server import catalog, convert
from orgbilling.server.errors import refusal
from orgbilling.server.page_tokens import Layout, read_page_size, read_position
from orgbilling.server.request_context import current_request_id, fingerprint
from orgbilling.server.settings import Settings
from orgbilling.server.store import Store
from orgbilling.server.validation import Checks

_PLAN = (types_pb2.Plan, "PLAN")
_CYCLE = (types_pb2.BillingCycle, "BILLING_CYCLE")
_RESET = (types_pb2.ResetPeriod, "RESET_PERIOD")
_SOURCE = (types_pb2.CreditSource, "CREDIT_SOURCE")
# REFRESH and LAPSE are the ledger's own, at each billing period start.
_SOURCES_OF_CALLERS = (types_pb2.CREDIT_SOURCE_PURCHASE, types_pb2.CREDIT_SOURCE_GRANT,
                       types_pb2.CREDIT_SOURCE_ADJUSTMENT)
_ALLOCATION_PAGES = Layout("ListAllocations", "s")  # user_id of the last row
_INVOICE_STATUS = (types_pb2.InvoiceStatus, "INVOICE_STATUS")

INVOICE_AMOUNT_MAX_CENTS = 10**13
# Millicents per credit: 10,000 dollars a credit (0005_overage.sql).
OVERAGE_RATE_MAX = 10**9
# A pool's total may reach 10^18 (0001_baseline.sql); so may what rolls over.
ROLLOVER_CAP_MAX_MILLICREDITS = 10**18
CURRENCY = re.compile(r"[A-Z]{3}")
# google.protobuf.Timestamp's own range, 0001-01-01 to 9999-12-31, which a
# PostgreSQL timestamptz holds whole.
TIMESTAMP_SECONDS_MIN, TIMESTAMP_SECONDS_MAX = -62_135_596_800, 253_402_300_799


def _name(kind, value: int) -> str:
    return convert.enum_name(kind[0], kind[1], value)


def _raise_unless_ok(result: dict) -> dict:
    if result["outcome"] != "OK":
        details = {k: v for k, v in result.items() if k in ("available", "requested", "in_use")}
        raise refusal(result["outcome"], **{f"{k}_millicredits": v for k, v in details.items()})
    return result


class OrgBillingServicer(org_billing_service_pb2_grpc.OrgBillingServiceServicer):
    def __init__(self, store: Store, *, settings: Settings):
        self._store = store
        self._settings = settings

    # Subscriptions.

    def CreateSubscription(self, request, context):
        checks = Checks()
        checks.identifier("org_id", request.org_id)
        checks.enum("plan", request.plan, types_pb2.Plan)
        checks.enum("billing_cycle", request.billing_cycle, types_pb2.BillingCycle)
        if not 0 <= request.trial_days <= catalog.TRIAL_DAYS_MAX:
            checks.fail("trial_days", f"must be from 0 to {catalog.TRIAL_DAYS_MAX}")
        checks.text("external_customer_id", request.external_customer_id, 128)
        checks.text("external_subscription_id", request.external_subscription_id, 128)
        checks.idempotency_key(request.idempotency_key)
        checks.done()
        plan, cycle = _name(_PLAN, request.plan), _name(_CYCLE, request.billing_cycle)
        result = _raise_unless_ok(
            self._store.create_subscription(
                request.org_id, plan=plan, billing_cycle=cycle,
                price_cents=catalog.plan_price_cents(plan, cycle),
                refresh_millicredits=catalog.plan_refresh_millicredits(plan, cycle),
                currency=catalog.CATALOG_CURRENCY, trial_days=request.trial_days,
                external_customer_id=request.external_customer_id,
                external_subscription_id=request.external_subscription_id,
                idempotency_key=request.idempotency_key, request_hash=fingerprint(request),
                request_id=current_request_id(),
            )
        )
        return pb.CreateSubscriptionResponse(
            subscription=convert.subscription(result["subscription"]), replayed=result["replayed"]
        )

    def GetSubscription(self, request, context):
        checks = Checks()
        checks.identifier("org_id", request.org_id)
        checks.done()
        found = self._store.get_live_subscription(request.org_id)
        if found is None:
            raise refusal(
                "SUBSCRIPTION_NOT_FOUND" if self._store.org_exists(request.org_id) else "ORG_NOT_FOUND"
            )
        return pb.GetSubscriptionResponse(subscription=convert.subscription(found))

    def ChangePlan(self, request, context):
        checks = Checks()
        checks.identifier("org_id", request.org_id)
        checks.enum("plan", request.plan, types_pb2.Plan)
        checks.enum("billing_cycle", request.billing_cycle, types_pb2.BillingCycle)
        checks.idempotency_key(request.idempotency_key)
        checks.done()
        plan, cycle = _name(_PLAN, request.plan), _name(_CYCLE, request.billing_cycle)
        result = _raise_unless_ok(
            self._store.change_plan(
                request.org_id, plan=plan, billing_cycle=cycle,
                price_cents=catalog.plan_price_cents(plan, cycle),
                refresh_millicredits=catalog.plan_refresh_millicredits(plan, cycle),
                currency=catalog.CATALOG_CURRENCY, idempotency_key=request.idempotency_key,
                request_hash=fingerprint(request), request_id=current_request_id(),
            )
        )
        return pb.ChangePlanResponse(
            subscription=convert.subscription(result["subscription"]),
            change=convert.enum_value(types_pb2.PlanChange, "PLAN_CHANGE", result["change"]),
            replayed=result["replayed"],
        )

    def CancelSubscription(self, request, context):
        checks = Checks()
        checks.identifier("org_id", request.org_id)
        checks.text("reason", request.reason)
        checks.idempotency_key(request.idempotency_key)
        checks.done()
        result = _raise_unless_ok(
            self._store.cancel_subscription(
                request.org_id, reason=request.reason, idempotency_key=request.idempotency_key,
                request_hash=fingerprint(request), request_id=current_request_id(),
            )
        )
        return pb.CancelSubscriptionResponse(
            subscription=convert.subscription(result["subscription"]), replayed=result["replayed"]
        )

    # The pool.

    def GetCreditPool(self, request, context):
        checks = Checks()
        checks.identifier("org_id", request.org_id)
        checks.done()
        found = self._store.get_pool(request.org_id)
        if found is None:
            raise refusal("ORG_NOT_FOUND")
        return pb.GetCreditPoolResponse(pool=convert.pool(found))

    def AddCredits(self, request, context):
        checks = Checks()
        checks.identifier("org_id", request.org_id)
        checks.enum("source", request.source, types_pb2.CreditSource, allowed=_SOURCES_OF_CALLERS)
        checks.text("reason", request.reason)
        checks.idempotency_key(request.idempotency_key)
        source = request.source
        if source == types_pb2.CREDIT_SOURCE_PURCHASE:
            if request.amount_millicredits != 0:
                checks.fail("amount_millicredits", "must be 0 for PURCHASE: it follows from amount_paid_cents")
            checks.idempotency_key(request.payment_reference, field="payment_reference")
            max_cents = 10**15 // catalog.MILLICREDITS_PER_CENT
            if not 1 <= request.amount_paid_cents <= max_cents:
                checks.fail("amount_paid_cents", f"must be from 1 to {max_cents}")
            if request.currency != catalog.CATALOG_CURRENCY:
                checks.fail("currency", f"must be {catalog.CATALOG_CURRENCY}, the catalog's currency")
        else:
            for field in ("payment_reference", "currency"):
                if getattr(request, field):
                    checks.fail(field, "is only for PURCHASE")
            if request.amount_paid_cents:
                checks.fail("amount_paid_cents", "is only for PURCHASE")
            if source == types_pb2.CREDIT_SOURCE_ADJUSTMENT:
                if request.amount_millicredits == 0 or abs(request.amount_millicredits) > 10**15:
                    checks.fail("amount_millicredits", "must be non-zero and at most 10^15 either way")
            else:
                checks.amount("amount_millicredits", request.amount_millicredits)
        checks.done()

        purchase = source == types_pb2.CREDIT_SOURCE_PURCHASE
        amount = (
            catalog.millicredits_for_cents(request.amount_paid_cents)
            if purchase else request.amount_millicredits
        )
        result = _raise_unless_ok(
            self._store.add_credits(
                request.org_id, source=_name(_SOURCE, source), amount_millicredits=amount,
                payment_reference=request.payment_reference if purchase else None,
                amount_paid_cents=request.amount_paid_cents if purchase else None,
                currency=request.currency if purchase else None,
                reason=request.reason, idempotency_key=request.idempotency_key,
                request_hash=fingerprint(request), request_id=current_request_id(),
            )
        )
        return pb.AddCreditsResponse(
            pool=convert.pool(result["pool"]), event_id=result["event_id"],
            added_millicredits=result["added"], replayed=result["replayed"],
        )

    def SetOverage(self, request, context):
        checks = Checks()
        checks.identifier("org_id", request.org_id)
        checks.amount("overage_limit_millicredits", request.overage_limit_millicredits, minimum=0)
        if not 0 <= request.overage_rate_millicents_per_credit <= OVERAGE_RATE_MAX:
            checks.fail("overage_rate_millicents_per_credit", f"must be from 0 to {OVERAGE_RATE_MAX}")
        checks.idempotency_key(request.idempotency_key)
        checks.done()
        result = _raise_unless_ok(
            self._store.set_overage(
                request.org_id, limit_millicredits=request.overage_limit_millicredits,
                rate_millicents_per_credit=request.overage_rate_millicents_per_credit,
                idempotency_key=request.idempotency_key, request_hash=fingerprint(request),
                request_id=current_request_id(),
            )
        )
        return pb.SetOverageResponse(
            pool=convert.pool(result["pool"]), event_id=result["event_id"],
            replayed=result["replayed"],
        )

    def SetCreditRefresh(self, request, context):
        checks = Checks()
        checks.identifier("org_id", request.org_id)
        if request.HasField("refresh_millicredits"):
            checks.amount("refresh_millicredits", request.refresh_millicredits, minimum=0)
        if not 0 <= request.rollover_cap_millicredits <= ROLLOVER_CAP_MAX_MILLICREDITS:
            checks.fail("rollover_cap_millicredits", f"must be from 0 to {ROLLOVER_CAP_MAX_MILLICREDITS}")
        checks.idempotency_key(request.idempotency_key)
        checks.done()
        result = _raise_unless_ok(
            self._store.set_refresh(
                request.org_id,
                refresh_millicredits=(request.refresh_millicredits
                                      if request.HasField("refresh_millicredits") else None),
                rollover_cap_millicredits=request.rollover_cap_millicredits,
                idempotency_key=request.idempotency_key, request_hash=fingerprint(request),
                request_id=current_request_id(),
            )
        )
        return pb.SetCreditRefreshResponse(
            pool=convert.pool(result["pool"]), event_id=result["event_id"],
            replayed=result["replayed"],
        )

    # Allocations.

    def AllocateCredits(self, request, context):
        checks = Checks()
        checks.identifier("org_id", request.org_id)
        checks.identifier("user_id", request.user_id)
        checks.amount("limit_millicredits", request.limit_millicredits, minimum=0)
        checks.enum("reset_period", request.reset_period, types_pb2.ResetPeriod)
        checks.idempotency_key(request.idempotency_key)
        checks.done()
        result = _raise_unless_ok(
            self._store.allocate(
                request.org_id, user_id=request.user_id,
                limit_millicredits=request.limit_millicredits,
                reset_period=_name(_RESET, request.reset_period),
                idempotency_key=request.idempotency_key, request_hash=fingerprint(request),
                request_id=current_request_id(),
            )
        )
        return pb.AllocateCreditsResponse(
            allocation=convert.allocation(result["allocation"]),
            pool=convert.pool(result["pool"]), replayed=result["replayed"],
        )

    def RevokeAllocation(self, request, context):
        checks = Checks()
        checks.identifier("org_id", request.org_id)
        checks.identifier("user_id", request.user_id)
        checks.idempotency_key(request.idempotency_key)
        checks.done()
        result = _raise_unless_ok(
            self._store.revoke(
                request.org_id, user_id=request.user_id, idempotency_key=request.idempotency_key,
                request_hash=fingerprint(request), request_id=current_request_id(),
            )
        )
        return pb.RevokeAllocationResponse(
            allocation=convert.allocation(result["allocation"]),
            pool=convert.pool(result["pool"]), replayed=result["replayed"],
        )

    # Invoices.

    def RecordInvoice(self, request, context):
        checks = Checks()
        checks.identifier("org_id", request.org_id)
        checks.idempotency_key(request.external_invoice_id, field="external_invoice_id")
        checks.enum("status", request.status, types_pb2.InvoiceStatus)
        if not 0 <= request.amount_cents <= INVOICE_AMOUNT_MAX_CENTS:
            checks.fail("amount_cents", f"must be from 0 to {INVOICE_AMOUNT_MAX_CENTS}")
        checks.matches("currency", request.currency, CURRENCY, "an ISO 4217 code, three capital letters")
        start = _instant(checks, request, "period_start_time")
        end = _instant(checks, request, "period_end_time")
        if start is not None and end is not None and end <= start:
            checks.fail("period_end_time", "must be after period_start_time")
        checks.done()
        result = self._store.record_invoice(
            request.org_id, external_invoice_id=request.external_invoice_id,
            status=_name(_INVOICE_STATUS, request.status), amount_cents=request.amount_cents,
            currency=request.currency, period_start=start, period_end=end,
            request_id=current_request_id(),
        )
        if result["outcome"] != "OK":
            raise refusal(result["outcome"], **{k: v for k, v in result.items()
                                                if k in ("field", "current_status")})
        subscription = result["subscription"]
        return pb.RecordInvoiceResponse(
            invoice=convert.invoice(result["invoice"]),
            subscription=convert.subscription(subscription) if subscription else None,
            event_id=result["event_id"], replayed=result["replayed"],
        )

    def ListAllocations(self, request, context):
        checks = Checks()
        checks.identifier("org_id", request.org_id)
        page_size = read_page_size(checks, request.page_size,
                                   default=self._settings.page_size_default,
                                   maximum=self._settings.page_size_max)
        scope = (request.org_id, request.include_revoked)
        after = read_position(checks, _ALLOCATION_PAGES, request.page_token, scope=scope)
        checks.done()
        if not self._store.org_exists(request.org_id):
            raise refusal("ORG_NOT_FOUND")
        # One more than a page tells whether there is a next page.
        found = self._store.list_allocations(
            request.org_id, after_user_id=after[0] if after else "", limit=page_size + 1,
            include_revoked=request.include_revoked,
        )
        page = found[:page_size]
        next_token = (_ALLOCATION_PAGES.encode((page[-1]["user_id"],), scope=scope)
                      if len(found) > page_size else "")
        return pb.ListAllocationsResponse(
            allocations=[convert.allocation(a) for a in page], next_page_token=next_token
        )


def _instant(checks: Checks, request, field: str) -> datetime.datetime | None:
    """The Timestamp field as an aware datetime; None, with the reason in
    checks, when it is unset, out of range or finer than a microsecond.
    PostgreSQL keeps microseconds: a finer instant would be stored rounded,
    so two different periods could be taken for the same one."""
    if not request.HasField(field):
        checks.fail(field, "must be set")
        return None
    stamp = getattr(request, field)
    if not (TIMESTAMP_SECONDS_MIN <= stamp.seconds <= TIMESTAMP_SECONDS_MAX
            and 0 <= stamp.nanos < 10**9):
        checks.fail(field, "must be a valid timestamp, from 0001-01-01 to 9999-12-31")
        return None
    if stamp.nanos % 1000:
        checks.fail(field, "must be a whole number of microseconds")
        return None
    return stamp.ToDatetime(tzinfo=datetime.timezone.utc)

