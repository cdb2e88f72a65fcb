"""ReportingService's lists through a real server: keyset pages that show
every row exactly once while deductions go on, newest first, filtered, with
tokens tied to their organization and filters (docs/reporting.md)."""

import threading
import time

import grpc
import psycopg
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from orgbilling.v1 import credit_service_pb2 as cp
from orgbilling.v1 import org_billing_service_pb2 as billing_pb
from orgbilling.v1 import reporting_service_pb2 as rp
from orgbilling.v1 import reporting_service_pb2_grpc
from orgbilling.v1 import types_pb2 as t
from orgbilling.server.servicers import reporting
from tests.support import Client, api_key, field_violations, new_key, raises_rpc

CODE = grpc.StatusCode


@pytest.fixture
def reports(client):
    return reporting_service_pb2_grpc.ReportingServiceStub(client.channel)


def deduct_batch(client, org_id, items):
    """Charges (user_id, amount, service_type, service_name) items in one
    transaction: they share one created_at, so only the id orders them."""
    response = client.credits.DeductCreditsBatch(cp.DeductCreditsBatchRequest(deductions=[
        cp.DeductCreditsRequest(org_id=org_id, user_id=user, amount_millicredits=amount,
                                service_type=stype, service_name=sname, idempotency_key=new_key())
        for user, amount, stype, sname in items]))
    assert all(r.HasField("deduction") for r in response.results), response
    return [r.deduction.deduction_id for r in response.results]


def walk(call, request):
    """Every page of a list from `request`, following next_page_token."""
    pages = []
    request = type(request)(**{f.name: v for f, v in request.ListFields()})
    while True:
        pages.append(call(request))
        request.page_token = pages[-1].next_page_token
        if not request.page_token:
            return pages


def usage_rows(database_url, org_id, where="true", params=()):
    """(deduction_id, created_at) of the org's deductions, newest first."""
    with psycopg.connect(database_url) as conn:
        return [str(d) for (d,) in conn.execute(
            f"SELECT deduction_id FROM credit_usage_attribution WHERE org_id = %s AND {where}"
            " ORDER BY created_at DESC, deduction_id DESC", (org_id, *params))]


def stamp(micros):
    return Timestamp(seconds=micros // 1_000_000, nanos=micros % 1_000_000 * 1000)


USERS = {"alice": 10**9, "bob": 10**9, "carol": 10**9}


@pytest.fixture
def acme(client):
    client.funded_org("acme", 10**10, USERS)
    ids = []
    for n in range(6):
        ids += deduct_batch(client, "acme", [
            (user, 1 + n, "llm" if i % 2 else "search", f"svc-{i % 3}")
            for i, user in enumerate(["alice", "bob", "carol", "alice", "bob"])])
    return ids


# ListUsage.

def test_every_deduction_appears_exactly_once_newest_first_while_deductions_go_on(client, reports,
                                                                                   database_url, acme):
    """Pages of 4 over 30 deductions (batches of 5 sharing a time) while two
    threads keep deducting through the server: each row that existed before
    the walk appears once, none twice, in (time, id) descending order."""
    before = usage_rows(database_url, "acme")
    stop = threading.Event()
    errors = []

    def keep_deducting(user):
        writer = Client(client.address, token=client.token)
        try:
            while not stop.is_set():
                deduct_batch(writer, "acme", [(user, 1, "llm", "svc-0")] * 3)
        except Exception as error:  # noqa: BLE001: reported below
            errors.append(error)
        finally:
            writer.close()

    threads = [threading.Thread(target=keep_deducting, args=(u,)) for u in ("alice", "bob")]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.2)
        seen = []
        token = ""
        while True:
            page = reports.ListUsage(rp.ListUsageRequest(org_id="acme", page_size=4, page_token=token))
            seen += [(r.create_time.ToMicroseconds(), r.deduction_id) for r in page.records]
            token = page.next_page_token
            time.sleep(0.01)  # let the writers commit between pages
            if not token:
                break
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not errors
    ids = [d for _, d in seen]
    assert len(ids) == len(set(ids))
    assert set(before) <= set(ids)
    assert seen == sorted(seen, reverse=True)
    assert len(usage_rows(database_url, "acme")) > len(before)  # the writers did write


