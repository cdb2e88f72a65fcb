"""Refunds: all or part of one deduction given back to its allocation and
pool, never more in total than it charged, recorded as negative usage linked
to it and as a REFUND event. Through the real server and database; the
ledger's invariants (server/verify.py) hold after every test that mutates."""

import concurrent.futures
import threading
import uuid

import grpc
import psycopg
import pytest

from orgbilling.v1 import credit_service_pb2 as pb
from orgbilling.v1 import reporting_service_pb2 as report_pb
from orgbilling.v1 import reporting_service_pb2_grpc
from orgbilling.v1 import types_pb2 as t
from orgbilling.server.verify import violations
from tests.support import Client, api_key, field_violations, new_key, raises_rpc

CODE = grpc.StatusCode


def deduct(client, amount, user="alice", org="acme", key=None, service_name="chat"):
    return client.credits.DeductCredits(pb.DeductCreditsRequest(
        org_id=org, user_id=user, amount_millicredits=amount, service_type="llm",
        service_name=service_name, idempotency_key=key or new_key()))


def refund_request(deduction_id, amount, org="acme", key=None, reason="bad answer"):
    return pb.RefundCreditsRequest(
        org_id=org, deduction_id=deduction_id, amount_millicredits=amount, reason=reason,
        idempotency_key=key or new_key())


def refund(client, deduction_id, amount, **kwargs):
    return client.credits.RefundCredits(refund_request(deduction_id, amount, **kwargs))


def balances(database_url, org="acme", user="alice"):
    """(allocation used, pool used) as stored."""
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            """SELECT a.used_millicredits, p.used_millicredits
                 FROM user_credit_allocations a JOIN organization_credit_pools p USING (org_id)
                WHERE a.org_id = %s AND a.user_id = %s""", (org, user)).fetchone()


def sql(database_url, statement, params=()):
    with psycopg.connect(database_url) as conn:
        return conn.execute(statement, params).fetchall() if statement.lstrip().startswith("SELECT") \
            else conn.execute(statement, params)


# Happy paths.

def test_a_full_refund_gives_everything_back_and_is_recorded_linked_to_its_deduction(client, database_url):
    client.funded_org("acme", 10_000, {"alice": 1_000})
    charged = deduct(client, 300)
    assert balances(database_url) == (300, 300)
    given = refund(client, charged.deduction_id, 300, reason="model timed out")
    assert uuid.UUID(given.refund_id).version == 7 and not given.replayed
    assert (given.allocation_remaining_millicredits, given.pool_spendable_millicredits) == (1_000, 10_000)
    assert balances(database_url) == (0, 0)
    rows = sql(database_url, "SELECT deduction_id::text, amount_millicredits, refund_of::text, refund_reason,"
                             " service_type, service_name FROM credit_usage_attribution"
                             " WHERE refund_of IS NOT NULL")
    assert rows == [(given.refund_id, -300, charged.deduction_id, "model timed out", "llm", "chat")]
    events = sql(database_url, "SELECT user_id, details FROM org_billing_history WHERE event_type = 'REFUND'")
    assert events == [("alice", {"refund_id": given.refund_id, "deduction_id": charged.deduction_id,
                                 "amount_millicredits": 300, "reason": "model timed out",
                                 "allocation_refund_millicredits": 300})]
    assert violations(database_url) == {}


def test_partial_refunds_add_up_to_exactly_the_charge_and_one_more_is_refused(client, database_url):
    client.funded_org("acme", 10_000, {"alice": 1_000})
    charged = deduct(client, 500)
    for amount in (100, 250, 149):
        refund(client, charged.deduction_id, amount)
    assert balances(database_url) == (1, 1)
    assert violations(database_url) == {}
    with raises_rpc(CODE.FAILED_PRECONDITION, "REFUND_EXCEEDS_DEDUCTION") as refused:
        refund(client, charged.deduction_id, 2)
    assert refused["info"].metadata["refundable_millicredits"] == "1"
    assert refused["info"].metadata["requested_millicredits"] == "2"
    last = refund(client, charged.deduction_id, 1)
    assert last.allocation_remaining_millicredits == 1_000
    with raises_rpc(CODE.FAILED_PRECONDITION, "REFUND_EXCEEDS_DEDUCTION") as refused:
        refund(client, charged.deduction_id, 1)
    assert refused["info"].metadata["refundable_millicredits"] == "0"
    assert balances(database_url) == (0, 0)
    assert violations(database_url) == {}


