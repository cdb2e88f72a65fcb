"""The summary reports of ReportingService, each checked against the same
figures computed again in plain Python from the rows the test placed: time
ranges and their edges, UTC days and months, ties, defaults, refusals, the
recurring revenue, the metrics that an old view multiplied, the corrected
views, and the summaries' agreement with the ledger under concurrency.

Semantics: docs/reporting.md. Deductions at chosen times are written straight
into credit_usage_attribution (tests/reporting_support.py) after the org, pool
and allocation exist through the RPCs, and the summary tables are rebuilt
from them, as a bulk load would."""

import concurrent.futures
import datetime as dt
import random
import threading

import grpc
import psycopg
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from orgbilling.v1 import credit_service_pb2 as credit_pb
from orgbilling.v1 import org_billing_service_pb2 as billing_pb
from orgbilling.v1 import reporting_service_pb2 as pb
from orgbilling.v1 import reporting_service_pb2_grpc
from orgbilling.v1 import types_pb2 as t
from orgbilling.server.catalog import PLAN_PRICES_CENTS
from orgbilling.server.verify import violations
from tests.reporting_support import (
    DAY, MICROSECOND, UTC, Usage, at, daily, expected_summary, in_range, insert_usage,
    last_30_days_start, midnight, moment, money, round_half_up_div, summary_as_tuples,
    timestamp, top_users, totals,
)
from tests.support import Client, api_key, field_violations, new_key, raises_rpc

CODE = grpc.StatusCode


@pytest.fixture
def reports(client):
    return reporting_service_pb2_grpc.ReportingServiceStub(client.channel)


def time_range(start=None, end=None) -> pb.TimeRange:
    kwargs = {}
    if start is not None:
        kwargs["start_time"] = timestamp(start)
    if end is not None:
        kwargs["end_time"] = timestamp(end)
    return pb.TimeRange(**kwargs)


def summary(reports, org_id, start=None, end=None, top=0):
    return reports.GetUsageSummary(pb.GetUsageSummaryRequest(
        org_id=org_id, time_range=time_range(start, end), top_users=top), timeout=30)


def metrics(reports, org_id, start=None, end=None):
    return reports.GetOrgBillingMetrics(pb.GetOrgBillingMetricsRequest(
        org_id=org_id, time_range=time_range(start, end)), timeout=30)


def subscribe(client, org_id, plan=t.PLAN_PLATFORM, cycle=t.BILLING_CYCLE_MONTHLY, trial_days=0):
    return client.billing.CreateSubscription(billing_pb.CreateSubscriptionRequest(
        org_id=org_id, plan=plan, billing_cycle=cycle, trial_days=trial_days,
        idempotency_key=new_key())).subscription


def cancel(client, org_id):
    return client.billing.CancelSubscription(billing_pb.CancelSubscriptionRequest(
        org_id=org_id, idempotency_key=new_key())).subscription


def deduct(client, org_id, user_id, amount, service_type="llm", service_name="chat"):
    return client.credits.DeductCredits(credit_pb.DeductCreditsRequest(
        org_id=org_id, user_id=user_id, amount_millicredits=amount, service_type=service_type,
        service_name=service_name, idempotency_key=new_key()), timeout=30)


def sql(database_url, statement, params=()):
    with psycopg.connect(database_url) as conn:
        conn.execute(statement, params)


def totals_of(usage_totals) -> tuple[int, int, int]:
    return usage_totals.used_millicredits, usage_totals.request_count, usage_totals.active_users


def utc_now() -> dt.datetime:
    return dt.datetime.now(UTC)


# GetUsageSummary: contents.

def test_usage_summary_of_an_org_without_usage_is_zeros_with_a_zero_for_every_day(client, reports):
    """An org that exists but never spent: zero totals, no breakdown or user
    entries, and one zero entry per UTC day the range touches (partial days
    at both edges included)."""
    client.funded_org("acme", 10_000, {"alice": 1_000})
    start, end = at(2025, 3, 1, 12), at(2025, 3, 4, 6)
    response = summary(reports, "acme", start, end)
    assert summary_as_tuples(response) == expected_summary([], "acme", start, end)
    assert [moment(d.day_start_time) for d in response.daily] == [
        at(2025, 3, 1), at(2025, 3, 2), at(2025, 3, 3), at(2025, 3, 4)]
    assert (moment(response.time_range.start_time), moment(response.time_range.end_time)) == (start, end)


def test_usage_summary_of_a_single_deduction(client, reports, database_url):
    """One deduction: every figure is that deduction, its user's last use is
    its time, and its day alone is non-zero."""
    client.funded_org("acme", 10_000, {"alice": 1_000})
    when = at(2025, 3, 2, 17, 45, 12, 345678)
    rows = [Usage("acme", "alice", 123, when, "search", "web")]
    insert_usage(database_url, rows)
    start, end = at(2025, 3, 1), at(2025, 3, 4)
    got = summary_as_tuples(summary(reports, "acme", start, end))
    assert got == expected_summary(rows, "acme", start, end)
    assert got["totals"] == (123, 1, 1)
    assert got["by_service_type"] == [("search", "", 123, 1)]
    assert got["by_service_name"] == [("search", "web", 123, 1)]
    assert got["top_users"] == [("alice", 123, 1, 1, when)]
    assert got["daily"] == [(at(2025, 3, 1), 0, 0), (at(2025, 3, 2), 123, 1), (at(2025, 3, 3), 0, 0)]


def test_usage_summary_breaks_ties_by_key_ascending(client, reports, database_url):
    """Equal usage is ordered by the key: service type; service type then
    name; user id. Rows are placed in reverse order so that insertion order
    cannot pass for the rule."""
    users = ["alice", "bob", "carol", "dave", "erin"]
    client.funded_org("acme", 100_000, {u: 10_000 for u in users})
    when = at(2025, 6, 10, 12)
    rows = [
        Usage("acme", "erin", 50, when, "llm", "chat"),
        Usage("acme", "dave", 100, when, "scrape", "page"),
        Usage("acme", "carol", 100, when, "llm", "code"),
        Usage("acme", "bob", 100, when, "search", "web"),
        Usage("acme", "alice", 100, when, "llm", "chat"),
    ]
    insert_usage(database_url, rows)
    start, end = at(2025, 6, 10), at(2025, 6, 11)
    got = summary_as_tuples(summary(reports, "acme", start, end, top=3))
    assert got == expected_summary(rows, "acme", start, end, top=3)
    assert [e[0] for e in got["by_service_type"]] == ["llm", "scrape", "search"]
    assert [(e[0], e[1]) for e in got["by_service_name"]] == [
        ("llm", "chat"), ("llm", "code"), ("scrape", "page"), ("search", "web")]
    assert [e[0] for e in got["top_users"]] == ["alice", "bob", "carol"]


def test_usage_summary_range_includes_its_start_and_excludes_its_end_to_the_microsecond(
        client, reports, database_url):
    """[start, end): a deduction exactly at start counts, one exactly at end
    does not, and one microsecond either side of each edge falls on the
    right side. Amounts are powers of two, so the total names the rows in."""
    client.funded_org("acme", 100_000, {"alice": 10_000})
    start, end = at(2025, 5, 10, 8, 30, 0, 250000), at(2025, 5, 12, 17, 0, 0, 1)
    rows = [
        Usage("acme", "alice", 1, start - MICROSECOND),
        Usage("acme", "alice", 2, start),
        Usage("acme", "alice", 4, start + MICROSECOND),
        Usage("acme", "alice", 8, end - MICROSECOND),
        Usage("acme", "alice", 16, end),
        Usage("acme", "alice", 32, end + MICROSECOND),
    ]
    insert_usage(database_url, rows)
    got = summary_as_tuples(summary(reports, "acme", start, end))
    assert got == expected_summary(rows, "acme", start, end)
    assert got["totals"] == (2 + 4 + 8, 3, 1)
    assert got["daily"] == [(at(2025, 5, 10), 6, 2), (at(2025, 5, 11), 0, 0), (at(2025, 5, 12), 8, 1)]
    assert got["top_users"][0][4] == end - MICROSECOND
    # The metrics report draws the same line.
    figures = metrics(reports, "acme", start, end)
    assert (figures.used_millicredits, figures.request_count, figures.active_users) == (14, 3, 1)


