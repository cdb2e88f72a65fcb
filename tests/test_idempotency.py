"""Exactly once: the same key charges once, sequentially or concurrently; the
same key with another request is refused. Keys are scoped per organization
and operation family, and the records of refusals and administrative changes
are swept after their retention window."""

import concurrent.futures
import re
import threading
import time

import grpc
import psycopg
import pytest

from orgbilling.v1 import credit_service_pb2 as pb
from orgbilling.v1 import org_billing_service_pb2 as billing_pb
from orgbilling.v1 import types_pb2 as t
from orgbilling.server.settings import Settings
from orgbilling.server.store import SWEEP_LOCK_KEY
from orgbilling.server.sweeper import IdempotencySweeper
from tests.support import REPO, raises_rpc, readme_table

WEEK_MS = 7 * 24 * 3_600_000


def deduct(client, key, amount=100, user="alice"):
    return client.credits.DeductCredits(pb.DeductCreditsRequest(
        org_id="acme", user_id=user, amount_millicredits=amount, service_type="llm",
        service_name="chat", idempotency_key=key))


def attribution_count(database_url):
    with psycopg.connect(database_url) as conn:
        return conn.execute("SELECT count(*) FROM credit_usage_attribution").fetchone()[0]


def test_sequential_retry_returns_the_original_result_and_charges_once(client, database_url):
    client.funded_org("acme", 10_000, {"alice": 1_000})
    first = deduct(client, "retry-me")
    deduct(client, "other")
    again = deduct(client, "retry-me")
    assert again.replayed and not first.replayed
    assert again.deduction_id == first.deduction_id
    assert again.allocation_remaining_millicredits == first.allocation_remaining_millicredits == 900
    assert attribution_count(database_url) == 2


def test_concurrent_retries_of_one_key_charge_once(client, database_url):
    """16 threads sending the same key at once: one charge, all see its id."""
    client.funded_org("acme", 10_000, {"alice": 1_000})
    barrier = threading.Barrier(16)

    def send():
        barrier.wait()
        return deduct(client, "same-key")

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        responses = [f.result() for f in [pool.submit(send) for _ in range(16)]]
    assert len({r.deduction_id for r in responses}) == 1
    assert sum(not r.replayed for r in responses) == 1
    assert attribution_count(database_url) == 1


def test_same_key_with_another_request_is_refused(client, database_url):
    client.funded_org("acme", 10_000, {"alice": 1_000, "bob": 1_000})
    deduct(client, "k")
    with raises_rpc(grpc.StatusCode.FAILED_PRECONDITION, "IDEMPOTENCY_KEY_REUSED"):
        deduct(client, "k", amount=101)
    with raises_rpc(grpc.StatusCode.FAILED_PRECONDITION, "IDEMPOTENCY_KEY_REUSED"):
        deduct(client, "k", user="bob")
    assert attribution_count(database_url) == 1


