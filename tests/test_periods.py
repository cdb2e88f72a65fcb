"""Time: subscription periods that advance themselves, the refresh granted at
each period start (with rollover or lapse), the overage of each period, and
the exact instants of hold expiries and allocation resets, all on the
ledger's clock, which these tests freeze at chosen microseconds
(migrations/0006_ledger_clock.sql). Through the real server and database;
the ledger's invariants (server/verify.py) hold after every test.

Plans (server/catalog.py): PLATFORM refreshes 20,000 credits a month
(240,000 a year), BYOK none."""

import concurrent.futures
import datetime
import threading
import time

import grpc
import psycopg
import pytest

from orgbilling.v1 import credit_service_pb2 as credit_pb
from orgbilling.v1 import org_billing_service_pb2 as pb
from orgbilling.v1 import types_pb2 as t
from orgbilling.server.store import PERIOD_SWEEP_LOCK_KEY
from orgbilling.server.sweeper import PeriodSweeper
from orgbilling.server.verify import violations
from tests.support import Client, field_violations, new_key, raises_rpc, set_ledger_clock

CODE = grpc.StatusCode
UTC = datetime.timezone.utc
MICROSECOND = datetime.timedelta(microseconds=1)
MONTHLY_REFRESH = 20_000_000  # the PLATFORM plan's, in millicredits


def at(*parts) -> datetime.datetime:
    return datetime.datetime(*parts, tzinfo=UTC)


@pytest.fixture(autouse=True)
def ledger_stays_consistent(database_url):
    yield
    assert violations(database_url) == {}


def subscribe(client, plan=t.PLAN_PLATFORM, cycle=t.BILLING_CYCLE_MONTHLY, org="acme"):
    return client.billing.CreateSubscription(pb.CreateSubscriptionRequest(
        org_id=org, plan=plan, billing_cycle=cycle, idempotency_key=new_key())).subscription


def subscription(client, org="acme"):
    return client.billing.GetSubscription(pb.GetSubscriptionRequest(org_id=org)).subscription


def period(sub) -> tuple[datetime.datetime, datetime.datetime]:
    return (sub.current_period_start.ToDatetime(tzinfo=UTC),
            sub.current_period_end.ToDatetime(tzinfo=UTC))


def pool(client, org="acme"):
    return client.billing.GetCreditPool(pb.GetCreditPoolRequest(org_id=org)).pool


def deduct(client, amount, user="alice", org="acme"):
    return client.credits.DeductCredits(credit_pb.DeductCreditsRequest(
        org_id=org, user_id=user, amount_millicredits=amount, service_type="llm",
        service_name="chat", idempotency_key=new_key()))


def check(client, amount=1, user="alice", org="acme"):
    return client.credits.CheckCredits(credit_pb.CheckCreditsRequest(
        org_id=org, user_id=user, amount_millicredits=amount))


def set_refresh(client, rollover_cap=0, refresh=None, org="acme", key=None):
    request = pb.SetCreditRefreshRequest(org_id=org, rollover_cap_millicredits=rollover_cap,
                                         idempotency_key=key or new_key())
    if refresh is not None:
        request.refresh_millicredits = refresh
    return client.billing.SetCreditRefresh(request)


def credit_events(database_url, org="acme") -> list[tuple]:
    """(source, delta, period start) of every CREDITS_ADDED, oldest first."""
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            "SELECT credit_source, credits_delta_millicredits,"
            "       to_timestamp((details ->> 'period_start_us')::numeric / 1000000)"
            "  FROM org_billing_history WHERE org_id = %s AND event_type = 'CREDITS_ADDED'"
            " ORDER BY created_at, event_id", (org,)).fetchall()


def renewals(database_url, org="acme") -> list[dict]:
    with psycopg.connect(database_url) as conn:
        return [row[0] for row in conn.execute(
            "SELECT details FROM org_billing_history WHERE org_id = %s"
            " AND event_type = 'SUBSCRIPTION_RENEWED' ORDER BY created_at, event_id", (org,))]


# The period's end, on both sides of it.

