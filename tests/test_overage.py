"""Overage: a pool spent past its total, down to minus its overage limit and
no further, set by SetOverage and recorded as OVERAGE_CHANGED. Through the
real server and database; the ledger's invariants (server/verify.py) hold
after every test that mutates.

A pool goes past its total only when its lifetime used outgrows it while
each user stays within a limit carved from the total: here alice spends the
whole pool, her limit is cut to 0, and bob is given the limit she had."""

import concurrent.futures

import grpc
import psycopg

from orgbilling.v1 import credit_service_pb2 as credit_pb
from orgbilling.v1 import org_billing_service_pb2 as pb
from orgbilling.v1 import reporting_service_pb2 as report_pb
from orgbilling.v1 import reporting_service_pb2_grpc
from orgbilling.v1 import types_pb2 as t
from orgbilling.server.verify import violations
from tests.support import Client, field_violations, new_key, raises_rpc, with_fields

CODE = grpc.StatusCode


def deduct(client, amount, user="bob", org="acme", key=None):
    return client.credits.DeductCredits(credit_pb.DeductCreditsRequest(
        org_id=org, user_id=user, amount_millicredits=amount, service_type="llm",
        service_name="chat", idempotency_key=key or new_key()))


def overage_request(limit, rate=0, org="acme", key=None):
    return pb.SetOverageRequest(org_id=org, overage_limit_millicredits=limit,
                                overage_rate_millicents_per_credit=rate,
                                idempotency_key=key or new_key())


def set_overage(client, limit, rate=0, **kwargs):
    return client.billing.SetOverage(overage_request(limit, rate, **kwargs))


def pool(client, org="acme"):
    return client.billing.GetCreditPool(pb.GetCreditPoolRequest(org_id=org)).pool


def spent_pool(client, total=1_000, bob_limit=1_000):
    """acme's pool of `total`, all spent by alice; bob may spend bob_limit
    more by his allocation, so only overage can let him."""
    client.funded_org("acme", total, {"alice": total})
    deduct(client, total, user="alice")
    client.allocate("acme", "alice", 0)
    client.allocate("acme", "bob", bob_limit)


def overage_events(database_url, org="acme"):
    with psycopg.connect(database_url) as conn:
        return [row[0] for row in conn.execute(
            "SELECT details FROM org_billing_history WHERE org_id = %s"
            " AND event_type = 'OVERAGE_CHANGED' ORDER BY created_at, event_id", (org,))]


def test_by_default_a_pool_allows_no_overage(client, database_url):
    spent_pool(client)
    got = pool(client)
    assert (got.overage_limit_millicredits, got.overage_rate_millicents_per_credit,
            got.overage_used_millicredits, got.spendable_millicredits) == (0, 0, 0, 0)
    with raises_rpc(CODE.FAILED_PRECONDITION, "INSUFFICIENT_CREDITS") as refused:
        deduct(client, 1)
    assert refused["info"].metadata["available_millicredits"] == "0"
    assert violations(database_url) == {}


def test_setting_changing_and_removing_overage_is_recorded(client, database_url):
    client.funded_org("acme", 1_000, {})
    first = set_overage(client, 500, 150)
    assert not first.replayed and first.event_id
    assert (first.pool.overage_limit_millicredits, first.pool.overage_rate_millicents_per_credit,
            first.pool.spendable_millicredits, first.pool.overage_used_millicredits) == (500, 150, 1_500, 0)
    assert pool(client) == first.pool
    changed = set_overage(client, 800, 100).pool
    assert (changed.overage_limit_millicredits, changed.overage_rate_millicents_per_credit) == (800, 100)
    removed = set_overage(client, 0, 0).pool
    assert (removed.overage_limit_millicredits, removed.spendable_millicredits) == (0, 1_000)
    assert overage_events(database_url) == [
        {"old_limit": 0, "new_limit": 500, "old_rate": 0, "new_rate": 150, "in_use": 0},
        {"old_limit": 500, "new_limit": 800, "old_rate": 150, "new_rate": 100, "in_use": 0},
        {"old_limit": 800, "new_limit": 0, "old_rate": 100, "new_rate": 0, "in_use": 0},
    ]
    assert violations(database_url) == {}