def test_admin_mutations_replay_and_refuse_reuse(client, database_url):
    """Every administrative mutation replays on its key and refuses its reuse,
    by another operation of its family too."""
    create = billing_pb.CreateSubscriptionRequest(
        org_id="acme", plan=t.PLAN_BYOK, billing_cycle=t.BILLING_CYCLE_MONTHLY, idempotency_key="sub")
    first = client.billing.CreateSubscription(create)
    replay = client.billing.CreateSubscription(create)
    assert replay.replayed and replay.subscription == first.subscription

    grant = billing_pb.AddCreditsRequest(org_id="acme", source=t.CREDIT_SOURCE_GRANT,
                                         amount_millicredits=5_000, idempotency_key="grant")
    assert not client.billing.AddCredits(grant).replayed
    again = client.billing.AddCredits(grant)
    assert again.replayed and again.pool.total_millicredits == 5_000
    grant.amount_millicredits = 6_000
    with raises_rpc(grpc.StatusCode.FAILED_PRECONDITION, "IDEMPOTENCY_KEY_REUSED"):
        client.billing.AddCredits(grant)

    allocate = billing_pb.AllocateCreditsRequest(org_id="acme", user_id="alice", limit_millicredits=100,
                                                 reset_period=t.RESET_PERIOD_NEVER, idempotency_key="alloc")
    client.billing.AllocateCredits(allocate)
    assert client.billing.AllocateCredits(allocate).replayed
    with raises_rpc(grpc.StatusCode.FAILED_PRECONDITION, "IDEMPOTENCY_KEY_REUSED"):
        client.billing.RevokeAllocation(billing_pb.RevokeAllocationRequest(
            org_id="acme", user_id="alice", idempotency_key="alloc"))  # the allocations family's key
    with raises_rpc(grpc.StatusCode.FAILED_PRECONDITION, "IDEMPOTENCY_KEY_REUSED"):
        client.billing.CancelSubscription(billing_pb.CancelSubscriptionRequest(
            org_id="acme", idempotency_key="sub"))  # the subscriptions family's key

    with psycopg.connect(database_url) as conn:
        events = conn.execute("SELECT event_type, count(*) FROM org_billing_history GROUP BY 1 ORDER BY 1").fetchall()
    assert events == [("ALLOCATION_CHANGED", 1), ("CREDITS_ADDED", 1), ("SUBSCRIPTION_CREATED", 1)]


def test_concurrent_admin_retries_apply_once(client, database_url):
    client.funded_org("acme", 0, {})
    grant = billing_pb.AddCreditsRequest(org_id="acme", source=t.CREDIT_SOURCE_GRANT,
                                         amount_millicredits=777, idempotency_key="g")
    barrier = threading.Barrier(12)

    def send():
        barrier.wait()
        return client.billing.AddCredits(grant)

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        responses = [f.result() for f in [pool.submit(send) for _ in range(12)]]
    assert sum(not r.replayed for r in responses) == 1
    pool_now = client.billing.GetCreditPool(billing_pb.GetCreditPoolRequest(org_id="acme")).pool
    assert pool_now.total_millicredits == 777