@pytest.mark.parametrize("start, cycle, ends", [
    # From the 31st: the end of February, then the 31st again, never the 28th ever after.
    (at(2027, 1, 31, 10), t.BILLING_CYCLE_MONTHLY,
     [at(2027, 2, 28, 10), at(2027, 3, 31, 10), at(2027, 4, 30, 10), at(2027, 5, 31, 10)]),
    # Through a leap February.
    (at(2027, 12, 31, 23, 59, 59, 999_999), t.BILLING_CYCLE_MONTHLY,
     [at(2028, 1, 31, 23, 59, 59, 999_999), at(2028, 2, 29, 23, 59, 59, 999_999),
      at(2028, 3, 31, 23, 59, 59, 999_999)]),
    # From a leap day, yearly: the 28th until the next leap year.
    (at(2028, 2, 29, 12), t.BILLING_CYCLE_YEARLY,
     [at(2029, 2, 28, 12), at(2030, 2, 28, 12), at(2031, 2, 28, 12), at(2032, 2, 29, 12)]),
])
def test_the_period_advances_at_its_exact_end_by_calendar_months_or_years(
        client, database_url, start, cycle, ends):
    set_ledger_clock(database_url, start)
    subscribe(client, cycle=cycle)
    previous_end = start
    for end in ends:
        set_ledger_clock(database_url, end - MICROSECOND)
        assert period(subscription(client)) == (previous_end, end)
        set_ledger_clock(database_url, end)
        next_start, _ = period(subscription(client))
        assert next_start == end
        previous_end = end
    assert len(renewals(database_url)) == len(ends)


def test_an_org_idle_for_months_gets_each_missed_period_once_in_order(client, database_url):
    set_ledger_clock(database_url, at(2027, 1, 15))
    subscribe(client)
    set_ledger_clock(database_url, at(2027, 5, 20))
    sub = subscription(client)
    assert period(sub) == (at(2027, 5, 15), at(2027, 6, 15))
    assert [r["period_start_us"] for r in renewals(database_url)] == [
        int(at(2027, month, 15).timestamp() * 1_000_000) for month in (2, 3, 4, 5)]
    # Refreshed each period; unspent refreshed credits lapse (no rollover by default).
    events = credit_events(database_url)
    assert [(source, delta) for source, delta, _ in events] == \
        [("REFRESH", MONTHLY_REFRESH)] + [("LAPSE", -MONTHLY_REFRESH), ("REFRESH", MONTHLY_REFRESH)] * 4
    assert pool(client).total_millicredits == MONTHLY_REFRESH


def test_a_canceled_subscription_stops_advancing_and_refreshing(client, database_url):
    set_ledger_clock(database_url, at(2027, 1, 15))
    subscribe(client)
    client.billing.CancelSubscription(pb.CancelSubscriptionRequest(org_id="acme", idempotency_key=new_key()))
    set_ledger_clock(database_url, at(2027, 6, 1))
    shown = pool(client)
    assert not shown.HasField("next_refresh_time")
    assert shown.total_millicredits == MONTHLY_REFRESH  # the refreshed credits stay
    assert renewals(database_url) == []


def test_a_new_cycle_counts_from_the_end_of_the_period_it_was_chosen_in(client, database_url):
    set_ledger_clock(database_url, at(2027, 1, 31))
    subscribe(client)
    client.billing.ChangePlan(pb.ChangePlanRequest(
        org_id="acme", plan=t.PLAN_PLATFORM, billing_cycle=t.BILLING_CYCLE_YEARLY,
        idempotency_key=new_key()))
    assert period(subscription(client)) == (at(2027, 1, 31), at(2027, 2, 28))
    set_ledger_clock(database_url, at(2027, 2, 28))
    assert period(subscription(client)) == (at(2027, 2, 28), at(2028, 2, 28))
    # The new plan's refresh from the new period: a year's.
    assert credit_events(database_url)[-1][:2] == ("REFRESH", 12 * MONTHLY_REFRESH)


# The refresh: exactly once per period, whoever comes first.

