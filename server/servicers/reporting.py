"""ReportingService: read-only views of usage and billing, and the export
stream. Thin: validate, ask the report store, build the response. What each
figure means is docs/reporting.md."""

import dataclasses
import time

from orgbilling.v1 import reporting_service_pb2 as pb
from orgbilling.v1 import reporting_service_pb2_grpc
from orgbilling.server import convert
from orgbilling.server import report_convert as rc
from orgbilling.server.auth.caller import caller_var
from orgbilling.server.errors import org_not_permitted, refusal
from orgbilling.server.page_tokens import Layout, read_page_size, read_position
from orgbilling.server.report_store import NIL_UUID, ReportStore
from orgbilling.server.settings import Settings
from orgbilling.server.validation import Checks

SUMMARY_DAYS_DEFAULT = 30
SUMMARY_DAYS_MAX = 366
TOP_ENTRIES_DEFAULT = 10
TOP_ENTRIES_MAX = 100
# ExportUsageRequest.chunk_size, as the contract fixes it.
CHUNK_SIZE_DEFAULT = 1000
CHUNK_SIZE_MAX = 10_000

# Positions of each list: what its page token carries (server.page_tokens).
_USAGE_PAGES = Layout("ListUsage", "qu")  # (created_at, deduction_id) of the last row
_HISTORY_PAGES = Layout("ListBillingHistory", "qu")  # (created_at, event_id)
_ALLOCATION_PAGES = Layout("ListAllocationUsage", "qs")  # (used, user_id)
_ORG_PAGES = Layout("ListOrgSummaries", "s")  # org_id
# (end bound, created_at, deduction_id): the bound is the instant an export
# with no end started, kept by every resumption.
_EXPORT_CHUNKS = Layout("ExportUsage", "qqu")

_LIVE_OR_BILLED = ("ACTIVE", "PAST_DUE")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Span:
    """A request's time range, resolved: [start_us, end_us) in epoch
    microseconds, and the bounds as the caller gave them (None: unset), which
    page tokens are tied to (an unset end is "now" on every page)."""

    start_us: int
    end_us: int
    given: tuple[int | None, int | None]


def resolve_time_range(checks: Checks, request, *, now_us: int, default_days: int | None = None,
                       days_max: int | None = None, field: str = "time_range") -> Span | None:
    """The request's `field` (a TimeRange) resolved: an unset end is now, an
    unset start is default_days before the end, or the beginning of time when
    None. Failures go to checks (then None): invalid timestamps, timestamps
    that are not whole microseconds, a start not before the end, a span
    longer than days_max."""
    given = {}
    for name in ("start_time", "end_time"):
        given[name] = None
        if request.HasField(field) and getattr(request, field).HasField(name):
            micros = rc.timestamp_micros(getattr(getattr(request, field), name))
            if micros is None:
                checks.fail(f"{field}.{name}", "must be a valid time from 0001-01-01 to 9999-12-31,"
                                               " in whole microseconds")
                return None
            given[name] = micros
    start, end = given["start_time"], given["end_time"]
    end_us = now_us if end is None else end
    if start is not None:
        start_us = start
    elif default_days is not None:
        start_us = max(rc.MICROS_MIN, end_us - default_days * rc.MICROS_PER_DAY)
    else:
        start_us = rc.MICROS_MIN
    # Blame the bound the caller set.
    blamed = f"{field}.start_time" if start is not None else f"{field}.end_time"
    if start_us >= end_us:
        checks.fail(blamed, "must make start_time before end_time (now when unset)")
        return None
    if days_max is not None and end_us - start_us > days_max * rc.MICROS_PER_DAY:
        checks.fail(blamed, f"must make the range span at most {days_max} days")
        return None
    return Span(start_us=start_us, end_us=end_us, given=(start, end))


def _now_us() -> int:
    return time.time_ns() // 1000


def _require_every_org() -> None:
    """Platform-wide reports: refused to a caller limited to some
    organizations (the auth interceptor refuses it first; this holds when
    its rules change)."""
    caller = caller_var.get()
    if caller is not None and caller.org_ids is not None:
        raise org_not_permitted(None)