def test_a_refusal_is_replayed_for_its_key_even_after_a_top_up(client, database_url):
    """A refused deduction's key keeps its refusal: retrying it after the
    balance grew gives the same answer, so an attempt held up on its way to
    the database can never be applied after its caller was told no. A new
    attempt takes a new key."""
    client.funded_org("acme", 10_000, {"alice": 100})
    with raises_rpc(grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_CREDITS") as first:
        deduct(client, "too-big", amount=500)
    client.allocate("acme", "alice", 1_000)
    with raises_rpc(grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_CREDITS") as again:
        deduct(client, "too-big", amount=500)
    assert again["info"].metadata == first["info"].metadata
    with raises_rpc(grpc.StatusCode.FAILED_PRECONDITION, "IDEMPOTENCY_KEY_REUSED"):
        deduct(client, "too-big", amount=50)
    assert deduct(client, "new-key", amount=500).allocation_remaining_millicredits == 500
    assert attribution_count(database_url) == 1


def test_an_admin_refusal_is_replayed_for_its_key(client):
    client.funded_org("acme", 1_000, {})
    allocate = billing_pb.AllocateCreditsRequest(org_id="acme", user_id="alice", limit_millicredits=5_000,
                                                 reset_period=t.RESET_PERIOD_NEVER, idempotency_key="big")
    with raises_rpc(grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_UNALLOCATED_CREDITS"):
        client.billing.AllocateCredits(allocate)
    client.grant("acme", 10_000)
    with raises_rpc(grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_UNALLOCATED_CREDITS"):
        client.billing.AllocateCredits(allocate)


# Keys are scoped per organization and operation family.

def test_the_readme_lists_every_operation_in_its_family():
    """The README's table of families is idempotency_family()'s list,
    operation for operation (it once fell behind: holds, refunds, overage)."""
    in_readme = {operation.strip(): family
                 for family, operations in readme_table("| family | operations |")
                 for operation in operations.split(",")}
    function = (REPO / "migrations" / "functions" / "20_idempotency.sql").read_text()
    case = re.sub(r"--[^\n]*", "", function.split("CASE p_operation", 1)[1].split("END CASE", 1)[0])
    in_function = {"DeductCreditsBatch items": "deductions"}  # each item is a DeductCredits
    for operations, family in re.findall(r"WHEN (.*?) THEN RETURN '(\w+)'", case, re.DOTALL):
        in_function |= {operation: family for operation in re.findall(r"'(\w+)'", operations)}
    assert in_readme == in_function


def test_a_key_refused_for_a_deduction_is_free_in_every_other_family(client, database_url):
    """The review's case: a deduction refused under `buy-acme-2`, then an
    admin's purchase, allocation and subscription with that key, in the same
    organization: each is applied, each replays as itself, and reusing the key
    for another request within a family is still refused."""
    client.funded_org("acme", 10_000, {"alice": 100})
    client.billing.CancelSubscription(billing_pb.CancelSubscriptionRequest(
        org_id="acme", idempotency_key="cancel-setup"))
    key = "buy-acme-2"
    with raises_rpc(grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_CREDITS") as refused:
        deduct(client, key, amount=500)

    buy = billing_pb.AddCreditsRequest(org_id="acme", source=t.CREDIT_SOURCE_GRANT,
                                       amount_millicredits=5_000, idempotency_key=key)
    bought = client.billing.AddCredits(buy)
    assert not bought.replayed and bought.pool.total_millicredits == 15_000
    allocate = billing_pb.AllocateCreditsRequest(org_id="acme", user_id="alice", limit_millicredits=1_000,
                                                 reset_period=t.RESET_PERIOD_NEVER, idempotency_key=key)
    allocated = client.billing.AllocateCredits(allocate)
    assert not allocated.replayed and allocated.allocation.limit_millicredits == 1_000
    subscribe = billing_pb.CreateSubscriptionRequest(org_id="acme", plan=t.PLAN_HYBRID,
                                                     billing_cycle=t.BILLING_CYCLE_YEARLY, idempotency_key=key)
    subscribed = client.billing.CreateSubscription(subscribe)
    assert not subscribed.replayed

    # Replays: each family's own first answer, the deduction's refusal included
    # (though alice could now afford it).
    with raises_rpc(grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_CREDITS") as again:
        deduct(client, key, amount=500)
    assert again["info"].metadata == refused["info"].metadata
    bought.replayed = True
    assert client.billing.AddCredits(buy) == bought
    allocated.replayed = True
    assert client.billing.AllocateCredits(allocate) == allocated
    replayed = client.billing.CreateSubscription(subscribe)
    assert replayed.replayed and replayed.subscription == subscribed.subscription

    # Another request under the key, within each family: refused.
    with raises_rpc(grpc.StatusCode.FAILED_PRECONDITION, "IDEMPOTENCY_KEY_REUSED"):
        deduct(client, key, amount=50)
    with raises_rpc(grpc.StatusCode.FAILED_PRECONDITION, "IDEMPOTENCY_KEY_REUSED"):
        client.billing.AddCredits(billing_pb.AddCreditsRequest(
            org_id="acme", source=t.CREDIT_SOURCE_GRANT, amount_millicredits=6_000, idempotency_key=key))
    with raises_rpc(grpc.StatusCode.FAILED_PRECONDITION, "IDEMPOTENCY_KEY_REUSED"):
        client.billing.RevokeAllocation(billing_pb.RevokeAllocationRequest(
            org_id="acme", user_id="alice", idempotency_key=key))
    with raises_rpc(grpc.StatusCode.FAILED_PRECONDITION, "IDEMPOTENCY_KEY_REUSED"):
        client.billing.ChangePlan(billing_pb.ChangePlanRequest(
            org_id="acme", plan=t.PLAN_BYOK, billing_cycle=t.BILLING_CYCLE_MONTHLY, idempotency_key=key))

    with psycopg.connect(database_url) as conn:
        assert conn.execute(
            "SELECT family, operation, result ->> 'outcome' FROM idempotency_records"
            " WHERE idempotency_key = %s ORDER BY family", (key,)).fetchall() == [
            ("allocations", "AllocateCredits", "OK"), ("credits", "AddCredits", "OK"),
            ("deductions", "DeductCredits", "INSUFFICIENT_CREDITS"),
            ("subscriptions", "CreateSubscription", "OK")]
        assert conn.execute("SELECT count(*) FROM credit_usage_attribution").fetchone()[0] == 0


def test_a_deduction_key_is_independent_of_admin_keys_in_batches_too(client, database_url):
    """A charged deduction and an administrative change may share a key, in
    DeductCredits and in DeductCreditsBatch alike; the charge replays."""
    client.funded_org("acme", 10_000, {"alice": 1_000})
    grant = billing_pb.AddCreditsRequest(org_id="acme", source=t.CREDIT_SOURCE_GRANT,
                                         amount_millicredits=10, idempotency_key="shared")
    client.billing.AddCredits(grant)
    single = deduct(client, "shared")
    assert not single.replayed
    items = [pb.DeductCreditsRequest(org_id="acme", user_id="alice", amount_millicredits=100,
                                     service_type="llm", service_name="chat", idempotency_key="shared"),
             pb.DeductCreditsRequest(org_id="acme", user_id="nobody", amount_millicredits=100,
                                     service_type="llm", service_name="chat", idempotency_key="grant-too")]
    client.billing.AddCredits(billing_pb.AddCreditsRequest(
        org_id="acme", source=t.CREDIT_SOURCE_GRANT, amount_millicredits=10, idempotency_key="grant-too"))
    for _ in range(2):
        results = client.credits.DeductCreditsBatch(pb.DeductCreditsBatchRequest(deductions=items)).results
        assert results[0].deduction.replayed and results[0].deduction.deduction_id == single.deduction_id
        assert results[1].error.reason == "ALLOCATION_NOT_FOUND"  # stored, then replayed
    assert client.billing.AddCredits(grant).replayed
    assert attribution_count(database_url) == 1


# Retention: the sweeper.

def make_sweeper(server, batch_size_max=1000):
    return IdempotencySweeper(server.store, retention_ms=WEEK_MS, interval_ms=60_000,
                              batch_size_max=batch_size_max)


def age(database_url, keys, days=8):
    """Moves these keys' records and charges `days` into the past."""
    with psycopg.connect(database_url) as conn:
        for table in ("idempotency_records", "credit_usage_attribution"):
            conn.execute(f"UPDATE {table} SET created_at = now() - make_interval(days => %s)"
                         " WHERE idempotency_key = ANY(%s)", (days, list(keys)))


def refused_under(client, keys):
    """Stores a refusal (ALLOCATION_NOT_FOUND) under each key."""
    for key in keys:
        with raises_rpc(grpc.StatusCode.FAILED_PRECONDITION, "ALLOCATION_NOT_FOUND"):
            deduct(client, key, user="nobody")


def record_keys(database_url):
    with psycopg.connect(database_url) as conn:
        return {key for (key,) in conn.execute("SELECT idempotency_key FROM idempotency_records")}


def test_the_sweeper_deletes_only_expired_records_and_never_charges(server, client, database_url):
    """Records past the window go, records inside it stay, a charge stays
    forever; a swept key is new again, a charge's key still replays."""
    client.funded_org("acme", 10_000, {"alice": 100})
    with raises_rpc(grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_CREDITS"):
        deduct(client, "old-refusal", amount=500)
    with raises_rpc(grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_CREDITS"):
        deduct(client, "new-refusal", amount=500)
    grant = billing_pb.AddCreditsRequest(org_id="acme", source=t.CREDIT_SOURCE_GRANT,
                                         amount_millicredits=1_000, idempotency_key="old-grant")
    client.billing.AddCredits(grant)
    charged = deduct(client, "old-charge", amount=10)
    age(database_url, ["old-refusal", "old-grant", "old-charge"], days=8)
    # Just inside the window: kept.
    age(database_url, ["new-refusal"], days=6)
    before = record_keys(database_url)

    assert make_sweeper(server).sweep_once() == 2
    assert record_keys(database_url) == before - {"old-refusal", "old-grant"}
    assert attribution_count(database_url) == 1
    assert make_sweeper(server).sweep_once() == 0

    assert deduct(client, "old-charge", amount=10).deduction_id == charged.deduction_id
    with raises_rpc(grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_CREDITS"):
        deduct(client, "new-refusal", amount=500)
    client.allocate("acme", "alice", 1_000)
    retried = deduct(client, "old-refusal", amount=500)  # new again: charged now
    assert not retried.replayed and retried.allocation_remaining_millicredits == 490
    again = client.billing.AddCredits(grant)  # new again: added a second time
    assert not again.replayed and again.pool.total_millicredits == 12_000


def test_the_sweeper_deletes_in_batches_of_its_size(server, client, database_url):
    client.funded_org("acme", 10_000, {})
    old = [f"old-{i}" for i in range(7)]
    refused_under(client, [*old, "fresh"])
    age(database_url, old)
    sweeper = make_sweeper(server, batch_size_max=3)
    assert [sweeper.sweep_once() for _ in range(4)] == [3, 3, 1, 0]
    assert record_keys(database_url).isdisjoint(old) and "fresh" in record_keys(database_url)


def test_one_replica_sweeps_at_a_time_and_concurrent_sweeps_are_safe(server, client, database_url):
    """While another replica holds the sweep lock, a sweep deletes nothing;
    sweepers racing delete each record once, with no error."""
    client.funded_org("acme", 10_000, {})
    old = [f"old-{i}" for i in range(40)]
    refused_under(client, old)
    age(database_url, old)
    with psycopg.connect(database_url) as other_replica:
        other_replica.execute("SELECT pg_advisory_xact_lock(%s)", (SWEEP_LOCK_KEY,))
        assert make_sweeper(server).sweep_once() == 0
    assert set(old) <= record_keys(database_url)

    barrier = threading.Barrier(4)

    def sweep_until_done(sweeper):
        barrier.wait()
        deleted = 0
        while batch := sweeper.sweep_once():
            deleted += batch
        return deleted

    sweepers = [make_sweeper(server, batch_size_max=5) for _ in range(4)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        deleted = [f.result() for f in [pool.submit(sweep_until_done, s) for s in sweepers]]
    # A sweeper that found the lock taken stopped early; one carried on to the end.
    assert sum(deleted) == len(old) and record_keys(database_url).isdisjoint(old)


def test_the_sweeper_thread_sweeps_every_interval_until_stopped(server, client, database_url):
    client.funded_org("acme", 10_000, {})
    old = [f"old-{i}" for i in range(5)]
    refused_under(client, old)
    age(database_url, old)
    sweeper = IdempotencySweeper(server.store, retention_ms=WEEK_MS, interval_ms=50, batch_size_max=2)
    sweeper.start()
    try:
        deadline = time.monotonic() + 10
        while not record_keys(database_url).isdisjoint(old) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert record_keys(database_url).isdisjoint(old)
    finally:
        sweeper.stop()
    assert not sweeper._thread.is_alive()


def test_retention_defaults_to_a_week_and_refuses_less_than_an_hour():
    settings = Settings()
    assert settings.idempotency_retention_ms == WEEK_MS
    assert settings.sweeper_interval_ms >= 1 and settings.sweeper_batch_size_max >= 1
    with pytest.raises(ValueError, match="idempotency_retention_ms"):
        Settings.load(environ={"ORGBILLING_IDEMPOTENCY_RETENTION_MS": "7"})