def test_usage_summary_puts_the_last_microsecond_of_a_utc_day_in_that_day(client, reports, database_url):
    """23:59:59.999999 belongs to its day and 00:00:00 to the next, in the
    daily series and in ranges that start or end at midnight."""
    client.funded_org("acme", 100_000, {"alice": 10_000, "bob": 10_000})
    rows = [
        Usage("acme", "alice", 1, at(2025, 1, 31, 23, 59, 59, 999999)),
        Usage("acme", "bob", 2, at(2025, 2, 1)),
    ]
    insert_usage(database_url, rows)
    got = summary_as_tuples(summary(reports, "acme", at(2025, 1, 31), at(2025, 2, 2)))
    assert got["daily"] == [(at(2025, 1, 31), 1, 1), (at(2025, 2, 1), 2, 1)]
    assert got == expected_summary(rows, "acme", at(2025, 1, 31), at(2025, 2, 2))
    only_first = summary_as_tuples(summary(reports, "acme", at(2025, 1, 30), at(2025, 2, 1)))
    assert only_first["totals"] == (1, 1, 1) and only_first["daily"][-1] == (at(2025, 1, 31), 1, 1)
    only_second = summary_as_tuples(summary(reports, "acme", at(2025, 2, 1), at(2025, 2, 3)))
    assert only_second["totals"] == (2, 1, 1) and only_second["top_users"][0][0] == "bob"


def placed_year(org_id: str, users, seed: int) -> list[Usage]:
    """Deductions from late January 2024 to late February 2025: random ones
    every few hours, and some at each edge the reports must get right (month
    and day boundaries, the microseconds around the ranges' ends)."""
    rng = random.Random(seed)
    services = [("llm", "chat"), ("llm", "code"), ("search", "web"), ("scrape", "page"), ("embed", "doc")]
    rows = []
    moment_ = at(2024, 1, 25)
    while moment_ < at(2025, 2, 25):
        moment_ += dt.timedelta(seconds=rng.randrange(3_600, 40_000), microseconds=rng.randrange(1_000_000))
        rows.append(Usage(org_id, rng.choice(users), rng.randrange(1, 5_000), moment_, *rng.choice(services)))
    edges = [at(2024, 2, 10, 13, 45, 12, 345677), at(2024, 2, 10, 13, 45, 12, 345678),
             at(2024, 2, 10, 0, 0), at(2024, 2, 10, 23, 59, 59, 999999),
             at(2024, 2, 29, 23, 59, 59, 999999), at(2024, 3, 1), at(2024, 12, 31, 23, 59, 59, 999999),
             at(2025, 1, 1), at(2025, 1, 31, 23, 59, 59, 999999), at(2025, 2, 1),
             at(2025, 2, 9), at(2025, 2, 9, 8, 0, 0), at(2025, 2, 9, 7, 59, 59, 999999),
             at(2025, 2, 9, 23, 59, 59, 999999)]
    for i, edge in enumerate(edges):
        rows.append(Usage(org_id, users[i % len(users)], 10_000 + i, edge, *services[i % len(services)]))
    return rows


def test_usage_summary_over_whole_months_partial_months_and_partial_days_matches_the_rows(
        client, reports, database_url):
    """The server adds monthly summaries, daily summaries and the raw rows of
    the partial days at the edges; every mix of those (a range of about a
    year touching 13 calendar months, whole months only, days only, part of
    one day) gives what the rows say, and nothing of another org leaks in."""
    users = [f"user-{i:02d}" for i in range(12)]
    client.funded_org("acme", 10_000_000, {u: 100_000 for u in users})
    client.funded_org("globex", 10_000_000, {u: 100_000 for u in users[:3]})
    rows = placed_year("acme", users, seed=7) + placed_year("globex", users[:3], seed=8)
    insert_usage(database_url, rows)
    ranges = [
        # Partial first day, rest of February 2024, March 2024 to January
        # 2025 whole, then part of February 2025 and a partial last day.
        (at(2024, 2, 10, 13, 45, 12, 345678), at(2025, 2, 9, 8, 0, 0)),
        # Whole months only (365 days).
        (at(2024, 3, 1), at(2025, 3, 1)),
        # The longest range allowed: 366 days, from a partial day.
        (at(2024, 2, 10, 13, 45, 12, 345678), at(2024, 2, 10, 13, 45, 12, 345678) + 366 * DAY),
        # Whole days inside one month, and part of one day.
        (at(2024, 7, 3), at(2024, 7, 19)),
        (at(2024, 7, 3, 6, 30), at(2024, 7, 3, 21, 15, 0, 1)),
        # Across one month boundary, partial days both sides.
        (at(2024, 11, 28, 9, 0, 0, 1), at(2024, 12, 2, 9, 0)),
    ]
    for start, end in ranges:
        expected = expected_summary(rows, "acme", start, end, top=100)
        got = summary_as_tuples(summary(reports, "acme", start, end, top=100))
        for part in expected:
            assert got[part] == expected[part], (start, end, part)
    # The default of 10 top users, out of 12 active ones.
    start, end = ranges[0]
    default = summary_as_tuples(summary(reports, "acme", start, end))
    assert default["top_users"] == expected_summary(rows, "acme", start, end, top=10)["top_users"]
    assert len(default["top_users"]) == 10
    assert default["totals"][2] == 12