class ReportingServicer(reporting_service_pb2_grpc.ReportingServiceServicer):
    def __init__(self, store: ReportStore, *, settings: Settings):
        self._store = store
        self._settings = settings
        # A page or a chunk is cut short before it could pass the message
        # size limit; half of it leaves room for what the estimate misses.
        self._records_bytes_max = settings.message_size_max_bytes // 2

    def _page_size(self, checks: Checks, value: int) -> int:
        return read_page_size(checks, value, default=self._settings.page_size_default,
                              maximum=self._settings.page_size_max)

    @staticmethod
    def _top(checks: Checks, field: str, value: int) -> int:
        if not 0 <= value <= TOP_ENTRIES_MAX:
            checks.fail(field, f"must be from 0 to {TOP_ENTRIES_MAX}")
        return value or TOP_ENTRIES_DEFAULT

    def _raise_unless_org_exists(self, org_id: str) -> None:
        if not self._store.org_exists(org_id):
            raise refusal("ORG_NOT_FOUND")

    # Summaries.

    def GetUsageSummary(self, request, context):
        checks = Checks()
        checks.identifier("org_id", request.org_id)
        span = resolve_time_range(checks, request, now_us=_now_us(),
                                  default_days=SUMMARY_DAYS_DEFAULT, days_max=SUMMARY_DAYS_MAX)
        top_users = self._top(checks, "top_users", request.top_users)
        checks.done()
        found = self._store.usage_summary(request.org_id, start_us=span.start_us, end_us=span.end_us,
                                          top_users=top_users)
        if found is None:
            raise refusal("ORG_NOT_FOUND")
        response = pb.GetUsageSummaryResponse(time_range=rc.time_range(span.start_us, span.end_us))
        by_day = {}
        for row in found["groups"]:
            kind = row["grouped_by"]
            if kind == "total":
                response.totals.used_millicredits = row["used_millicredits"]
                response.totals.request_count = row["request_count"]
            elif kind == "day":
                by_day[rc.day_micros(row["day"])] = row
            else:
                breakdown = response.by_service_type if kind == "service_type" else response.by_service_name
                breakdown.add(service_type=row["service_type"], service_name=row["service_name"] or "",
                              used_millicredits=row["used_millicredits"],
                              request_count=row["request_count"])
        if found["top_users"]:
            response.totals.active_users = found["top_users"][0]["active_users"]
        for row in found["top_users"]:
            response.top_users.add(
                user_id=row["user_id"], used_millicredits=row["used_millicredits"],
                request_count=row["request_count"], services_used=row["services_used"],
                last_use_time=rc.timestamp(row["last_used_at_us"]))
        # Every UTC day the range touches, from the day of its start to the
        # day of its last microsecond, zeros included.
        first_day = span.start_us - span.start_us % rc.MICROS_PER_DAY
        last_day = (span.end_us - 1) - (span.end_us - 1) % rc.MICROS_PER_DAY
        for day in range(first_day, last_day + 1, rc.MICROS_PER_DAY):
            row = by_day.get(day)
            response.daily.add(day_start_time=rc.timestamp(day),
                               used_millicredits=row["used_millicredits"] if row else 0,
                               request_count=row["request_count"] if row else 0)
        return response

    def GetOrgBilling(self, request, context):
        checks = Checks()
        checks.identifier("org_id", request.org_id)
        checks.done()
        found = self._store.org_billing(request.org_id)
        if found is None:
            raise refusal("ORG_NOT_FOUND")
        response = pb.GetOrgBillingResponse(
            pool=convert.pool(found["pool"]), allocation_count=found["allocation_count"],
            last_30_days=rc.usage_totals(found["used_millicredits"], found["request_count"],
                                         found["active_users"]))
        if found["subscription"] is not None:
            response.subscription.CopyFrom(convert.subscription(found["subscription"]))
        return response

    def GetUserBilling(self, request, context):
        checks = Checks()
        checks.identifier("user_id", request.user_id)
        checks.done()
        caller = caller_var.get()
        org_ids = None if caller is None or caller.org_ids is None else sorted(caller.org_ids)
        response = pb.GetUserBillingResponse()
        for row in self._store.user_billing(request.user_id, org_ids=org_ids):
            used, requests = row["used_millicredits"], row["request_count"]
            entry = response.organizations.add(
                allocation=convert.allocation(row["allocation"]), plan=rc.plan(row["plan"]),
                last_30_days=rc.usage_totals(used, requests, 1 if requests else 0))
            if row["plan"] is not None:
                entry.price.CopyFrom(rc.money(row["currency"], row["price_cents"]))
            response.used_millicredits_30_days += used
            response.request_count_30_days += requests
            response.active_organizations_30_days += 1 if requests else 0
        return response

    def GetSystemBilling(self, request, context):
        checks = Checks()
        top_orgs = self._top(checks, "top_orgs", request.top_orgs)
        checks.done()
        _require_every_org()
        found = self._store.system_billing(top_orgs=top_orgs)
        response = pb.GetSystemBillingResponse(organization_count=found["organization_count"])
        # ARR is exact; MRR is ARR / 12 rounded half up, once per sum.
        arr = {}
        plans = {}
        for row in found["plans"]:
            key = (rc.plan(row["plan"]), rc.status(row["status"]))
            group = plans.setdefault(key, {"count": 0, "arr": {}})
            group["count"] += row["subscription_count"]
            if row["status"] in _LIVE_OR_BILLED:
                currency = row["currency"]
                arr[currency] = arr.get(currency, 0) + row["arr_cents"]
                group["arr"][currency] = group["arr"].get(currency, 0) + row["arr_cents"]
            if row["status"] == "ACTIVE":
                response.active_subscriptions += row["subscription_count"]
        response.arr.extend(rc.money_list(arr))
        response.mrr.extend(rc.money_list({c: _monthly(cents) for c, cents in arr.items()}))
        for (plan, status), group in sorted(plans.items()):
            response.plans.add(plan=plan, status=status, subscription_count=group["count"],
                               mrr=rc.money_list({c: _monthly(v) for c, v in group["arr"].items()}))
        for row in found["top_orgs"]:
            response.top_orgs.add(org_id=row["org_id"], used_millicredits=row["used_millicredits"],
                                  request_count=row["request_count"])
        return response

    def GetOrgBillingMetrics(self, request, context):
        checks = Checks()
        checks.identifier("org_id", request.org_id)
        span = resolve_time_range(checks, request, now_us=_now_us(),
                                  default_days=SUMMARY_DAYS_DEFAULT, days_max=SUMMARY_DAYS_MAX)
        checks.done()
        found = self._store.org_metrics(request.org_id, start_us=span.start_us, end_us=span.end_us)
        if found is None:
            raise refusal("ORG_NOT_FOUND")
        return pb.GetOrgBillingMetricsResponse(
            time_range=rc.time_range(span.start_us, span.end_us),
            invoice_count=found["invoice_count"], revenue_paid=rc.money_list(found["revenue_paid"]),
            failed_payment_count=found["failed_payment_count"],
            used_millicredits=found["used_millicredits"], request_count=found["request_count"],
            active_users=found["active_users"])

    # Lists.

    def ListAllocationUsage(self, request, context):
        checks = Checks()
        checks.identifier("org_id", request.org_id)
        page_size = self._page_size(checks, request.page_size)
        scope = (request.org_id,)
        after = read_position(checks, _ALLOCATION_PAGES, request.page_token, scope=scope)
        checks.done()
        found = self._store.allocations_by_use(request.org_id, after=after, limit=page_size + 1)
        if not found:
            self._raise_unless_org_exists(request.org_id)
        page = found[:page_size]
        response = pb.ListAllocationUsageResponse(
            allocations=[convert.allocation(row["allocation"]) for row in page])
        if len(found) > page_size:
            last = page[-1]
            response.next_page_token = _ALLOCATION_PAGES.encode(
                (last["used_millicredits"], last["allocation"]["user_id"]), scope=scope)
        return response

    def ListOrgSummaries(self, request, context):
        checks = Checks()
        page_size = self._page_size(checks, request.page_size)
        after = read_position(checks, _ORG_PAGES, request.page_token, scope=())
        checks.done()
        _require_every_org()
        found = self._store.org_summaries(after_org_id=after[0] if after else "", limit=page_size + 1)
        page = found[:page_size]
        response = pb.ListOrgSummariesResponse()
        for row in page:
            response.organizations.add(org_id=row["org_id"], plan=rc.plan(row["plan"]),
                                       status=rc.status(row["status"]), pool=convert.pool(row["pool"]))
        if len(found) > page_size:
            response.next_page_token = _ORG_PAGES.encode((page[-1]["org_id"],), scope=())
        return response

    def ListUsage(self, request, context):
        checks = Checks()
        checks.identifier("org_id", request.org_id)
        filters = {}
        if request.user_id:
            checks.identifier("user_id", request.user_id)
            filters["user_id"] = request.user_id
        if request.service_type:
            checks.service_type("service_type", request.service_type)
            filters["service_type"] = request.service_type
        if request.service_name:
            checks.service_name("service_name", request.service_name)
            filters["service_name"] = request.service_name
        span = resolve_time_range(checks, request, now_us=_now_us())
        page_size = self._page_size(checks, request.page_size)
        scope = (request.org_id, request.user_id, request.service_type, request.service_name,
                 *(span.given if span else ()))
        before = read_position(checks, _USAGE_PAGES, request.page_token, scope=scope)
        checks.done()
        found = self._store.list_usage(request.org_id, filters=filters, start_us=span.start_us,
                                       end_us=span.end_us, before=before, limit=page_size + 1)
        if not found:
            self._raise_unless_org_exists(request.org_id)
        response = pb.ListUsageResponse()
        added = rc.add_usage_records(response.records, request.org_id, found[:page_size],
                                     bytes_max=self._records_bytes_max)
        if added < len(found):
            last = found[added - 1]
            response.next_page_token = _USAGE_PAGES.encode((last[7], last[0]), scope=scope)
        return response

    def ListBillingHistory(self, request, context):
        checks = Checks()
        checks.identifier("org_id", request.org_id)
        event_type = None
        if request.event_type:
            checks.enum("event_type", request.event_type, pb.BillingEventType)
            if request.event_type in pb.BillingEventType.values():
                event_type = convert.enum_name(pb.BillingEventType, "BILLING_EVENT_TYPE", request.event_type)
        span = resolve_time_range(checks, request, now_us=_now_us())
        page_size = self._page_size(checks, request.page_size)
        scope = (request.org_id, request.event_type, *(span.given if span else ()))
        before = read_position(checks, _HISTORY_PAGES, request.page_token, scope=scope)
        checks.done()
        found = self._store.list_history(request.org_id, event_type=event_type, start_us=span.start_us,
                                         end_us=span.end_us, before=before, limit=page_size + 1)
        if not found:
            self._raise_unless_org_exists(request.org_id)
        page = found[:page_size]
        response = pb.ListBillingHistoryResponse(
            events=[rc.billing_event(request.org_id, row) for row in page])
        if len(found) > page_size:
            last = page[-1]
            response.next_page_token = _HISTORY_PAGES.encode(
                (last["created_at_us"], last["event_id"]), scope=scope)
        return response

    # The export.

    def ExportUsage(self, request, context):
        """Chunks of up to chunk_size deductions, oldest first, each read by
        one short query whose connection goes back to the pool before the
        chunk is sent: a slow or cancelled reader holds no connection, and
        memory holds one chunk."""
        checks = Checks()
        checks.identifier("org_id", request.org_id)
        span = resolve_time_range(checks, request, now_us=_now_us())
        if not 0 <= request.chunk_size <= CHUNK_SIZE_MAX:
            checks.fail("chunk_size", f"must be from 0 to {CHUNK_SIZE_MAX}")
        chunk_size = request.chunk_size or CHUNK_SIZE_DEFAULT
        org_id = request.org_id
        scope = (org_id, *(span.given if span else ()))
        resume = read_position(checks, _EXPORT_CHUNKS, request.resume_token, scope=scope,
                                field="resume_token")
        checks.done()
        self._raise_unless_org_exists(org_id)
        # An export with no end ends where it started, and so does every
        # resumption of it: the bound travels in the token.
        if resume:
            end_us, after = resume[0], (resume[1], resume[2])
        else:
            end_us, after = span.end_us, (span.start_us, NIL_UUID)
        while context.is_active():
            rows = self._store.export_chunk(org_id, end_us=end_us, after=after, limit=chunk_size)
            if not rows:
                return
            chunk = pb.ExportUsageResponse()
            added = rc.add_usage_records(chunk.records, org_id, rows, bytes_max=self._records_bytes_max)
            last = rows[added - 1]
            after = (last[7], last[0])
            chunk.resume_token = _EXPORT_CHUNKS.encode((end_us, *after), scope=scope)
            yield chunk
            if len(rows) < chunk_size and added == len(rows):
                return


def _monthly(arr_cents: int) -> int:
    """MRR from ARR: a twelfth, rounded half up to the cent."""
    return (arr_cents + 6) // 12