def test_replays_and_reused_keys(client, database_url):
    client.funded_org("acme", 1_000, {})
    first = set_overage(client, 500, 150, key="k1")
    again = set_overage(client, 500, 150, key="k1")
    assert again.replayed and (again.event_id, again.pool) == (first.event_id, first.pool)
    with raises_rpc(CODE.FAILED_PRECONDITION, "IDEMPOTENCY_KEY_REUSED"):
        set_overage(client, 600, 150, key="k1")
    # One family with AddCredits: a key names one change of credit.
    with raises_rpc(CODE.FAILED_PRECONDITION, "IDEMPOTENCY_KEY_REUSED"):
        client.billing.AddCredits(pb.AddCreditsRequest(
            org_id="acme", source=t.CREDIT_SOURCE_GRANT, amount_millicredits=1, idempotency_key="k1"))
    assert len(overage_events(database_url)) == 1
    assert violations(database_url) == {}


def test_bad_input_for_each_field(client):
    client.funded_org("acme", 1_000, {})
    good = overage_request(500, 150)
    for field, value in [("org_id", "a b"), ("org_id", ""),
                         ("overage_limit_millicredits", -1),
                         ("overage_limit_millicredits", 10**15 + 1),
                         ("overage_rate_millicents_per_credit", -1),
                         ("overage_rate_millicents_per_credit", 10**9 + 1),
                         ("idempotency_key", "")]:
        request = with_fields(pb.SetOverageRequest.FromString(good.SerializeToString()), {field: value})
        with raises_rpc(CODE.INVALID_ARGUMENT, "INVALID_ARGUMENT") as refused:
            client.billing.SetOverage(request)
        assert field_violations(refused["error"]) == {field}
    # The bounds themselves are accepted.
    assert set_overage(client, 10**15, 10**9).pool.overage_limit_millicredits == 10**15
    with raises_rpc(CODE.NOT_FOUND, "ORG_NOT_FOUND"):
        set_overage(client, 1, org="nobody")


def test_deductions_go_below_zero_down_to_exactly_the_limit(client, database_url):
    spent_pool(client)
    set_overage(client, 300, 100)
    deduct(client, 299)
    got = pool(client)
    assert (got.used_millicredits, got.overage_used_millicredits, got.spendable_millicredits) == (1_299, 299, 1)
    with raises_rpc(CODE.FAILED_PRECONDITION, "INSUFFICIENT_CREDITS") as refused:
        deduct(client, 2)
    assert refused["info"].metadata["available_millicredits"] == "1"
    assert refused["info"].metadata["pool_spendable_millicredits"] == "1"
    deduct(client, 1)
    assert (pool(client).overage_used_millicredits, pool(client).spendable_millicredits) == (300, 0)
    with raises_rpc(CODE.FAILED_PRECONDITION, "INSUFFICIENT_CREDITS") as refused:
        deduct(client, 1)
    assert refused["info"].metadata["available_millicredits"] == "0"
    assert violations(database_url) == {}


def test_allocations_still_cap_each_user(client, database_url):
    spent_pool(client, bob_limit=1_000)
    set_overage(client, 10**15)
    with raises_rpc(CODE.FAILED_PRECONDITION, "INSUFFICIENT_CREDITS") as refused:
        deduct(client, 1_001)
    assert refused["info"].metadata["available_millicredits"] == "1000"
    deduct(client, 1_000)
    with raises_rpc(CODE.FAILED_PRECONDITION, "INSUFFICIENT_CREDITS"):
        deduct(client, 1)
    with raises_rpc(CODE.FAILED_PRECONDITION, "INSUFFICIENT_CREDITS"):
        deduct(client, 1, user="alice")
    assert pool(client).overage_used_millicredits == 1_000
    assert violations(database_url) == {}