def test_usage_records_carry_the_deduction(client, reports, acme, database_url):
    page = reports.ListUsage(rp.ListUsageRequest(org_id="acme", page_size=1))
    record = page.records[0]
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT user_id, amount_millicredits, service_type, service_name, request_id,"
            " epoch_micros(created_at) FROM credit_usage_attribution WHERE deduction_id = %s",
            (record.deduction_id,)).fetchone()
    assert (record.user_id, record.amount_millicredits, record.service_type, record.service_name,
            record.request_id, record.create_time.ToMicroseconds()) == row
    assert record.org_id == "acme" and record.request_id


def test_metadata_comes_back_as_given(client, reports):
    client.funded_org("meta", 10**9, {"alice": 10**8})
    client.credits.DeductCredits(cp.DeductCreditsRequest(
        org_id="meta", user_id="alice", amount_millicredits=5, service_type="llm", service_name="chat",
        idempotency_key=new_key(), metadata={"model": "gpt", "tokens": "1200"}))
    [record] = reports.ListUsage(rp.ListUsageRequest(org_id="meta")).records
    assert dict(record.metadata) == {"model": "gpt", "tokens": "1200"}


@pytest.mark.parametrize("filters, where, params", [
    ({"user_id": "alice"}, "user_id = %s", ("alice",)),
    ({"service_type": "llm"}, "service_type = %s", ("llm",)),
    ({"service_name": "svc-1"}, "service_name = %s", ("svc-1",)),
    ({"user_id": "bob", "service_type": "search", "service_name": "svc-1"},
     "user_id = %s AND service_type = %s AND service_name = %s", ("bob", "search", "svc-1")),
])
def test_filters_select_exactly_their_rows_on_every_page(reports, acme, database_url, filters, where, params):
    pages = walk(reports.ListUsage, rp.ListUsageRequest(org_id="acme", page_size=3, **filters))
    got = [r.deduction_id for page in pages for r in page.records]
    assert got == usage_rows(database_url, "acme", where, params)
    assert got  # the filter matches something


def test_time_range_is_start_included_end_excluded(reports, acme, database_url):
    with psycopg.connect(database_url) as conn:
        times = sorted({us for (us,) in conn.execute(
            "SELECT epoch_micros(created_at) FROM credit_usage_attribution WHERE org_id = 'acme'")})
    start, end = times[1], times[4]  # batch 2 in, batch 5 out
    pages = walk(reports.ListUsage, rp.ListUsageRequest(
        org_id="acme", page_size=2, time_range=rp.TimeRange(start_time=stamp(start), end_time=stamp(end))))
    got = [r.create_time.ToMicroseconds() for page in pages for r in page.records]
    assert sorted(set(got)) == times[1:4] and len(got) == 15


def test_a_token_with_other_filters_or_altered_is_invalid_argument(reports, acme):
    first = reports.ListUsage(rp.ListUsageRequest(org_id="acme", page_size=2, user_id="alice"))
    token = first.next_page_token
    assert token
    for other in ({"user_id": "bob"}, {"user_id": ""}, {"service_type": "llm"},
                  {"time_range": rp.TimeRange(start_time=stamp(0))}):
        request = rp.ListUsageRequest(org_id="acme", page_size=2, user_id="alice", page_token=token)
        for name, value in other.items():
            if name == "time_range":
                request.time_range.CopyFrom(value)
            else:
                setattr(request, name, value)
        with raises_rpc(CODE.INVALID_ARGUMENT) as failed:
            reports.ListUsage(request)
        assert field_violations(failed["error"]) == {"page_token"}
    for altered in (token[:-1], token + "A", token[:10] + ("A" if token[10] != "A" else "B") + token[11:],
                    token[:-1] + ("A" if token[-1] != "A" else "B"), "not a token", "%%%"):
        with raises_rpc(CODE.INVALID_ARGUMENT) as failed:
            reports.ListUsage(rp.ListUsageRequest(org_id="acme", page_size=2, user_id="alice",
                                                  page_token=altered))
        assert field_violations(failed["error"]) == {"page_token"}
    # The page size may change between pages.
    reports.ListUsage(rp.ListUsageRequest(org_id="acme", page_size=5, user_id="alice", page_token=token))