def test_a_committed_reservation_can_be_refunded_like_a_deduction(client, database_url):
    client.funded_org("acme", 10_000, {"alice": 1_000})
    held = client.credits.ReserveCredits(pb.ReserveCreditsRequest(
        org_id="acme", user_id="alice", amount_millicredits=400, service_type="llm",
        service_name="chat", idempotency_key=new_key()))
    charged = client.credits.CommitReservation(pb.CommitReservationRequest(
        org_id="acme", reservation_id=held.reservation_id, amount_millicredits=250,
        idempotency_key=new_key()))
    refund(client, charged.deduction_id, 250)
    assert balances(database_url) == (0, 0)
    assert violations(database_url) == {}


# Idempotency.

def test_a_retry_returns_the_original_refund_and_changes_nothing(client, database_url):
    client.funded_org("acme", 10_000, {"alice": 1_000})
    charged = deduct(client, 300)
    request = refund_request(charged.deduction_id, 100)
    first = client.credits.RefundCredits(request)
    deduct(client, 50)  # the balances move on; the replay still answers as the first did
    again = client.credits.RefundCredits(request)
    assert again.replayed and again.refund_id == first.refund_id
    assert (again.allocation_remaining_millicredits, again.pool_spendable_millicredits) == (
        first.allocation_remaining_millicredits, first.pool_spendable_millicredits)
    assert balances(database_url) == (250, 250)
    # A refusal is an answer too: stored, and replayed under its key.
    too_much = refund_request(charged.deduction_id, 201)
    for _ in range(2):
        with raises_rpc(CODE.FAILED_PRECONDITION, "REFUND_EXCEEDS_DEDUCTION"):
            client.credits.RefundCredits(too_much)
    assert violations(database_url) == {}


def test_a_key_used_for_another_request_is_refused_in_the_deductions_key_space(client, database_url):
    client.funded_org("acme", 10_000, {"alice": 1_000})
    deduct_key = new_key()
    charged = deduct(client, 300, key=deduct_key)
    key = new_key()
    refund(client, charged.deduction_id, 100, key=key)
    # The same key with another amount, another reason or another deduction.
    other = deduct(client, 10)
    for changed in (refund_request(charged.deduction_id, 101, key=key),
                    refund_request(charged.deduction_id, 100, key=key, reason="other"),
                    refund_request(other.deduction_id, 10, key=key)):
        with raises_rpc(CODE.FAILED_PRECONDITION, "IDEMPOTENCY_KEY_REUSED"):
            client.credits.RefundCredits(changed)
    # One key space with deductions and holds, both ways.
    with raises_rpc(CODE.FAILED_PRECONDITION, "IDEMPOTENCY_KEY_REUSED"):
        refund(client, charged.deduction_id, 5, key=deduct_key)
    with raises_rpc(CODE.FAILED_PRECONDITION, "IDEMPOTENCY_KEY_REUSED"):
        deduct(client, 5, key=key)
    with raises_rpc(CODE.FAILED_PRECONDITION, "IDEMPOTENCY_KEY_REUSED"):
        client.credits.ReserveCredits(pb.ReserveCreditsRequest(
            org_id="acme", user_id="alice", amount_millicredits=5, service_type="llm",
            service_name="chat", idempotency_key=key))
    assert balances(database_url) == (210, 210)
    assert violations(database_url) == {}


# Refusals.