def test_lowering_the_limit_below_what_is_in_use_is_refused(client, database_url):
    spent_pool(client)
    set_overage(client, 500)
    deduct(client, 300)
    with raises_rpc(CODE.FAILED_PRECONDITION, "OVERAGE_IN_USE") as refused:
        set_overage(client, 299)
    assert refused["info"].metadata["in_use_millicredits"] == "300"
    assert refused["info"].metadata["requested_millicredits"] == "299"
    assert pool(client).overage_limit_millicredits == 500
    assert set_overage(client, 300).pool.spendable_millicredits == 0
    # Credits added pay the overage back; then it can be removed.
    client.grant("acme", 300)
    assert pool(client).overage_used_millicredits == 0
    assert set_overage(client, 0).pool.overage_limit_millicredits == 0
    assert violations(database_url) == {}


def test_reservations_count_against_overage_like_deductions(client, database_url):
    spent_pool(client)
    set_overage(client, 500)
    held = client.credits.ReserveCredits(credit_pb.ReserveCreditsRequest(
        org_id="acme", user_id="bob", amount_millicredits=400, service_type="llm",
        service_name="chat", idempotency_key=new_key()))
    got = pool(client)
    assert (got.reserved_millicredits, got.overage_used_millicredits, got.spendable_millicredits) == (400, 400, 100)
    with raises_rpc(CODE.FAILED_PRECONDITION, "INSUFFICIENT_CREDITS"):
        deduct(client, 101)
    with raises_rpc(CODE.FAILED_PRECONDITION, "OVERAGE_IN_USE") as refused:
        set_overage(client, 399)
    assert refused["info"].metadata["in_use_millicredits"] == "400"
    client.credits.ReleaseReservation(credit_pb.ReleaseReservationRequest(org_id="acme",
        reservation_id=held.reservation_id, idempotency_key=new_key()))
    assert set_overage(client, 0).pool.overage_used_millicredits == 0
    assert violations(database_url) == {}


def test_reports_and_history_show_overage(client, server, database_url):
    spent_pool(client)
    changed = set_overage(client, 500, 120)
    deduct(client, 200)
    reports = reporting_service_pb2_grpc.ReportingServiceStub(client.channel)
    billing = reports.GetOrgBilling(report_pb.GetOrgBillingRequest(org_id="acme"), timeout=30)
    assert (billing.pool.overage_limit_millicredits, billing.pool.overage_rate_millicents_per_credit,
            billing.pool.overage_used_millicredits) == (500, 120, 200)
    assert billing.pool == pool(client)
    history = reports.ListBillingHistory(report_pb.ListBillingHistoryRequest(
        org_id="acme", event_type=report_pb.BILLING_EVENT_TYPE_OVERAGE_CHANGED), timeout=30)
    assert [e.event_id for e in history.events] == [changed.event_id]
    assert history.events[0].details["new_limit"] == 500
    summaries = reports.ListOrgSummaries(report_pb.ListOrgSummariesRequest(), timeout=30).organizations
    assert [(o.pool.overage_rate_millicents_per_credit, o.pool.overage_used_millicredits)
            for o in summaries if o.org_id == "acme"] == [(120, 200)]
    assert violations(database_url) == {}


def test_concurrent_deductions_never_pass_the_overage_limit(client, server, database_url):
    """Real threads through the real server, on two channels: the pool stops
    at exactly minus the limit, to the last deduction that fits."""
    spent_pool(client, bob_limit=1_000)
    set_overage(client, 500)
    clients = [Client(f"127.0.0.1:{server.port}", token=client.token) for _ in range(2)]

    def attempt(i):
        try:
            deduct(clients[i % 2], 7)
            return 7
        except grpc.RpcError as error:
            assert error.code() == CODE.FAILED_PRECONDITION, error
            return 0

    try:
        with concurrent.futures.ThreadPoolExecutor(16) as pool_:
            charged = sum(pool_.map(attempt, range(160)))
    finally:
        for c in clients:
            c.close()
    assert charged == 497  # 71 deductions of 7; a 72nd would pass 500
    got = pool(client)
    assert (got.used_millicredits - got.total_millicredits, got.overage_used_millicredits) == (497, 497)
    assert violations(database_url) == {}