def test_a_token_never_shows_another_orgs_rows(client, reports, acme):
    """Another org's token is refused; a token forged for this org with
    another org's position (no secret needed) still shows this org's rows
    only."""
    client.funded_org("globex", 10**9, {"alice": 10**8})
    deduct_batch(client, "globex", [("alice", 1, "llm", "svc-0")] * 5)
    token = reports.ListUsage(rp.ListUsageRequest(org_id="acme", page_size=2)).next_page_token
    with raises_rpc(CODE.INVALID_ARGUMENT):
        reports.ListUsage(rp.ListUsageRequest(org_id="globex", page_size=2, page_token=token))

    acme_newest = reports.ListUsage(rp.ListUsageRequest(org_id="acme", page_size=1)).records[0]
    forged = reporting._USAGE_PAGES.encode(
        (acme_newest.create_time.ToMicroseconds() + 10**9, acme_newest.deduction_id),
        scope=("globex", "", "", "", None, None))
    pages = walk(reports.ListUsage, rp.ListUsageRequest(org_id="globex", page_size=2, page_token=forged))
    records = [r for page in pages for r in page.records]
    assert records and {r.org_id for r in records} == {"globex"}
    assert {r.user_id for r in records} == {"alice"} and len(records) == 5


def test_page_size_zero_means_the_default_and_out_of_range_is_refused(reports, acme, server):
    page = reports.ListUsage(rp.ListUsageRequest(org_id="acme"))
    assert len(page.records) == 30 and not page.next_page_token  # default 100
    for size in (-1, server.settings.page_size_max + 1):
        with raises_rpc(CODE.INVALID_ARGUMENT) as failed:
            reports.ListUsage(rp.ListUsageRequest(org_id="acme", page_size=size))
        assert field_violations(failed["error"]) == {"page_size"}


def test_bad_filters_and_times_name_their_fields(reports, acme):
    with raises_rpc(CODE.INVALID_ARGUMENT) as failed:
        reports.ListUsage(rp.ListUsageRequest(org_id="acme", user_id="no spaces", service_type="UPPER"))
    assert field_violations(failed["error"]) == {"user_id", "service_type"}
    bad_ranges = {
        "time_range.start_time": rp.TimeRange(start_time=Timestamp(seconds=10, nanos=1)),
        "time_range.end_time": rp.TimeRange(end_time=Timestamp(seconds=-62_135_596_801)),
    }
    for field, time_range in bad_ranges.items():
        with raises_rpc(CODE.INVALID_ARGUMENT) as failed:
            reports.ListUsage(rp.ListUsageRequest(org_id="acme", time_range=time_range))
        assert field_violations(failed["error"]) == {field}
    with raises_rpc(CODE.INVALID_ARGUMENT) as failed:
        reports.ListUsage(rp.ListUsageRequest(org_id="acme", time_range=rp.TimeRange(
            start_time=Timestamp(seconds=100), end_time=Timestamp(seconds=100))))
    assert field_violations(failed["error"]) == {"time_range.start_time"}


def test_lists_of_an_unknown_org_are_not_found_and_of_an_idle_one_empty(client, reports):
    for call, request in ((reports.ListUsage, rp.ListUsageRequest(org_id="nobody")),
                          (reports.ListBillingHistory, rp.ListBillingHistoryRequest(org_id="nobody")),
                          (reports.ListAllocationUsage, rp.ListAllocationUsageRequest(org_id="nobody"))):
        with raises_rpc(CODE.NOT_FOUND, "ORG_NOT_FOUND"):
            call(request)
    client.subscribe("idle")
    assert not reports.ListUsage(rp.ListUsageRequest(org_id="idle")).records
    assert not reports.ListAllocationUsage(rp.ListAllocationUsageRequest(org_id="idle")).allocations


# ListBillingHistory.

def history_rows(database_url, org_id, where="true", params=()):
    with psycopg.connect(database_url) as conn:
        return [(str(e), k) for e, k in conn.execute(
            f"SELECT event_id, event_type FROM org_billing_history WHERE org_id = %s AND {where}"
            " ORDER BY created_at DESC, event_id DESC", (org_id, *params))]