def test_an_unknown_deduction_another_orgs_or_a_refund_is_not_found(client, database_url):
    client.funded_org("acme", 10_000, {"alice": 1_000})
    client.funded_org("globex", 10_000, {"bob": 1_000})
    theirs = deduct(client, 300, user="bob", org="globex")
    ours = deduct(client, 300)
    given = refund(client, ours.deduction_id, 100)
    for deduction_id in (str(uuid.uuid4()), theirs.deduction_id, given.refund_id):
        with raises_rpc(CODE.NOT_FOUND, "DEDUCTION_NOT_FOUND"):
            refund(client, deduction_id, 1)
    with raises_rpc(CODE.NOT_FOUND, "ORG_NOT_FOUND"):
        refund(client, ours.deduction_id, 1, org="initech")
    assert balances(database_url, org="globex", user="bob") == (300, 300)
    assert balances(database_url) == (200, 200)
    assert violations(database_url) == {}


@pytest.mark.parametrize("field, value", [
    ("org_id", ""), ("org_id", "a b"), ("org_id", "x" * 129),
    ("deduction_id", ""), ("deduction_id", "not-a-uuid"),
    ("amount_millicredits", 0), ("amount_millicredits", -5), ("amount_millicredits", 10**15 + 1),
    ("reason", ""), ("reason", "x" * 257), ("reason", "a\x00b"),
    ("idempotency_key", ""), ("idempotency_key", "has space"), ("idempotency_key", "k" * 129),
])
def test_each_bad_field_is_invalid_argument_naming_it(client, database_url, field, value):
    client.funded_org("acme", 10_000, {"alice": 1_000})
    charged = deduct(client, 300)
    request = refund_request(charged.deduction_id, 100)
    setattr(request, field, value)
    with raises_rpc(CODE.INVALID_ARGUMENT) as refused:
        client.credits.RefundCredits(request)
    assert field_violations(refused["error"]) == {field}
    assert balances(database_url) == (300, 300)


def test_a_deducting_caller_may_not_refund(server, client, database_url):
    """credits.deduct meters; giving back needs credits.manage."""
    client.funded_org("acme", 10_000, {"alice": 1_000})
    charged = deduct(client, 300)
    meter = Client(f"127.0.0.1:{server.port}", token=api_key(database_url, ["credits.deduct"]))
    try:
        with raises_rpc(CODE.PERMISSION_DENIED, "MISSING_SCOPE"):
            refund(meter, charged.deduction_id, 100)
    finally:
        meter.close()
    assert balances(database_url) == (300, 300)


# Periods.

def test_a_refund_after_the_period_reset_gives_back_to_the_pool_and_to_this_period_as_far_as_used(
        client, database_url):
    client.subscribe("acme")
    client.grant("acme", 10_000)
    client.allocate("acme", "alice", 1_000, reset_period=t.RESET_PERIOD_DAILY)
    old = deduct(client, 600)
    sql(database_url, "UPDATE user_credit_allocations SET next_reset_at = now() - interval '1 second'")
    # The new period has used 100: a refund of 250 of the old charge gives the
    # pool 250 and this period only its 100 (used never goes below 0).
    deduct(client, 100)
    assert balances(database_url) == (100, 700)
    given = refund(client, old.deduction_id, 250)
    assert balances(database_url) == (0, 450)
    assert given.allocation_remaining_millicredits == 1_000
    assert given.pool_spendable_millicredits == 9_550
    assert violations(database_url) == {}
    # The rest of the old charge is still refundable, to the pool alone now.
    refund(client, old.deduction_id, 350)
    assert balances(database_url) == (0, 100)
    assert violations(database_url) == {}
    # A refund made before a reset belongs to its own period: the next one starts at 0.
    current = deduct(client, 300)
    refund(client, current.deduction_id, 120)
    assert balances(database_url) == (180, 280)
    sql(database_url, "UPDATE user_credit_allocations SET next_reset_at = now() - interval '1 second'")
    refund(client, current.deduction_id, 10)
    assert balances(database_url) == (0, 270)
    assert violations(database_url) == {}


# Reports.