def test_each_period_is_refreshed_exactly_once_by_many_callers_on_two_replicas(
        client, database_url, start_server, token):
    set_ledger_clock(database_url, at(2027, 3, 10))
    subscribe(client)
    client.allocate("acme", "alice", MONTHLY_REFRESH)
    deduct(client, 5_000_000)
    replica = start_server(database_url)
    other = Client(f"127.0.0.1:{replica.port}", token=token)
    set_ledger_clock(database_url, at(2027, 6, 10))
    barrier = threading.Barrier(16)

    def first_access(n):
        caller = other if n % 2 else client
        barrier.wait()
        if n % 4 == 0:
            return check(caller).pool_spendable_millicredits
        if n % 4 == 1:
            return pool(caller).spendable_millicredits
        if n % 4 == 2:
            return deduct(caller, 1_000).pool_spendable_millicredits + 1_000
        return subscription(caller).current_period_start.ToDatetime(tzinfo=UTC)

    try:
        with concurrent.futures.ThreadPoolExecutor(16) as threads:
            seen = [f.result(timeout=60) for f in [threads.submit(first_access, n) for n in range(16)]]
    finally:
        other.close()
    assert len(renewals(database_url)) == 3
    assert [source for source, _, _ in credit_events(database_url)].count("REFRESH") == 4
    assert at(2027, 6, 10) in seen
    # No caller saw the pool before its refresh: 20,000 credits, less what the deductions took.
    assert all(value >= MONTHLY_REFRESH - 4 * 1_000 for value in seen if isinstance(value, int))
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT period_ends_at FROM organization_credit_pools").fetchone()[0] \
            == at(2027, 7, 10)


def test_the_sweeper_advances_idle_orgs_one_replica_at_a_time(client, database_url, server):
    set_ledger_clock(database_url, at(2027, 3, 10))
    subscribe(client, org="acme")
    subscribe(client, org="globex")
    subscribe(client, org="initech", plan=t.PLAN_BYOK)
    set_ledger_clock(database_url, at(2027, 4, 10) - MICROSECOND)
    sweeper = PeriodSweeper(server.store, interval_ms=60_000, batch_size_max=2)
    assert sweeper.sweep_once() == 0
    set_ledger_clock(database_url, at(2027, 4, 10))
    with psycopg.connect(database_url) as conn:
        conn.execute("BEGIN")
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (PERIOD_SWEEP_LOCK_KEY,))
        assert sweeper.sweep_once() == 0
        conn.execute("ROLLBACK")
    assert sweeper.sweep_once() == 2
    assert sweeper.sweep_once() == 1
    assert sweeper.sweep_once() == 0
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM org_billing_history"
                            " WHERE event_type = 'SUBSCRIPTION_RENEWED'").fetchone()[0] == 3
        assert conn.execute("SELECT count(DISTINCT period_ends_at) FROM organization_credit_pools"
                            ).fetchone()[0] == 1


def test_the_running_sweeper_advances_an_org_nobody_touches(start_server, database_url, token):
    running = start_server(database_url, period_sweeper_interval_ms=50)
    client = Client(f"127.0.0.1:{running.port}", token=token)
    try:
        set_ledger_clock(database_url, at(2027, 3, 10))
        subscribe(client)
        set_ledger_clock(database_url, at(2027, 4, 10))
        deadline = time.monotonic() + 10
        while not renewals(database_url):
            assert time.monotonic() < deadline, "the sweeper did not run"
            time.sleep(0.05)
    finally:
        client.close()


def test_a_second_record_of_a_period_is_refused_by_the_database(client, database_url):
    set_ledger_clock(database_url, at(2027, 3, 10))
    subscribe(client)
    with psycopg.connect(database_url) as conn:
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("""INSERT INTO org_billing_history (org_id, event_type, credits_delta_millicredits,
                                                             credit_source, subscription_id, details)
                            SELECT org_id, event_type, credits_delta_millicredits, credit_source,
                                   subscription_id, details
                              FROM org_billing_history WHERE credit_source = 'REFRESH'""")


# Rollover and lapse: refreshed credits are spent first.

def test_refreshed_credits_are_spent_first_and_the_unspent_lapse_by_default(client, database_url):
    set_ledger_clock(database_url, at(2027, 3, 10))
    subscribe(client)
    client.grant("acme", 5_000_000)  # granted credits never lapse
    client.allocate("acme", "alice", 25_000_000)
    deduct(client, 8_000_000)
    shown = pool(client)
    assert (shown.refresh_unspent_millicredits, shown.rollover_cap_millicredits) == (12_000_000, 0)
    set_ledger_clock(database_url, at(2027, 4, 10))
    shown = pool(client)
    # 12,000 credits of refresh lapsed, 20,000 came: 5,000 granted stay.
    assert credit_events(database_url)[-2:] == [
        ("LAPSE", -12_000_000, at(2027, 4, 10)), ("REFRESH", MONTHLY_REFRESH, at(2027, 4, 10))]
    assert shown.total_millicredits - shown.used_millicredits == MONTHLY_REFRESH + 5_000_000
    assert shown.refresh_unspent_millicredits == MONTHLY_REFRESH