def test_days_are_utc_days_whatever_the_database_time_zone(start_server, database_url, token):
    """Days and months are UTC's even when the database's sessions default to
    a zone 14 hours ahead, where 23:59 UTC on the last day of a month is
    already the next month (the server is started after the change)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"ALTER DATABASE \"{conn.info.dbname}\" SET timezone = 'Pacific/Kiritimati'")
    server = start_server(database_url)
    client = Client(f"127.0.0.1:{server.port}", token=token)
    reports = reporting_service_pb2_grpc.ReportingServiceStub(client.channel)
    try:
        client.funded_org("acme", 1_000_000, {"alice": 100_000, "bob": 100_000})
        now = utc_now()
        first = last_30_days_start(now)
        rows = [
            Usage("acme", "alice", 1, at(2024, 12, 31, 23, 59, 59, 999999)),
            Usage("acme", "bob", 2, at(2025, 1, 1)),
            Usage("acme", "alice", 4, at(2025, 1, 15, 11, 0)),
            Usage("acme", "bob", 8, at(2025, 1, 31, 23, 59, 59, 999999), "search", "web"),
            Usage("acme", "alice", 16, at(2025, 2, 1), "search", "web"),
            Usage("acme", "alice", 32, at(2025, 2, 1, 10, 30)),
            Usage("acme", "bob", 64, first - MICROSECOND),
            Usage("acme", "bob", 128, first),
        ]
        insert_usage(database_url, rows)
        for start, end in [(at(2024, 12, 31, 12), at(2025, 2, 1, 12)),   # a whole month, partial days
                           (at(2025, 1, 1), at(2025, 2, 1)),             # exactly January
                           (at(2024, 12, 31), at(2025, 1, 2)),           # two whole days
                           (at(2025, 1, 31, 20), at(2025, 2, 1, 4))]:    # across midnight UTC
            expected = expected_summary(rows, "acme", start, end, top=100)
            assert summary_as_tuples(summary(reports, "acme", start, end, top=100)) == expected, (start, end)
            figures = metrics(reports, "acme", start, end)
            assert (figures.used_millicredits, figures.request_count, figures.active_users) == expected["totals"]
        billing = reports.GetOrgBilling(pb.GetOrgBillingRequest(org_id="acme"), timeout=30)
        assert totals_of(billing.last_30_days) == (128, 1, 1)
    finally:
        client.close()


# GetUsageSummary and GetOrgBillingMetrics: defaults and refusals.

def test_unset_start_is_thirty_days_before_the_given_end(client, reports, database_url):
    """With only end_time set, the range starts exactly 30 days earlier: a
    deduction at that instant counts, one a microsecond before does not; the
    response states the range it used."""
    client.funded_org("acme", 100_000, {"alice": 10_000})
    end = at(2025, 6, 15, 12, 0, 0, 500)
    rows = [Usage("acme", "alice", 1, end - 30 * DAY - MICROSECOND),
            Usage("acme", "alice", 2, end - 30 * DAY),
            Usage("acme", "alice", 4, end - MICROSECOND)]
    insert_usage(database_url, rows)
    for response in (summary(reports, "acme", end=end), metrics(reports, "acme", end=end)):
        assert moment(response.time_range.start_time) == end - 30 * DAY
        assert moment(response.time_range.end_time) == end
    assert summary(reports, "acme", end=end).totals.used_millicredits == 6
    assert metrics(reports, "acme", end=end).used_millicredits == 6
    assert len(summary(reports, "acme", end=end).daily) == 31


def test_unset_end_is_now_and_unset_start_thirty_days_before_it(client, reports, database_url):
    """With no range at all, the report covers the 30 days up to the call:
    the end it states is the time of the call, the start 30 days before."""
    client.funded_org("acme", 100_000, {"alice": 10_000})
    now = utc_now()
    rows = [Usage("acme", "alice", 1, now - 31 * DAY), Usage("acme", "alice", 2, now - DAY),
            Usage("acme", "alice", 4, now - dt.timedelta(seconds=5))]
    insert_usage(database_url, rows)
    before = utc_now()
    response = summary(reports, "acme")
    after = utc_now()
    end = moment(response.time_range.end_time)
    assert before - dt.timedelta(seconds=1) <= end <= after + dt.timedelta(seconds=1)
    assert moment(response.time_range.start_time) == end - 30 * DAY
    assert response.totals.used_millicredits == 6
    figures = metrics(reports, "acme")
    assert moment(figures.time_range.start_time) == moment(figures.time_range.end_time) - 30 * DAY
    assert figures.used_millicredits == 6
    # Only a start: the end is still now.
    since = summary(reports, "acme", start=now - 2 * DAY)
    assert before - dt.timedelta(seconds=1) <= moment(since.time_range.end_time) <= utc_now() + dt.timedelta(seconds=1)
    assert since.totals.used_millicredits == 6


def bad_ranges():
    start = at(2025, 3, 1)
    return [
        ("start equal to end", pb.TimeRange(start_time=timestamp(start), end_time=timestamp(start)),
         "time_range"),
        ("start after end", pb.TimeRange(start_time=timestamp(start + DAY), end_time=timestamp(start)),
         "time_range"),
        ("span of 366 days and a microsecond",
         pb.TimeRange(start_time=timestamp(start), end_time=timestamp(start + 366 * DAY + MICROSECOND)),
         "time_range"),
        ("start not whole microseconds",
         pb.TimeRange(start_time=Timestamp(seconds=1_740_787_200, nanos=1),
                      end_time=timestamp(start + DAY)), "time_range.start_time"),
        ("end not whole microseconds",
         pb.TimeRange(start_time=timestamp(start),
                      end_time=Timestamp(seconds=1_740_873_600, nanos=999)),
         "time_range.end_time"),
        ("start before year 1",
         pb.TimeRange(start_time=Timestamp(seconds=-62_135_596_801),
                      end_time=timestamp(start)), "time_range.start_time"),
        ("end after year 9999",
         pb.TimeRange(start_time=timestamp(start),
                      end_time=Timestamp(seconds=253_402_300_800)),
         "time_range.end_time"),
    ]


def test_summaries_refuse_bad_ranges_and_arguments_naming_the_field(client, reports):
    """Each bad input is INVALID_ARGUMENT with a field violation naming it,
    for both summaries; a span of exactly 366 days is allowed."""
    client.funded_org("acme", 10_000, {"alice": 1_000})
    calls = {
        "GetUsageSummary": lambda **f: reports.GetUsageSummary(pb.GetUsageSummaryRequest(**f), timeout=30),
        "GetOrgBillingMetrics": lambda **f: reports.GetOrgBillingMetrics(
            pb.GetOrgBillingMetricsRequest(**f), timeout=30),
    }
    failures = []
    for rpc, call in calls.items():
        cases = [(case, {"org_id": "acme", "time_range": range_}, field)
                 for case, range_, field in bad_ranges()]
        cases += [("empty org id", {"org_id": ""}, "org_id"),
                  ("malformed org id", {"org_id": "acme corp!"}, "org_id"),
                  ("org id too long", {"org_id": "a" * 129}, "org_id")]
        if rpc == "GetUsageSummary":
            cases += [("101 top users", {"org_id": "acme", "top_users": 101}, "top_users"),
                      ("negative top users", {"org_id": "acme", "top_users": -1}, "top_users")]
        for case, fields, field in cases:
            try:
                call(**fields)
                failures.append(f"{rpc}: {case}: succeeded")
            except grpc.RpcError as error:
                named = field_violations(error)
                if error.code() != CODE.INVALID_ARGUMENT or not any(
                        v == field or v.startswith(field + ".") for v in named):
                    failures.append(f"{rpc}: {case}: {error.code()} {sorted(named)} {error.details()}")
        # The limits themselves are allowed.
        start = at(2025, 3, 1)
        call(org_id="acme", time_range=time_range(start, start + 366 * DAY))
    summary(reports, "acme", at(2025, 3, 1), at(2025, 3, 2), top=100)
    assert not failures, "\n".join(failures)


def test_org_scoped_reports_of_an_unknown_org_are_not_found(client, reports):
    """An org that does not exist is NOT_FOUND (ORG_NOT_FOUND) on every
    org-scoped summary; one that exists with no usage answers zeros."""
    client.funded_org("acme", 0, {})
    calls = [
        lambda org: reports.GetUsageSummary(pb.GetUsageSummaryRequest(org_id=org), timeout=30),
        lambda org: reports.GetOrgBillingMetrics(pb.GetOrgBillingMetricsRequest(org_id=org), timeout=30),
        lambda org: reports.GetOrgBilling(pb.GetOrgBillingRequest(org_id=org), timeout=30),
        lambda org: reports.ListAllocationUsage(pb.ListAllocationUsageRequest(org_id=org), timeout=30),
    ]
    for call in calls:
        with raises_rpc(CODE.NOT_FOUND, "ORG_NOT_FOUND"):
            call("ghost")
        call("acme")


# GetOrgBilling.

def test_org_billing_shows_subscription_pool_live_allocations_and_the_last_30_utc_days(
        client, reports, database_url):
    """The admin screen: the live subscription and pool as the billing RPCs
    show them, live allocations only, and the last 30 days as whole UTC days:
    midnight 29 days before today is in, the microsecond before it is out."""
    client.funded_org("acme", 100_000, {"alice": 10_000, "bob": 10_000, "carol": 10_000})
    deduct(client, "acme", "alice", 70)
    client.billing.RevokeAllocation(billing_pb.RevokeAllocationRequest(
        org_id="acme", user_id="carol", idempotency_key=new_key()))
    now = utc_now()
    first = last_30_days_start(now)
    insert_usage(database_url, [
        Usage("acme", "alice", 1, first),
        Usage("acme", "bob", 2, first - MICROSECOND),
        Usage("acme", "bob", 4, now - dt.timedelta(minutes=1)),
        Usage("acme", "alice", 8, now - 40 * DAY),
        Usage("acme", "carol", 16, now - 10 * DAY),
    ])
    response = reports.GetOrgBilling(pb.GetOrgBillingRequest(org_id="acme"), timeout=30)
    assert response.subscription == client.billing.GetSubscription(
        billing_pb.GetSubscriptionRequest(org_id="acme")).subscription
    assert response.pool == client.billing.GetCreditPool(billing_pb.GetCreditPoolRequest(org_id="acme")).pool
    assert response.allocation_count == 2
    # The deduction through the server (alice, 70) happened today too.
    assert totals_of(response.last_30_days) == (70 + 1 + 4 + 16, 4, 3)


def test_org_billing_without_a_live_subscription_leaves_it_unset(client, reports):
    """A canceled subscription is not the live one: the field is unset."""
    client.funded_org("acme", 1_000, {"alice": 100})
    cancel(client, "acme")
    response = reports.GetOrgBilling(pb.GetOrgBillingRequest(org_id="acme"), timeout=30)
    assert not response.HasField("subscription")
    assert response.pool.total_millicredits == 1_000 and response.allocation_count == 1
    assert totals_of(response.last_30_days) == (0, 0, 0)


# ListAllocationUsage.

def test_allocation_usage_lists_live_allocations_most_used_first_ties_by_user(client, reports):
    """Pages of two, read to the end: live allocations only, by used this
    period descending then user id, each as the billing service shows it."""
    used = {"alice": 30, "bob": 50, "carol": 50, "dave": 0, "erin": 100, "frank": 0, "gina": 10}
    client.funded_org("acme", 1_000_000, {user: 1_000 for user in used})
    for user, amount in used.items():
        if amount:
            deduct(client, "acme", user, amount)
    client.billing.RevokeAllocation(billing_pb.RevokeAllocationRequest(
        org_id="acme", user_id="gina", idempotency_key=new_key()))
    listed, token, pages = [], "", 0
    while True:
        page = reports.ListAllocationUsage(pb.ListAllocationUsageRequest(
            org_id="acme", page_size=2, page_token=token), timeout=30)
        assert len(page.allocations) <= 2
        listed.extend(page.allocations)
        pages += 1
        token = page.next_page_token
        if not token:
            break
        assert pages < 5
    assert [(a.user_id, a.used_millicredits) for a in listed] == [
        ("erin", 100), ("bob", 50), ("carol", 50), ("alice", 30), ("dave", 0), ("frank", 0)]
    billing = {a.user_id: a for a in client.billing.ListAllocations(
        billing_pb.ListAllocationsRequest(org_id="acme")).allocations}
    for allocation in listed:
        assert allocation == billing[allocation.user_id]
        assert allocation.remaining_millicredits == 1_000 - used[allocation.user_id]
    # One page with everything says the same.
    whole = reports.ListAllocationUsage(pb.ListAllocationUsageRequest(org_id="acme"), timeout=30)
    assert list(whole.allocations) == listed and not whole.next_page_token


def test_allocation_usage_orders_by_this_periods_use_a_due_reset_counting_as_zero(client, reports, database_url):
    """"Most used this period": an allocation whose period is due for reset
    (no sweep has run yet) has used nothing this period, and sorts so."""
    client.funded_org("acme", 1_000_000, {"alice": 1_000})
    for user in ("bob", "hank"):
        client.allocate("acme", user, 1_000, reset_period=t.RESET_PERIOD_DAILY)
    deduct(client, "acme", "alice", 30)
    deduct(client, "acme", "bob", 20)
    deduct(client, "acme", "hank", 500)
    # The period's end moved into the past by SQL: no RPC waits a day.
    sql(database_url, "UPDATE user_credit_allocations SET next_reset_at = now() - interval '1 minute'"
                      " WHERE org_id = 'acme' AND user_id = 'hank'")
    listed = reports.ListAllocationUsage(pb.ListAllocationUsageRequest(org_id="acme"), timeout=30).allocations
    assert [(a.user_id, a.used_millicredits, a.remaining_millicredits) for a in listed] == [
        ("alice", 30, 970), ("bob", 20, 980), ("hank", 0, 1_000)]
    paged, token = [], ""
    for _ in range(3):
        page = reports.ListAllocationUsage(pb.ListAllocationUsageRequest(
            org_id="acme", page_size=1, page_token=token), timeout=30)
        paged.extend(page.allocations)
        token = page.next_page_token
        if not token:
            break
    assert [a.user_id for a in paged] == ["alice", "bob", "hank"] and not token


def test_allocation_usage_refuses_bad_page_arguments(client, reports):
    """Negative or too large page sizes and altered tokens are INVALID_ARGUMENT."""
    client.funded_org("acme", 10_000, {"a": 1, "b": 1, "c": 1})
    for fields, field in [({"page_size": -1}, "page_size"), ({"page_size": 1001}, "page_size"),
                          ({"page_token": "not-a-token"}, "page_token")]:
        with raises_rpc(CODE.INVALID_ARGUMENT) as refused:
            reports.ListAllocationUsage(pb.ListAllocationUsageRequest(org_id="acme", **fields), timeout=30)
        assert field in field_violations(refused["error"])


# GetUserBilling.

def user_billing_setup(client, database_url):
    """alice has live allocations in a-org (PLATFORM monthly), b-org (BYOK
    yearly) and c-org (canceled: no plan), a revoked one in d-org and none in
    z-org; the rows are hers and bob's around the 30-day edge."""
    client.funded_org("a-org", 100_000, {"alice": 5_000, "bob": 5_000})
    subscribe(client, "b-org", t.PLAN_BYOK, t.BILLING_CYCLE_YEARLY)
    client.grant("b-org", 100_000)
    client.allocate("b-org", "alice", 6_000)
    client.funded_org("c-org", 100_000, {"alice": 7_000})
    cancel(client, "c-org")
    client.funded_org("d-org", 100_000, {"alice": 8_000})
    client.funded_org("z-org", 100_000, {"bob": 9_000})
    now = utc_now()
    first = last_30_days_start(now)
    insert_usage(database_url, [
        Usage("a-org", "alice", 5, now - DAY),
        Usage("a-org", "alice", 7, first),
        Usage("a-org", "alice", 100, now - 31 * DAY),
        Usage("a-org", "bob", 1_000, now - DAY),
        Usage("b-org", "alice", 11, first + dt.timedelta(hours=1)),
        Usage("c-org", "alice", 13, first - MICROSECOND),
        Usage("d-org", "alice", 17, now - DAY),
        Usage("z-org", "bob", 19, now - DAY),
    ])
    client.billing.RevokeAllocation(billing_pb.RevokeAllocationRequest(
        org_id="d-org", user_id="alice", idempotency_key=new_key()))