def test_reports_show_a_refund_as_negative_usage_and_no_request(client, database_url):
    client.funded_org("acme", 10_000, {"alice": 1_000, "bob": 1_000})
    charged = deduct(client, 500)
    deduct(client, 200, user="bob", service_name="search")
    refund(client, charged.deduction_id, 150)
    reports = reporting_service_pb2_grpc.ReportingServiceStub(client.channel)
    # A whole-days range (the summary tables) and a partial-day one (raw rows).
    for time_range in (report_pb.TimeRange(), None):
        request = report_pb.GetUsageSummaryRequest(org_id="acme", top_users=10)
        if time_range is None:
            with psycopg.connect(database_url) as conn:
                start = conn.execute("SELECT min(created_at) - interval '1 microsecond'"
                                     " FROM credit_usage_attribution").fetchone()[0]
            request.time_range.start_time.FromDatetime(start)
        got = reports.GetUsageSummary(request, timeout=30)
        totals = got.totals
        assert (totals.used_millicredits, totals.request_count, totals.active_users) == (550, 2, 2)
        by_user = {u.user_id: (u.used_millicredits, u.request_count) for u in got.top_users}
        assert by_user == {"alice": (350, 1), "bob": (200, 1)}
        by_service = {(s.service_type, s.service_name): s.used_millicredits for s in got.by_service_name}
        assert by_service == {("llm", "chat"): 350, ("llm", "search"): 200}
    rows = sql(database_url, "SELECT used_millicredits, request_count FROM usage_daily"
                             " WHERE service_name = 'chat'")
    assert rows == [(350, 1)]
    running = sql(database_url, "SELECT used_millicredits_total, request_count_total FROM org_usage_running")
    assert running == [(550, 2)]
    history = reports.ListBillingHistory(report_pb.ListBillingHistoryRequest(
        org_id="acme", event_type=report_pb.BILLING_EVENT_TYPE_REFUND), timeout=30)
    assert [e.details["deduction_id"] for e in history.events] == [charged.deduction_id]
    assert violations(database_url) == {}


# Concurrency.

def test_concurrent_refunds_of_one_deduction_never_exceed_its_charge(client, database_url, server):
    client.funded_org("acme", 100_000, {"alice": 10_000})
    charged = deduct(client, 1_000)
    deduct(client, 500)  # another charge, untouched
    outcomes: dict[str, int] = {}
    lock = threading.Lock()
    clients = [Client(f"127.0.0.1:{server.port}", token=client.token) for _ in range(2)]

    def work(n):
        mine = clients[n % 2]
        try:
            refund(mine, charged.deduction_id, 70)
            name = "OK"
        except grpc.RpcError as error:
            assert error.code() == CODE.FAILED_PRECONDITION, error
            name = "REFUSED"
        with lock:
            outcomes[name] = outcomes.get(name, 0) + 1

    try:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            for future in [pool.submit(work, n) for n in range(32)]:
                future.result(timeout=120)
    finally:
        for c in clients:
            c.close()
    # 14 refunds of 70 fit in 1,000 (980); the other 18 are refused.
    assert outcomes == {"OK": 14, "REFUSED": 18}
    refunded = sql(database_url, "SELECT -sum(amount_millicredits) FROM credit_usage_attribution"
                                 " WHERE refund_of = %s", (charged.deduction_id,))[0][0]
    assert refunded == 980
    assert balances(database_url) == (520, 520)
    assert violations(database_url) == {}


def test_verify_finds_a_refund_beyond_its_charge_or_without_its_event(client, database_url):
    """The refund checks can fail: a refund edited behind the ledger's back is reported."""
    client.funded_org("acme", 10_000, {"alice": 1_000})
    charged = deduct(client, 300)
    refund(client, charged.deduction_id, 100)
    sql(database_url, "UPDATE credit_usage_attribution SET amount_millicredits = -400,"
                      " allocation_refund_millicredits = 100 WHERE refund_of IS NOT NULL")
    found = violations(database_url)
    assert {"no deduction is refunded more than it charged, and each refund is its deduction's",
            "each refund has exactly its one REFUND event in billing history"} <= set(found)