def test_unspent_refreshed_credits_roll_over_up_to_the_cap(client, database_url):
    set_ledger_clock(database_url, at(2027, 3, 10))
    subscribe(client)
    set_refresh(client, rollover_cap=7_000_000)
    client.allocate("acme", "alice", MONTHLY_REFRESH)
    deduct(client, 8_000_000)  # 12,000 credits unspent: 7,000 roll over
    set_ledger_clock(database_url, at(2027, 4, 10))
    shown = pool(client)
    assert credit_events(database_url)[-2][:2] == ("LAPSE", -5_000_000)
    assert shown.refresh_unspent_millicredits == MONTHLY_REFRESH + 7_000_000
    # Next period, nothing spent: the 27,000 unspent keep 7,000.
    set_ledger_clock(database_url, at(2027, 5, 10))
    assert pool(client).refresh_unspent_millicredits == MONTHLY_REFRESH + 7_000_000
    assert credit_events(database_url)[-2][:2] == ("LAPSE", -20_000_000)


def test_a_lapse_never_takes_allocated_or_held_credits(client, database_url):
    set_ledger_clock(database_url, at(2027, 3, 10))
    subscribe(client)
    set_refresh(client, refresh=0)  # no refresh from the next period on
    client.allocate("acme", "alice", 15_000_000)
    set_ledger_clock(database_url, at(2027, 4, 10))
    shown = pool(client)
    # 20,000 unspent, but 15,000 are allocated: only 5,000 lapse, the rest stays refreshed.
    assert credit_events(database_url)[-1][:2] == ("LAPSE", -5_000_000)
    assert (shown.total_millicredits, shown.refresh_unspent_millicredits) == (15_000_000, 15_000_000)


# Overage per period.

def test_each_periods_overage_is_recorded_at_its_end_and_the_refresh_covers_it(client, database_url):
    set_ledger_clock(database_url, at(2027, 3, 10))
    subscribe(client)
    client.billing.SetOverage(pb.SetOverageRequest(
        org_id="acme", overage_limit_millicredits=10_000_000,
        overage_rate_millicents_per_credit=100, idempotency_key=new_key()))
    client.allocate("acme", "alice", MONTHLY_REFRESH)
    deduct(client, MONTHLY_REFRESH)
    client.allocate("acme", "alice", 0)
    client.allocate("acme", "bob", MONTHLY_REFRESH)
    deduct(client, 3_000_001, user="bob")
    assert pool(client).overage_used_millicredits == 3_000_001
    set_ledger_clock(database_url, at(2027, 4, 10))
    shown = pool(client)
    assert shown.overage_used_millicredits == 0
    assert shown.total_millicredits - shown.used_millicredits == MONTHLY_REFRESH - 3_000_001
    (renewed,) = renewals(database_url)
    # 3,000.001 credits at 100 millicents (a tenth of a cent) each: $3.0000001, rounded up.
    assert (renewed["overage_used"], renewed["overage_rate"], renewed["overage_charge_millicents"]) \
        == (3_000_001, 100, 300_001)
    assert renewed["ended_period_start_us"] == int(at(2027, 3, 10).timestamp() * 1_000_000)


# Exact instants of holds and allocation periods.

def test_a_hold_counts_until_the_microsecond_before_its_expiry_and_not_at_it(client, database_url):
    set_ledger_clock(database_url, at(2027, 3, 10, 12))
    client.funded_org("acme", 10_000, {"alice": 1_000})
    request = credit_pb.ReserveCreditsRequest(
        org_id="acme", user_id="alice", amount_millicredits=600, service_type="llm",
        service_name="chat", idempotency_key=new_key())
    request.ttl.FromSeconds(60)
    held = client.credits.ReserveCredits(request)
    assert held.expire_time.ToDatetime(tzinfo=UTC) == at(2027, 3, 10, 12, 1)
    set_ledger_clock(database_url, at(2027, 3, 10, 12, 1) - MICROSECOND)
    assert check(client).allocation_remaining_millicredits == 400
    set_ledger_clock(database_url, at(2027, 3, 10, 12, 1))
    assert check(client).allocation_remaining_millicredits == 1_000
    deduct(client, 1_000)