def test_user_billing_lists_the_users_live_allocations_by_org_with_plan_price_and_30_days(
        client, reports, database_url):
    """Every org where the user has a live allocation, by org id: the
    allocation, the live plan and price (none for a canceled one), and the
    user's own usage in the last 30 UTC days; totals over those orgs only."""
    user_billing_setup(client, database_url)
    with raises_rpc(CODE.INVALID_ARGUMENT) as refused:
        reports.GetUserBilling(pb.GetUserBillingRequest(user_id="not a user id!"), timeout=30)
    assert "user_id" in field_violations(refused["error"])
    response = reports.GetUserBilling(pb.GetUserBillingRequest(user_id="alice"), timeout=30)
    assert [o.allocation.org_id for o in response.organizations] == ["a-org", "b-org", "c-org"]
    a, b, c = response.organizations
    assert (a.plan, a.price.amount_cents, a.price.currency) == (
        t.PLAN_BYOK, PLAN_PRICES_CENTS[("BYOK", "MONTHLY")], "USD")
    assert (b.plan, b.price.amount_cents, b.price.currency) == (
        t.PLAN_BYOK, PLAN_PRICES_CENTS[("BYOK", "YEARLY")], "USD")
    assert c.plan == t.PLAN_UNSPECIFIED and c.price.amount_cents == 0
    assert [totals_of(o.last_30_days) for o in response.organizations] == [(12, 2, 1), (11, 1, 1), (0, 0, 0)]
    for entry in response.organizations:
        assert entry.allocation.user_id == "alice"
        shown = client.billing.ListAllocations(billing_pb.ListAllocationsRequest(
            org_id=entry.allocation.org_id)).allocations
        assert entry.allocation == next(x for x in shown if x.user_id == "alice")
    assert (response.used_millicredits_30_days, response.request_count_30_days,
            response.active_organizations_30_days) == (23, 3, 2)


def test_user_billing_shows_an_org_limited_caller_only_its_orgs(client, reports, database_url, server):
    """A caller limited to a-org, c-org and z-org sees alice's a-org and c-org
    entries only, and totals over those alone."""
    user_billing_setup(client, database_url)
    limited = Client(client.address, token=api_key(database_url, ["credits.read"],
                                                    org_ids=["a-org", "c-org", "z-org"]))
    server.security.key_ring.refresh()
    try:
        response = reporting_service_pb2_grpc.ReportingServiceStub(limited.channel).GetUserBilling(
            pb.GetUserBillingRequest(user_id="alice"), timeout=30)
    finally:
        limited.close()
    assert [o.allocation.org_id for o in response.organizations] == ["a-org", "c-org"]
    assert (response.used_millicredits_30_days, response.request_count_30_days,
            response.active_organizations_30_days) == (12, 2, 1)