def test_billing_history_pages_newest_first_with_its_type_filter(client, reports, database_url, acme):
    for n in range(3):
        client.grant("acme", 1000 + n)
    pages = walk(reports.ListBillingHistory, rp.ListBillingHistoryRequest(org_id="acme", page_size=2))
    got = [(e.event_id, rp.BillingEventType.Name(e.event_type).removeprefix("BILLING_EVENT_TYPE_"))
           for page in pages for e in page.events]
    assert got == history_rows(database_url, "acme") and len(got) == 8

    credits = walk(reports.ListBillingHistory, rp.ListBillingHistoryRequest(
        org_id="acme", page_size=1, event_type=rp.BILLING_EVENT_TYPE_CREDITS_ADDED))
    events = [e for page in credits for e in page.events]
    assert [e.credits_delta_millicredits for e in events] == [1002, 1001, 1000, 10**10]
    assert {e.credit_source for e in events} == {t.CREDIT_SOURCE_GRANT}
    assert all(e.org_id == "acme" and e.create_time.seconds for e in events)

    token = credits[0].next_page_token
    with raises_rpc(CODE.INVALID_ARGUMENT) as failed:
        reports.ListBillingHistory(rp.ListBillingHistoryRequest(org_id="acme", page_size=1, page_token=token))
    assert field_violations(failed["error"]) == {"page_token"}
    with raises_rpc(CODE.INVALID_ARGUMENT) as failed:  # a ListUsage token is not a history token
        reports.ListBillingHistory(rp.ListBillingHistoryRequest(
            org_id="acme", page_token=reports.ListUsage(rp.ListUsageRequest(org_id="acme", page_size=1)).next_page_token))
    assert field_violations(failed["error"]) == {"page_token"}
    with raises_rpc(CODE.INVALID_ARGUMENT) as failed:
        reports.ListBillingHistory(rp.ListBillingHistoryRequest(org_id="acme", event_type=99))
    assert field_violations(failed["error"]) == {"event_type"}


# ListAllocationUsage.

def test_allocations_most_used_first_ties_by_user_id_on_every_page(client, reports, acme):
    for user in ("dave", "erin", "frank"):  # unused: tied at 0, by user id
        client.allocate("acme", user, 10**6)
    client.billing.RevokeAllocation(billing_pb.RevokeAllocationRequest(
        org_id="acme", user_id="frank", idempotency_key=new_key()))
    pages = walk(reports.ListAllocationUsage, rp.ListAllocationUsageRequest(org_id="acme", page_size=2))
    got = [(a.user_id, a.used_millicredits) for page in pages for a in page.allocations]
    # alice and bob are charged twice per batch, carol once.
    assert got == [("alice", 42), ("bob", 42), ("carol", 21), ("dave", 0), ("erin", 0)]
    assert [len(page.allocations) for page in pages] == [2, 2, 1]
    with raises_rpc(CODE.INVALID_ARGUMENT) as failed:
        reports.ListAllocationUsage(rp.ListAllocationUsageRequest(org_id="acme", page_token="AQ"))
    assert field_violations(failed["error"]) == {"page_token"}


# ListOrgSummaries.

def test_org_summaries_page_by_org_id_with_lifetime_spend(client, reports, acme):
    for org in ("m-org", "b-org", "z-org"):
        client.subscribe(org, plan=t.PLAN_HYBRID)
    pages = walk(reports.ListOrgSummaries, rp.ListOrgSummariesRequest(page_size=2))
    summaries = [s for page in pages for s in page.organizations]
    assert [s.org_id for s in summaries] == ["acme", "b-org", "m-org", "z-org"]
    assert [len(page.organizations) for page in pages] == [2, 2]
    acme_summary = summaries[0]
    assert acme_summary.plan == t.PLAN_BYOK and acme_summary.status == t.SUBSCRIPTION_STATUS_ACTIVE
    assert acme_summary.pool.used_millicredits == 105 and acme_summary.pool.total_millicredits == 10**10
    assert summaries[1].plan == t.PLAN_HYBRID and summaries[1].pool.used_millicredits == 0


def test_a_caller_limited_to_some_orgs_gets_no_platform_lists(client, reports, acme, database_url):
    """ListOrgSummaries and GetSystemBilling need a caller allowed every
    organization; billing.admin on one organization is not enough."""
    limited = Client(client.address, token=api_key(database_url, ["billing.admin", "credits.read"],
                                                   org_ids=["acme"]))
    try:
        stub = reporting_service_pb2_grpc.ReportingServiceStub(limited.channel)
        with raises_rpc(CODE.PERMISSION_DENIED):
            stub.ListOrgSummaries(rp.ListOrgSummariesRequest())
        with raises_rpc(CODE.PERMISSION_DENIED):
            stub.GetSystemBilling(rp.GetSystemBillingRequest())
        with raises_rpc(CODE.PERMISSION_DENIED):
            stub.ListUsage(rp.ListUsageRequest(org_id="globex"))
        assert len(stub.ListUsage(rp.ListUsageRequest(org_id="acme")).records) == 30
    finally:
        limited.close()