@pytest.mark.parametrize("reset_period, created, reset_at", [
    ("MONTHLY", at(2027, 1, 31, 23), at(2027, 2, 1)),
    ("MONTHLY", at(2028, 2, 29, 12), at(2028, 3, 1)),
    ("DAILY", at(2028, 2, 28, 12), at(2028, 2, 29)),
    ("WEEKLY", at(2027, 12, 31, 12), at(2028, 1, 3)),  # weeks start on Monday
])
def test_an_allocation_period_resets_at_its_exact_microsecond(
        client, database_url, reset_period, created, reset_at):
    set_ledger_clock(database_url, created)
    client.funded_org("acme", 10_000, {})
    client.billing.AllocateCredits(pb.AllocateCreditsRequest(
        org_id="acme", user_id="alice", limit_millicredits=1_000,
        reset_period=getattr(t, f"RESET_PERIOD_{reset_period}"), idempotency_key=new_key()))
    deduct(client, 700)
    set_ledger_clock(database_url, reset_at - MICROSECOND)
    assert check(client).allocation_remaining_millicredits == 300
    set_ledger_clock(database_url, reset_at)
    assert check(client).allocation_remaining_millicredits == 1_000
    assert deduct(client, 1_000).allocation_remaining_millicredits == 0


# SetCreditRefresh.

def test_an_orgs_own_refresh_replaces_the_plans_from_the_next_period(client, database_url):
    set_ledger_clock(database_url, at(2027, 3, 10))
    subscribe(client)
    changed = set_refresh(client, refresh=1_000_000, rollover_cap=500_000)
    assert (changed.pool.refresh_millicredits, changed.pool.refresh_overridden,
            changed.pool.rollover_cap_millicredits) == (1_000_000, True, 500_000)
    assert changed.pool.total_millicredits == MONTHLY_REFRESH  # nothing granted early
    set_ledger_clock(database_url, at(2027, 4, 10))
    assert pool(client).total_millicredits == 1_000_000 + 500_000  # what rolled over, and the refresh
    assert credit_events(database_url)[-1][:2] == ("REFRESH", 1_000_000)
    back = set_refresh(client)  # unset: the plan's again
    assert (back.pool.refresh_millicredits, back.pool.refresh_overridden) == (MONTHLY_REFRESH, False)
    with psycopg.connect(database_url) as conn:
        assert [row[0] for row in conn.execute(
            "SELECT details FROM org_billing_history WHERE event_type = 'REFRESH_CHANGED'"
            " ORDER BY created_at, event_id")] == [
            {"old_refresh": None, "new_refresh": 1_000_000, "old_rollover_cap": 0, "new_rollover_cap": 500_000},
            {"old_refresh": 1_000_000, "new_refresh": None, "old_rollover_cap": 500_000, "new_rollover_cap": 0}]


def test_set_refresh_replays_refuses_reused_keys_and_bad_input(client, database_url):
    subscribe(client)
    first = set_refresh(client, refresh=5, key="k1")
    again = set_refresh(client, refresh=5, key="k1")
    assert again.replayed and again.event_id == first.event_id
    with raises_rpc(CODE.FAILED_PRECONDITION, "IDEMPOTENCY_KEY_REUSED"):
        set_refresh(client, refresh=6, key="k1")
    for kwargs, field in [({"refresh": -1}, "refresh_millicredits"),
                          ({"refresh": 10**15 + 1}, "refresh_millicredits"),
                          ({"rollover_cap": -1}, "rollover_cap_millicredits"),
                          ({"rollover_cap": 10**18 + 1}, "rollover_cap_millicredits"),
                          ({"org": "not an org!"}, "org_id"),
                          ({"key": "not ascii: é"}, "idempotency_key")]:
        with raises_rpc(CODE.INVALID_ARGUMENT) as refused:
            set_refresh(client, **kwargs)
        assert field in field_violations(refused["error"])
    with raises_rpc(CODE.NOT_FOUND, "ORG_NOT_FOUND"):
        set_refresh(client, org="nobody")


def test_callers_may_not_add_refresh_or_lapse_credits(client):
    subscribe(client)
    for source in (t.CREDIT_SOURCE_REFRESH, t.CREDIT_SOURCE_LAPSE):
        with raises_rpc(CODE.INVALID_ARGUMENT) as refused:
            client.billing.AddCredits(pb.AddCreditsRequest(
                org_id="acme", source=source, amount_millicredits=1, idempotency_key=new_key()))
        assert "source" in field_violations(refused["error"])