# GetSystemBilling.

def system_billing_setup(client, database_url):
    """Subscriptions of every plan, cycle, status and two currencies, and the
    usage of the last 30 days around its first midnight. The EUR prices are
    set by SQL, as no RPC can set them (prices are the catalog's, in USD);
    so are the PAST_DUE statuses, which only a failed payment reaches
    (RecordInvoice), to keep these reports' tests apart from that RPC."""
    def org(org_id, plan, cycle, trial_days=0):
        subscribe(client, org_id, plan, cycle, trial_days)
        client.grant(org_id, 1_000_000)
        client.allocate(org_id, "alice", 100_000)

    org("o-1", t.PLAN_PLATFORM, t.BILLING_CYCLE_MONTHLY)
    org("o-2", t.PLAN_PLATFORM, t.BILLING_CYCLE_YEARLY)
    org("o-3", t.PLAN_HYBRID, t.BILLING_CYCLE_YEARLY)
    org("o-4", t.PLAN_BYOK, t.BILLING_CYCLE_MONTHLY, trial_days=14)
    org("o-5", t.PLAN_BYOK, t.BILLING_CYCLE_MONTHLY)
    cancel(client, "o-5")
    subscribe(client, "o-5", t.PLAN_HYBRID, t.BILLING_CYCLE_MONTHLY)
    org("o-6", t.PLAN_HYBRID, t.BILLING_CYCLE_YEARLY)
    org("o-7", t.PLAN_PLATFORM, t.BILLING_CYCLE_MONTHLY)
    cancel(client, "o-7")
    org("o-8", t.PLAN_PLATFORM, t.BILLING_CYCLE_MONTHLY)
    live = "status IN ('TRIALING', 'ACTIVE', 'PAST_DUE')"
    sql(database_url, f"UPDATE organization_subscriptions SET status = 'PAST_DUE' WHERE org_id = 'o-3' AND {live}")
    sql(database_url, f"UPDATE organization_subscriptions SET price_cents = 1806, currency = 'EUR'"
                      f" WHERE org_id = 'o-6' AND {live}")
    sql(database_url, f"UPDATE organization_subscriptions SET status = 'PAST_DUE', price_cents = 999,"
                      f" currency = 'EUR' WHERE org_id = 'o-8' AND {live}")
    now = utc_now()
    first = last_30_days_start(now)
    insert_usage(database_url, [
        Usage("o-1", "alice", 100, now - DAY),
        Usage("o-2", "alice", 60, first),
        Usage("o-2", "alice", 40, now - 2 * DAY),
        Usage("o-3", "alice", 300, now - 3 * DAY),
        Usage("o-4", "alice", 50, now - 4 * DAY),
        Usage("o-5", "alice", 1_000, now - 40 * DAY),
        Usage("o-6", "alice", 500, first - MICROSECOND),
    ])


def test_system_billing_recurring_revenue_plans_and_top_orgs(client, reports, database_url):
    """MRR and ARR per currency over ACTIVE and PAST_DUE subscriptions only
    (yearly prices count once a year, a twelfth a month, rounded half up),
    subscriptions per plan and status, the active count, the org count, and
    the orgs that used the most in the last 30 UTC days, ties by org id."""
    system_billing_setup(client, database_url)
    usd_arr = {  # per (plan, status): the ARR of its billed subscriptions
        ("PLATFORM", "ACTIVE"): 12 * 4_900 + 49_000,   # o-1 monthly, o-2 yearly
        ("HYBRID", "PAST_DUE"): 29_000,                # o-3 yearly
        ("HYBRID", "ACTIVE"): 12 * 2_900,              # o-5's second subscription
    }
    eur_arr = {("HYBRID", "ACTIVE"): 1_806, ("PLATFORM", "PAST_DUE"): 12 * 999}  # o-6 yearly, o-8 monthly
    response = reports.GetSystemBilling(pb.GetSystemBillingRequest(), timeout=30)
    usd, eur = sum(usd_arr.values()), sum(eur_arr.values())
    assert money(response.arr) == {"USD": usd, "EUR": eur}
    # 171,600 / 12 = 14,300; 13,794 / 12 = 1,149.5, rounded half up.
    assert money(response.mrr) == {"USD": round_half_up_div(usd, 12), "EUR": round_half_up_div(eur, 12)}
    assert money(response.mrr) == {"USD": 14_300, "EUR": 1_150}
    assert response.active_subscriptions == 4  # o-1, o-2, o-5, o-6
    assert response.organization_count == 8
    plans = {(t.Plan.Name(p.plan), t.SubscriptionStatus.Name(p.status)): (p.subscription_count, money(p.mrr))
             for p in response.plans}
    assert len(plans) == len(response.plans), "a plan and status listed twice"
    for entry in response.plans:
        if entry.status in (t.SUBSCRIPTION_STATUS_TRIALING, t.SUBSCRIPTION_STATUS_CANCELED):
            assert not entry.mrr, entry  # empty, not zeros
    status = "SUBSCRIPTION_STATUS_"
    assert plans == {
        ("PLAN_PLATFORM", status + "ACTIVE"): (2, {"USD": round_half_up_div(12 * 4_900 + 49_000, 12)}),
        ("PLAN_HYBRID", status + "PAST_DUE"): (1, {"USD": round_half_up_div(29_000, 12)}),
        ("PLAN_BYOK", status + "TRIALING"): (1, {}),
        ("PLAN_BYOK", status + "CANCELED"): (1, {}),
        ("PLAN_HYBRID", status + "ACTIVE"): (2, {"USD": 2_900, "EUR": round_half_up_div(1_806, 12)}),
        ("PLAN_PLATFORM", status + "CANCELED"): (1, {}),
        ("PLAN_PLATFORM", status + "PAST_DUE"): (1, {"EUR": 999}),
    }
    assert [(o.org_id, o.used_millicredits, o.request_count) for o in response.top_orgs] == [
        ("o-3", 300, 1), ("o-1", 100, 1), ("o-2", 100, 2), ("o-4", 50, 1)]
    two = reports.GetSystemBilling(pb.GetSystemBillingRequest(top_orgs=2), timeout=30)
    assert [o.org_id for o in two.top_orgs] == ["o-3", "o-1"]


