"""Exactly once: the same key charges once, sequentially or concurrently; the
same key with another request is refused."""

import concurrent.futures
import threading

import grpc
import psycopg

from orgbilling.v1 import credit_service_pb2 as pb
from orgbilling.v1 import org_billing_service_pb2 as billing_pb
from orgbilling.v1 import types_pb2 as t
from tests.support import raises_rpc


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
    across operations too."""
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
                                                 reset_period=t.RESET_PERIOD_NEVER, idempotency_key="grant")
    with raises_rpc(grpc.StatusCode.FAILED_PRECONDITION, "IDEMPOTENCY_KEY_REUSED"):
        client.billing.AllocateCredits(allocate)  # a key of AddCredits
    allocate.idempotency_key = "alloc"
    client.billing.AllocateCredits(allocate)
    assert client.billing.AllocateCredits(allocate).replayed
    with raises_rpc(grpc.StatusCode.FAILED_PRECONDITION, "IDEMPOTENCY_KEY_REUSED"):
        deduct(client, "alloc")  # a key of AllocateCredits, on the hot path

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