def test_system_billing_top_orgs_default_to_ten_and_refuse_over_a_hundred(client, reports, database_url):
    """Twelve orgs with usage: ten by default, all with 100; 101 and negative
    are INVALID_ARGUMENT naming top_orgs."""
    now = utc_now()
    rows = []
    for i in range(12):
        client.funded_org(f"org-{i:02d}", 10_000, {"alice": 1_000})
        rows.append(Usage(f"org-{i:02d}", "alice", 10 + i // 2, now - DAY))
    insert_usage(database_url, rows)
    default = reports.GetSystemBilling(pb.GetSystemBillingRequest(), timeout=30)
    expected = sorted(((r.org_id, r.amount) for r in rows), key=lambda e: (-e[1], e[0]))
    assert [(o.org_id, o.used_millicredits) for o in default.top_orgs] == expected[:10]
    everything = reports.GetSystemBilling(pb.GetSystemBillingRequest(top_orgs=100), timeout=30)
    assert [(o.org_id, o.used_millicredits) for o in everything.top_orgs] == expected
    for bad in (101, -1):
        with raises_rpc(CODE.INVALID_ARGUMENT) as refused:
            reports.GetSystemBilling(pb.GetSystemBillingRequest(top_orgs=bad), timeout=30)
        assert "top_orgs" in field_violations(refused["error"])


def test_platform_reports_refuse_org_limited_callers_and_callers_without_billing_admin(
        client, reports, database_url, server):
    """GetSystemBilling and ListOrgSummaries span every org: a caller limited
    to some is PERMISSION_DENIED even with every scope, and a caller without
    billing.admin is PERMISSION_DENIED (MISSING_SCOPE)."""
    from orgbilling.server.auth.scopes import ALL_SCOPES

    client.funded_org("acme", 1_000, {"alice": 100})
    limited = Client(client.address, token=api_key(database_url, sorted(ALL_SCOPES), org_ids=["acme"]))
    reader = Client(client.address, token=api_key(database_url, ["credits.read"]))
    server.security.key_ring.refresh()
    try:
        for caller, reason in ((limited, None), (reader, "MISSING_SCOPE")):
            stub = reporting_service_pb2_grpc.ReportingServiceStub(caller.channel)
            with raises_rpc(CODE.PERMISSION_DENIED, reason):
                stub.GetSystemBilling(pb.GetSystemBillingRequest(), timeout=30)
            with raises_rpc(CODE.PERMISSION_DENIED, reason):
                stub.ListOrgSummaries(pb.ListOrgSummariesRequest(), timeout=30)
        # The limited caller may read its own org's reports.
        reporting_service_pb2_grpc.ReportingServiceStub(limited.channel).GetUsageSummary(
            pb.GetUsageSummaryRequest(org_id="acme"), timeout=30)
    finally:
        limited.close()
        reader.close()


# ListOrgSummaries.

def test_org_summaries_list_every_org_by_id_with_live_plan_status_and_pool(client, reports, database_url):
    """Pages of three, read to the end: every org by id, its live plan and
    status (unspecified when it has none), and its pool with lifetime used."""
    client.funded_org("o-b", 50_000, {"alice": 10_000})
    deduct(client, "o-b", "alice", 120)
    subscribe(client, "o-a", t.PLAN_BYOK, t.BILLING_CYCLE_MONTHLY, trial_days=7)
    client.funded_org("o-c", 7_000, {})
    cancel(client, "o-c")
    subscribe(client, "o-e", t.PLAN_HYBRID, t.BILLING_CYCLE_YEARLY)
    client.funded_org("o-d", 9_000, {"bob": 9_000})
    deduct(client, "o-d", "bob", 4_000)
    # PAST_DUE by SQL: only a failed payment (RecordInvoice) reaches it.
    sql(database_url, "UPDATE organization_subscriptions SET status = 'PAST_DUE'"
                      " WHERE org_id = 'o-d' AND status = 'ACTIVE'")
    listed, token = [], ""
    for _ in range(4):
        page = reports.ListOrgSummaries(pb.ListOrgSummariesRequest(page_size=3, page_token=token), timeout=30)
        assert len(page.organizations) <= 3
        listed.extend(page.organizations)
        token = page.next_page_token
        if not token:
            break
    assert not token
    s = "SUBSCRIPTION_STATUS_"
    assert [(o.org_id, t.Plan.Name(o.plan), t.SubscriptionStatus.Name(o.status)) for o in listed] == [
        ("o-a", "PLAN_BYOK", s + "TRIALING"), ("o-b", "PLAN_BYOK", s + "ACTIVE"),
        ("o-c", "PLAN_UNSPECIFIED", s + "UNSPECIFIED"), ("o-d", "PLAN_BYOK", s + "PAST_DUE"),
        ("o-e", "PLAN_HYBRID", s + "ACTIVE")]
    for entry in listed:
        assert entry.pool == client.billing.GetCreditPool(
            billing_pb.GetCreditPoolRequest(org_id=entry.org_id)).pool
    assert [o.pool.used_millicredits for o in listed] == [0, 120, 0, 4_000, 0]


# GetOrgBillingMetrics and the view that multiplied.

WINDOW = (at(2025, 4, 1), at(2025, 5, 1))


def invoice_history(org_id: str, window, seed: int):
    """Invoices and their events around a window: (invoices, events). Each
    invoice is first recorded by its earliest event; statuses as events
    arrive; a failed payment later paid, invoices before and after the
    window, two currencies."""
    rng = random.Random(seed)
    start, end = window
    invoices, events = [], []

    def invoice(name, amount, currency, plan):
        """plan: [(event type, time)], in time order."""
        status_of = {"INVOICE_CREATED": "CREATED", "INVOICE_PAID": "PAID",
                     "INVOICE_PAYMENT_FAILED": "FAILED", "INVOICE_VOIDED": "VOIDED"}
        for event_type, when in plan:
            events.append((org_id, event_type, name, amount, currency, when))
        invoices.append((org_id, name, status_of[plan[-1][0]], amount, currency, plan[0][1], plan[-1][1]))

    for i in range(14):
        created = start + dt.timedelta(days=rng.randrange(0, 25), seconds=rng.randrange(86_400))
        amount, currency = rng.randrange(100, 90_000), ("USD", "EUR")[i % 2]
        kind = i % 4
        if kind == 0:
            plan = [("INVOICE_CREATED", created), ("INVOICE_PAID", created + dt.timedelta(days=2))]
        elif kind == 1:
            plan = [("INVOICE_CREATED", created), ("INVOICE_PAYMENT_FAILED", created + DAY),
                    ("INVOICE_PAID", created + 3 * DAY)]
        elif kind == 2:
            plan = [("INVOICE_CREATED", created), ("INVOICE_PAYMENT_FAILED", created + DAY)]
        else:
            plan = [("INVOICE_CREATED", created)]
        invoice(f"inv-{i:03d}", amount, currency, plan)
    # Created before the window, paid in it: revenue, not an invoice of the window.
    invoice("inv-early", 7_777, "USD", [("INVOICE_CREATED", start - 5 * DAY), ("INVOICE_PAID", start)])
    # Created in the window, paid and failed on the edge after it.
    invoice("inv-late", 5_555, "USD", [("INVOICE_CREATED", end - MICROSECOND),
                                       ("INVOICE_PAYMENT_FAILED", end), ("INVOICE_PAID", end + DAY)])
    # Wholly after the window, and one voided in it.
    invoice("inv-after", 3_333, "EUR", [("INVOICE_CREATED", end + 2 * DAY), ("INVOICE_PAID", end + 3 * DAY)])
    invoice("inv-void", 2_222, "EUR", [("INVOICE_CREATED", start + DAY), ("INVOICE_VOIDED", start + 2 * DAY)])
    return invoices, events


def insert_invoices(database_url, invoices, events) -> None:
    """Invoices and their billing-history events, straight into the tables,
    at their times (RecordInvoice would record them now)."""
    with psycopg.connect(database_url) as conn:
        with conn.cursor() as cursor:
            cursor.executemany(
                """INSERT INTO invoices (org_id, external_invoice_id, status, amount_cents, currency,
                                         period_start, period_end, created_at, updated_at)
                   VALUES (%s, %s, %s, %s, %s, '2025-03-01Z', '2025-04-01Z', %s, %s)""", invoices)
            cursor.executemany(
                """INSERT INTO org_billing_history (org_id, event_type, external_invoice_id,
                                                    amount_paid_cents, currency, created_at)
                   VALUES (%s, %s, %s, %s, %s, %s)""", events)


def expected_metrics(invoices, events, usage, org_id, start, end) -> dict:
    revenue = {}
    for org, event_type, _, amount, currency, when in events:
        if org == org_id and event_type == "INVOICE_PAID" and start <= when < end:
            revenue[currency] = revenue.get(currency, 0) + amount
    used, requests, users = totals(in_range(usage, org_id, start, end))
    return {
        "invoice_count": sum(1 for i in invoices if i[0] == org_id and start <= i[5] < end),
        "revenue_paid": revenue,
        "failed_payment_count": sum(1 for e in events if e[0] == org_id and e[1] == "INVOICE_PAYMENT_FAILED"
                                    and start <= e[5] < end),
        "used_millicredits": used, "request_count": requests, "active_users": users,
    }


def metrics_as_dict(response) -> dict:
    return {
        "invoice_count": response.invoice_count, "revenue_paid": money(response.revenue_paid),
        "failed_payment_count": response.failed_payment_count,
        "used_millicredits": response.used_millicredits, "request_count": response.request_count,
        "active_users": response.active_users,
    }


def metrics_dataset(client, database_url, window=WINDOW, keep=lambda when: True):
    """acme: many invoice events and many deductions in the window (and
    around it); globex: a little of each, which must not leak into acme's
    figures. Rows at times `keep` refuses are left out."""
    users = [f"u{i}" for i in range(6)]
    client.funded_org("acme", 1_000_000, {u: 100_000 for u in users})
    client.funded_org("globex", 1_000_000, {"u0": 100_000})
    rng = random.Random(11)
    start, end = window
    usage = [Usage("acme", rng.choice(users), rng.randrange(1, 900),
                   start - 3 * DAY + dt.timedelta(seconds=rng.randrange(36 * 86_400)),
                   rng.choice(["llm", "search"]), rng.choice(["a", "b"])) for _ in range(80)]
    usage += [Usage("acme", "u1", 1_234, start), Usage("acme", "u2", 4_321, end),
              Usage("globex", "u0", 999, start + DAY)]
    usage = [r for r in usage if keep(r.created_at)]
    insert_usage(database_url, usage)
    invoices, events = [], []
    for org, seed in (("acme", 3), ("globex", 4)):
        org_invoices, org_events = invoice_history(org, window, seed)
        invoices += org_invoices
        events += [e for e in org_events if keep(e[5])]
    insert_invoices(database_url, invoices, events)
    return usage, invoices, events


def test_org_billing_metrics_count_each_figure_on_its_own_with_many_history_and_usage_rows(
        client, reports, database_url):
    """The old metrics view joined billing history and attribution on the org
    and multiplied each sum by the other table's row count. With dozens of
    invoice events and dozens of deductions in one window, every figure is
    what its own rows say: invoices first recorded in the range, revenue of
    INVOICE_PAID events per currency, failed payments, usage."""
    usage, invoices, events = metrics_dataset(client, database_url)
    start, end = WINDOW
    in_window = [e for e in events if e[0] == "acme" and start <= e[5] < end]
    assert len(in_window) > 25 and len(in_range(usage, "acme", start, end)) > 50
    expected = expected_metrics(invoices, events, usage, "acme", start, end)
    got = metrics(reports, "acme", start, end)
    assert metrics_as_dict(got) == expected
    assert expected["invoice_count"] == 16 and expected["failed_payment_count"] == 7
    # Another window: the edges of inv-late and inv-early move with it.
    later = (start + 10 * DAY, end + 10 * DAY)
    assert metrics_as_dict(metrics(reports, "acme", *later)) == expected_metrics(
        invoices, events, usage, "acme", *later)
    globex = metrics(reports, "globex", start, end)
    assert metrics_as_dict(globex) == expected_metrics(invoices, events, usage, "globex", start, end)


def test_org_billing_metrics_count_invoices_recorded_through_record_invoice_once_per_event(client, reports):
    """Invoices recorded through RecordInvoice, with a webhook redelivered:
    the metrics count each invoice once, each failed payment once per
    invoice, and revenue from the paid events per currency."""
    client.funded_org("acme", 1_000, {})

    def record(invoice_id, status, amount, currency="USD"):
        return client.billing.RecordInvoice(billing_pb.RecordInvoiceRequest(
            org_id="acme", external_invoice_id=invoice_id, status=status, amount_cents=amount,
            currency=currency, period_start_time=timestamp(at(2025, 1, 1)),
            period_end_time=timestamp(at(2025, 2, 1))), timeout=30)

    record("in-1", t.INVOICE_STATUS_CREATED, 4_900)
    record("in-1", t.INVOICE_STATUS_FAILED, 4_900)
    record("in-1", t.INVOICE_STATUS_PAID, 4_900)
    record("in-2", t.INVOICE_STATUS_CREATED, 1_234, "EUR")
    record("in-2", t.INVOICE_STATUS_PAID, 1_234, "EUR")
    record("in-2", t.INVOICE_STATUS_PAID, 1_234, "EUR")  # redelivered: a replay
    record("in-3", t.INVOICE_STATUS_FAILED, 999)          # its first webhook is a failure
    assert record("in-3", t.INVOICE_STATUS_FAILED, 999).replayed
    record("in-4", t.INVOICE_STATUS_CREATED, 50)
    record("in-4", t.INVOICE_STATUS_VOIDED, 50)
    figures = metrics_as_dict(metrics(reports, "acme"))
    assert figures == {"invoice_count": 4, "revenue_paid": {"USD": 4_900, "EUR": 1_234},
                       "failed_payment_count": 2, "used_millicredits": 0, "request_count": 0,
                       "active_users": 0}


# The views, corrected.

VIEWS = ("org_billing_summary", "user_multi_org_credits", "top_credit_users_by_org", "org_billing_metrics")


def view_rows(database_url, view) -> list[dict]:
    with psycopg.connect(database_url) as conn:
        cursor = conn.execute(f"SELECT * FROM {view}")
        names = [c.name for c in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]


def enum_name(value) -> str:
    """'ACTIVE' from SUBSCRIPTION_STATUS_ACTIVE, 'PLATFORM' from PLAN_PLATFORM, None for unspecified."""
    if value.endswith("_UNSPECIFIED"):
        return None
    for prefix in ("SUBSCRIPTION_STATUS_", "PLAN_", "BILLING_CYCLE_", "RESET_PERIOD_"):
        if value.startswith(prefix):
            return value[len(prefix):]
    return value


def test_the_four_corrected_views_exist_and_agree_with_the_reports(client, reports, database_url):
    """The old module's four views, for people who query the database: the
    same dataset as the metrics test, placed in the last 30 days, gives one
    row per org (org_billing_summary, org_billing_metrics), per org and
    user with usage (top_credit_users_by_org) and per live allocation
    (user_multi_org_credits), each agreeing with the report that shows the
    same thing; org_billing_metrics is not multiplied."""
    now = utc_now()
    window = (last_30_days_start(now), midnight(now))
    # Rows between now and the end of today would be counted by a whole-day
    # "last 30 days" and not by one up to now: none are placed there.
    usage, invoices, events = metrics_dataset(
        client, database_url, window,
        keep=lambda when: not now - dt.timedelta(hours=1) <= when < midnight(now) + 2 * DAY)
    subscribe(client, "zeta", t.PLAN_BYOK, t.BILLING_CYCLE_YEARLY, trial_days=5)  # no usage, no pool credits
    with psycopg.connect(database_url) as conn:
        present = {name for (name,) in conn.execute(
            "SELECT table_name FROM information_schema.views WHERE table_schema = 'public'")}
    assert set(VIEWS) <= present
    orgs = ["acme", "globex", "zeta"]
    start, end = window[0], utc_now()

    # org_billing_metrics: one row per org, each figure GetOrgBillingMetrics'
    # over the last 30 days, and the rows' own sums.
    rows = view_rows(database_url, "org_billing_metrics")
    assert sorted(r["org_id"] for r in rows) == orgs
    for row in rows:
        expected = expected_metrics(invoices, events, usage, row["org_id"], start, end)
        got = {name: row[name] for name in expected}
        got["revenue_paid"] = {c: v for c, v in (got["revenue_paid"] or {}).items() if v}
        assert got == expected, row["org_id"]
        assert got == metrics_as_dict(metrics(reports, row["org_id"], start, end))
    acme = next(r for r in rows if r["org_id"] == "acme")
    assert acme["invoice_count"] > 10 and acme["failed_payment_count"] >= 7 and acme["request_count"] > 50

    # org_billing_summary: one row per org, as ListOrgSummaries shows it.
    rows = {r["org_id"]: r for r in view_rows(database_url, "org_billing_summary")}
    assert sorted(rows) == orgs and len(view_rows(database_url, "org_billing_summary")) == len(orgs)
    listed = reports.ListOrgSummaries(pb.ListOrgSummariesRequest(), timeout=30).organizations
    for entry in listed:
        row = rows[entry.org_id]
        assert (row["plan"], row["status"]) == (enum_name(t.Plan.Name(entry.plan)),
                                                enum_name(t.SubscriptionStatus.Name(entry.status)))
        assert (row["total_millicredits"], row["allocated_millicredits"], row["used_millicredits"]) == (
            entry.pool.total_millicredits, entry.pool.allocated_millicredits, entry.pool.used_millicredits)

    # top_credit_users_by_org: per org and user with usage in the last 30
    # days, GetUsageSummary's top users over them, ranked.
    rows = view_rows(database_url, "top_credit_users_by_org")
    keys = [(r["org_id"], r["user_id"]) for r in rows]
    assert len(keys) == len(set(keys))
    for org in orgs:
        users = top_users(in_range(usage, org, start, end), 100)
        reported = summary(reports, org, start, end, top=100).top_users
        assert [(u.user_id, u.used_millicredits, u.request_count) for u in reported] == [u[:3] for u in users]
        mine = sorted(((r["user_id"], r["used_millicredits"], r["request_count"], r["usage_rank"])
                       for r in rows if r["org_id"] == org), key=lambda e: (-e[1], e[0]))
        assert mine == [(u[0], u[1], u[2], 1 + sum(1 for v in users if v[1] > u[1])) for u in users], org

    # user_multi_org_credits: one row per live allocation, as GetUserBilling
    # shows the user's allocations and plans.
    rows = view_rows(database_url, "user_multi_org_credits")
    keys = [(r["user_id"], r["org_id"]) for r in rows]
    assert len(keys) == len(set(keys))
    expected_keys = set()
    for org in orgs:
        for allocation in client.billing.ListAllocations(billing_pb.ListAllocationsRequest(org_id=org)).allocations:
            if not allocation.revoked:
                expected_keys.add((allocation.user_id, org))
    assert set(keys) == expected_keys
    for user in sorted({u for u, _ in keys}):
        billing = reports.GetUserBilling(pb.GetUserBillingRequest(user_id=user), timeout=30)
        for entry in billing.organizations:
            row = next(r for r in rows if (r["user_id"], r["org_id"]) == (user, entry.allocation.org_id))
            assert (row["limit_millicredits"], row["used_millicredits"], row["remaining_millicredits"]) == (
                entry.allocation.limit_millicredits, entry.allocation.used_millicredits,
                entry.allocation.remaining_millicredits)
            assert row["plan"] == enum_name(t.Plan.Name(entry.plan))
            assert (row["price_cents"] or 0) == entry.price.amount_cents


# Summaries under concurrency, and verify.

def test_concurrent_deductions_keep_the_summaries_equal_to_the_ledger(client, reports, database_url):
    """Real threads charging several orgs, users and services through
    DeductCredits and DeductCreditsBatch: verify finds nothing, and each org's
    summary (totals, breakdown, users) equals the sums over its attribution
    rows."""
    orgs, users = ["c-0", "c-1", "c-2"], ["u0", "u1", "u2", "u3"]
    services = [("llm", "chat"), ("llm", "code"), ("search", "web")]
    for org in orgs:
        client.funded_org(org, 10_000_000, {u: 1_000_000 for u in users})
    start_line = threading.Barrier(8)

    def work(n):
        rng = random.Random(n)
        start_line.wait()
        for i in range(20):
            if i % 3 == 0:
                client.credits.DeductCreditsBatch(credit_pb.DeductCreditsBatchRequest(deductions=[
                    credit_pb.DeductCreditsRequest(
                        org_id=rng.choice(orgs), user_id=rng.choice(users),
                        amount_millicredits=rng.randrange(1, 500), service_type=s[0], service_name=s[1],
                        idempotency_key=new_key())
                    for s in (rng.choice(services) for _ in range(6))]), timeout=60)
            else:
                deduct(client, rng.choice(orgs), rng.choice(users), rng.randrange(1, 500), *rng.choice(services))

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for future in [pool.submit(work, n) for n in range(8)]:
            future.result()
    assert violations(database_url) == {}
    with psycopg.connect(database_url) as conn:
        rows = [Usage(*r) for r in conn.execute(
            """SELECT org_id, user_id, amount_millicredits, created_at, service_type, service_name
                 FROM credit_usage_attribution""")]
    assert len(rows) == 8 * (7 * 6 + 13)
    for org in orgs:
        # The default range: the 30 days up to the call, which every row precedes.
        response = summary(reports, org, top=100)
        start, end = moment(response.time_range.start_time), moment(response.time_range.end_time)
        assert len(in_range(rows, org, start, end)) == len([r for r in rows if r.org_id == org])
        got = summary_as_tuples(response)
        expected = expected_summary(rows, org, start, end, top=100)
        for part in ("totals", "by_service_type", "by_service_name", "top_users"):
            assert got[part] == expected[part], (org, part)
        assert got["daily"][-2:] == daily(in_range(rows, org, start, end), start, end)[-2:]
        # Whole UTC days around today: read from the summary tables alone.
        start, end = midnight(utc_now()) - DAY, midnight(utc_now()) + DAY
        got = summary_as_tuples(summary(reports, org, start, end, top=100))
        assert got == expected_summary(rows, org, start, end, top=100), org


def test_a_later_deduction_committed_first_stays_the_users_last_use(client, reports, database_url):
    """A deduction's time is its transaction's start, and transactions may
    commit in another order: a batch that starts first but waits for another
    org's pool lock commits after a later deduction of the same user and
    service. The summaries keep the later time as the last use (verify
    agrees), and so does the report over whole days (read from them)."""
    client.funded_org("a-org", 100_000, {"alice": 10_000})
    client.funded_org("b-org", 100_000, {"alice": 10_000})
    holder = psycopg.connect(database_url)
    holder.execute("SELECT 1 FROM organization_credit_pools WHERE org_id = 'a-org' FOR UPDATE")
    batch = concurrent.futures.ThreadPoolExecutor(1).submit(
        client.credits.DeductCreditsBatch, credit_pb.DeductCreditsBatchRequest(deductions=[
            credit_pb.DeductCreditsRequest(org_id=org, user_id="alice", amount_millicredits=amount,
                                           service_type="llm", service_name="chat", idempotency_key=new_key())
            for org, amount in (("a-org", 1), ("b-org", 2))]), timeout=30)
    try:
        with psycopg.connect(database_url, autocommit=True) as watcher:
            for _ in range(100):
                waiting = watcher.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND datname = current_database()").fetchone()[0]
                if waiting:
                    break
                threading.Event().wait(0.05)
            assert waiting, "the batch never waited for a-org's pool"
        deduct(client, "b-org", "alice", 4)  # starts later, commits first
    finally:
        holder.rollback()
        holder.close()
    batch.result()
    with psycopg.connect(database_url) as conn:
        times = dict(conn.execute(
            "SELECT amount_millicredits, created_at FROM credit_usage_attribution WHERE org_id = 'b-org'"))
    assert times[2] < times[4]  # the batch's row is the earlier one
    today = midnight(utc_now())
    users = summary(reports, "b-org", today - DAY, today + DAY).top_users
    assert [(u.user_id, u.used_millicredits, moment(u.last_use_time)) for u in users] == [("alice", 6, times[4])]
    assert violations(database_url) == {}


@pytest.mark.parametrize("table, tamper", [
    ("usage_daily", "UPDATE usage_daily SET used_millicredits = used_millicredits + 1"
                    " WHERE ctid = (SELECT min(ctid) FROM usage_daily)"),
    ("usage_daily", "DELETE FROM usage_daily WHERE ctid = (SELECT min(ctid) FROM usage_daily)"),
    ("user_usage_daily", "UPDATE user_usage_daily SET request_count = request_count + 1"
                         " WHERE ctid = (SELECT min(ctid) FROM user_usage_daily)"),
    ("user_usage_monthly", "UPDATE user_usage_monthly SET used_millicredits = used_millicredits - 1"
                           " WHERE ctid = (SELECT min(ctid) FROM user_usage_monthly)"),
    ("user_usage_monthly", "UPDATE user_usage_monthly SET last_used_at = last_used_at - interval '1 microsecond'"
                           " WHERE ctid = (SELECT min(ctid) FROM user_usage_monthly)"),
], ids=["usage_daily used", "usage_daily row deleted", "user_usage_daily requests",
        "user_usage_monthly used", "user_usage_monthly last use"])
def test_verify_finds_a_tampered_summary_row(client, database_url, table, tamper):
    """A summary row changed behind the ledger's back is reported by verify,
    under that table's invariant alone."""
    client.funded_org("acme", 100_000, {"alice": 10_000, "bob": 10_000})
    deduct(client, "acme", "alice", 5)
    deduct(client, "acme", "bob", 7, "search", "web")
    assert violations(database_url) == {}
    sql(database_url, tamper)
    found = violations(database_url)
    assert list(found) == [f"{table} equals the attribution rows it sums"], found
