"""Subscriptions, pools and allocations through a real server: success
paths and every documented refusal."""

import grpc
import psycopg
import pytest

from orgbilling.v1 import org_billing_service_pb2 as pb
from orgbilling.v1 import types_pb2 as t
from tests.support import field_violations, new_key, raises_rpc, with_fields

CODE = grpc.StatusCode


def create(client, org="acme", plan=t.PLAN_BYOK, cycle=t.BILLING_CYCLE_MONTHLY, key=None, **extra):
    return client.billing.CreateSubscription(pb.CreateSubscriptionRequest(
        org_id=org, plan=plan, billing_cycle=cycle, idempotency_key=key or new_key(), **extra))


def add(client, org="acme", key=None, **fields):
    return client.billing.AddCredits(pb.AddCreditsRequest(org_id=org, idempotency_key=key or new_key(), **fields))


def history(database_url, org="acme"):
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            "SELECT event_type, credits_delta_millicredits FROM org_billing_history"
            " WHERE org_id = %s ORDER BY event_id", (org,)).fetchall()


# Subscriptions.

def test_subscription_is_priced_by_the_catalog_and_recorded(client, database_url):
    subscription = create(client, plan=t.PLAN_HYBRID, cycle=t.BILLING_CYCLE_YEARLY).subscription
    assert subscription.status == t.SUBSCRIPTION_STATUS_ACTIVE
    assert (subscription.price_cents, subscription.currency) == (29_000, "USD")
    assert subscription.current_period_end.ToSeconds() - subscription.current_period_start.ToSeconds() >= 365 * 86400
    got = client.billing.GetSubscription(pb.GetSubscriptionRequest(org_id="acme")).subscription
    assert got == subscription
    # The first period starts with the plan's refresh, a year's worth.
    assert history(database_url) == [("SUBSCRIPTION_CREATED", 0), ("CREDITS_ADDED", 60_000_000)]
    pool = client.billing.GetCreditPool(pb.GetCreditPoolRequest(org_id="acme")).pool
    assert (pool.total_millicredits, pool.refresh_millicredits, pool.refresh_unspent_millicredits) \
        == (60_000_000, 60_000_000, 60_000_000)
    assert pool.next_refresh_time == subscription.current_period_end


def test_trial_subscription_starts_trialing(client):
    subscription = create(client, trial_days=14).subscription
    assert subscription.status == t.SUBSCRIPTION_STATUS_TRIALING
    assert subscription.trial_end.ToSeconds() - subscription.create_time.ToSeconds() == 14 * 86400


def test_second_live_subscription_is_refused(client):
    create(client)
    with raises_rpc(CODE.ALREADY_EXISTS, "SUBSCRIPTION_EXISTS"):
        create(client, plan=t.PLAN_BYOK)


def test_plan_changes_are_recorded_as_upgrade_or_downgrade(client, database_url):
    create(client, plan=t.PLAN_BYOK)
    up = client.billing.ChangePlan(pb.ChangePlanRequest(
        org_id="acme", plan=t.PLAN_PLATFORM, billing_cycle=t.BILLING_CYCLE_MONTHLY, idempotency_key=new_key()))
    assert up.change == t.PLAN_CHANGE_UPGRADE and up.subscription.price_cents == 4_900
    down = client.billing.ChangePlan(pb.ChangePlanRequest(
        org_id="acme", plan=t.PLAN_HYBRID, billing_cycle=t.BILLING_CYCLE_MONTHLY, idempotency_key=new_key()))
    assert down.change == t.PLAN_CHANGE_DOWNGRADE
    with raises_rpc(CODE.FAILED_PRECONDITION, "PLAN_UNCHANGED"):
        client.billing.ChangePlan(pb.ChangePlanRequest(
            org_id="acme", plan=t.PLAN_HYBRID, billing_cycle=t.BILLING_CYCLE_MONTHLY, idempotency_key=new_key()))
    assert [e for e, _ in history(database_url)] == [
        "SUBSCRIPTION_CREATED", "SUBSCRIPTION_UPGRADED", "SUBSCRIPTION_DOWNGRADED"]


def test_cancel_then_subscribe_again(client):
    create(client)
    canceled = client.billing.CancelSubscription(pb.CancelSubscriptionRequest(
        org_id="acme", reason="moving on", idempotency_key=new_key())).subscription
    assert canceled.status == t.SUBSCRIPTION_STATUS_CANCELED and canceled.HasField("cancel_time")
    with raises_rpc(CODE.NOT_FOUND, "SUBSCRIPTION_NOT_FOUND"):
        client.billing.GetSubscription(pb.GetSubscriptionRequest(org_id="acme"))
    with raises_rpc(CODE.NOT_FOUND, "SUBSCRIPTION_NOT_FOUND"):
        client.billing.CancelSubscription(pb.CancelSubscriptionRequest(org_id="acme", idempotency_key=new_key()))
    assert create(client).subscription.status == t.SUBSCRIPTION_STATUS_ACTIVE


def test_unknown_org_is_not_found_everywhere(client):
    with raises_rpc(CODE.NOT_FOUND, "ORG_NOT_FOUND"):
        client.billing.GetSubscription(pb.GetSubscriptionRequest(org_id="ghost"))
    with raises_rpc(CODE.NOT_FOUND, "ORG_NOT_FOUND"):
        client.billing.ChangePlan(pb.ChangePlanRequest(
            org_id="ghost", plan=t.PLAN_BYOK, billing_cycle=t.BILLING_CYCLE_MONTHLY, idempotency_key=new_key()))
    with raises_rpc(CODE.NOT_FOUND, "ORG_NOT_FOUND"):
        client.billing.CancelSubscription(pb.CancelSubscriptionRequest(org_id="ghost", idempotency_key=new_key()))
    with raises_rpc(CODE.NOT_FOUND, "ORG_NOT_FOUND"):
        client.billing.GetCreditPool(pb.GetCreditPoolRequest(org_id="ghost"))
    with raises_rpc(CODE.NOT_FOUND, "ORG_NOT_FOUND"):
        add(client, org="ghost", source=t.CREDIT_SOURCE_GRANT, amount_millicredits=1)
    with raises_rpc(CODE.NOT_FOUND, "ORG_NOT_FOUND"):
        client.allocate("ghost", "alice", 1)
    with raises_rpc(CODE.NOT_FOUND, "ORG_NOT_FOUND"):
        client.billing.RevokeAllocation(pb.RevokeAllocationRequest(org_id="ghost", user_id="a", idempotency_key=new_key()))
    with raises_rpc(CODE.NOT_FOUND, "ORG_NOT_FOUND"):
        client.billing.ListAllocations(pb.ListAllocationsRequest(org_id="ghost"))


@pytest.mark.parametrize("changes, bad_field", [
    ({"plan": 0}, "plan"),
    ({"plan": 99}, "plan"),
    ({"billing_cycle": 0}, "billing_cycle"),
    ({"trial_days": -1}, "trial_days"),
    ({"trial_days": 366}, "trial_days"),
    ({"external_customer_id": "c" * 129}, "external_customer_id"),
    ({"org_id": ""}, "org_id"),
    ({"idempotency_key": ""}, "idempotency_key"),
])
def test_create_subscription_rejects_bad_fields(client, changes, bad_field):
    request = with_fields(pb.CreateSubscriptionRequest(org_id="acme", plan=t.PLAN_BYOK,
                                                       billing_cycle=t.BILLING_CYCLE_MONTHLY,
                                                       idempotency_key="k"), changes)
    with raises_rpc(CODE.INVALID_ARGUMENT) as refused:
        client.billing.CreateSubscription(request)
    assert bad_field in field_violations(refused["error"])


# Credits.

def test_purchase_credits_follow_from_the_amount_paid(client, database_url):
    """A purchase's credits come from the catalog rate, never from the caller."""
    create(client)
    added = add(client, source=t.CREDIT_SOURCE_PURCHASE, amount_paid_cents=1_250,
                currency="USD", payment_reference="pay_123")
    assert added.added_millicredits == 12_500_000  # $12.50 at $0.001 a credit
    assert added.pool.total_millicredits == 12_500_000
    with raises_rpc(CODE.INVALID_ARGUMENT) as refused:
        add(client, source=t.CREDIT_SOURCE_PURCHASE, amount_paid_cents=1, currency="USD",
            payment_reference="pay_124", amount_millicredits=10**12)
    assert "amount_millicredits" in field_violations(refused["error"])
    with raises_rpc(CODE.ALREADY_EXISTS, "PAYMENT_ALREADY_RECORDED"):
        add(client, source=t.CREDIT_SOURCE_PURCHASE, amount_paid_cents=99, currency="USD",
            payment_reference="pay_123")
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT credit_source, amount_paid_cents, currency, payment_reference"
                           " FROM org_billing_history WHERE event_type = 'CREDITS_ADDED'").fetchone()
    assert row == ("PURCHASE", 1_250, "USD", "pay_123")


@pytest.mark.parametrize("fields, bad_field", [
    ({"source": 0, "amount_millicredits": 1}, "source"),
    ({"source": t.CREDIT_SOURCE_GRANT, "amount_millicredits": 0}, "amount_millicredits"),
    ({"source": t.CREDIT_SOURCE_GRANT, "amount_millicredits": -5}, "amount_millicredits"),
    ({"source": t.CREDIT_SOURCE_GRANT, "amount_millicredits": 10**15 + 1}, "amount_millicredits"),
    ({"source": t.CREDIT_SOURCE_ADJUSTMENT, "amount_millicredits": 0}, "amount_millicredits"),
    ({"source": t.CREDIT_SOURCE_GRANT, "amount_millicredits": 5, "payment_reference": "p"}, "payment_reference"),
    ({"source": t.CREDIT_SOURCE_PURCHASE, "amount_paid_cents": 100, "currency": "EUR", "payment_reference": "p"}, "currency"),
    ({"source": t.CREDIT_SOURCE_PURCHASE, "amount_paid_cents": 0, "currency": "USD", "payment_reference": "p"}, "amount_paid_cents"),
    ({"source": t.CREDIT_SOURCE_PURCHASE, "amount_paid_cents": -100, "currency": "USD", "payment_reference": "p"}, "amount_paid_cents"),
    ({"source": t.CREDIT_SOURCE_PURCHASE, "amount_paid_cents": 100, "currency": "USD"}, "payment_reference"),
])
def test_add_credits_rejects_bad_fields(client, fields, bad_field):
    create(client)
    with raises_rpc(CODE.INVALID_ARGUMENT) as refused:
        add(client, **fields)
    assert bad_field in field_violations(refused["error"])
    pool = client.billing.GetCreditPool(pb.GetCreditPoolRequest(org_id="acme")).pool
    assert pool.total_millicredits == 0


def test_adjustment_removes_only_free_credits(client):
    """A negative adjustment may remove only what is neither allocated nor spent."""
    client.funded_org("acme", 10_000, {"alice": 6_000})
    removed = add(client, source=t.CREDIT_SOURCE_ADJUSTMENT, amount_millicredits=-3_000, reason="correction")
    assert removed.pool.total_millicredits == 7_000
    with raises_rpc(CODE.FAILED_PRECONDITION, "INSUFFICIENT_CREDITS") as refused:
        add(client, source=t.CREDIT_SOURCE_ADJUSTMENT, amount_millicredits=-1_001)
    assert refused["info"].metadata["available_millicredits"] == "1000"


# Allocations.

def test_allocations_are_carved_from_the_pool(client, database_url):
    client.funded_org("acme", 10_000, {})
    first = client.allocate("acme", "alice", 4_000)
    assert first.allocation.limit_millicredits == 4_000 and first.pool.unallocated_millicredits == 6_000
    raised = client.allocate("acme", "alice", 9_000)
    assert raised.pool.allocated_millicredits == 9_000
    with raises_rpc(CODE.FAILED_PRECONDITION, "INSUFFICIENT_UNALLOCATED_CREDITS") as refused:
        client.allocate("acme", "bob", 1_001)
    assert refused["info"].metadata["available_millicredits"] == "1000"
    lowered = client.allocate("acme", "alice", 2_000)
    assert lowered.pool.unallocated_millicredits == 8_000
    assert [e for e, _ in history(database_url)].count("ALLOCATION_CHANGED") == 3


def test_revoke_returns_the_limit_to_the_pool(client):
    client.funded_org("acme", 10_000, {"alice": 4_000})
    revoked = client.billing.RevokeAllocation(pb.RevokeAllocationRequest(
        org_id="acme", user_id="alice", idempotency_key=new_key()))
    assert revoked.allocation.revoked and revoked.allocation.limit_millicredits == 0
    assert revoked.pool.allocated_millicredits == 0
    with raises_rpc(CODE.FAILED_PRECONDITION, "ALLOCATION_NOT_FOUND"):
        client.billing.RevokeAllocation(pb.RevokeAllocationRequest(
            org_id="acme", user_id="alice", idempotency_key=new_key()))
    renewed = client.allocate("acme", "alice", 1_000)
    assert not renewed.allocation.revoked and renewed.allocation.limit_millicredits == 1_000


@pytest.mark.parametrize("changes, bad_field", [
    ({"limit_millicredits": -1}, "limit_millicredits"),
    ({"limit_millicredits": 10**15 + 1}, "limit_millicredits"),
    ({"reset_period": 0}, "reset_period"),
    ({"reset_period": 17}, "reset_period"),
    ({"user_id": ""}, "user_id"),
    ({"user_id": "a/b"}, "user_id"),
])
def test_allocate_rejects_bad_fields(client, changes, bad_field):
    client.funded_org("acme", 10_000, {})
    request = with_fields(pb.AllocateCreditsRequest(org_id="acme", user_id="alice", limit_millicredits=1,
                                                    reset_period=t.RESET_PERIOD_NEVER, idempotency_key="k"),
                          changes)
    with raises_rpc(CODE.INVALID_ARGUMENT) as refused:
        client.billing.AllocateCredits(request)
    assert bad_field in field_violations(refused["error"])


def test_list_allocations_pages_through_every_user_once(client):
    users = {f"user-{i:03d}": 10 for i in range(25)}
    client.funded_org("acme", 10_000, users)
    client.billing.RevokeAllocation(pb.RevokeAllocationRequest(org_id="acme", user_id="user-007", idempotency_key=new_key()))
    seen, token, pages = [], "", 0
    while True:
        page = client.billing.ListAllocations(pb.ListAllocationsRequest(org_id="acme", page_size=10, page_token=token))
        seen += [a.user_id for a in page.allocations]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert seen == sorted(set(users) - {"user-007"}) and pages == 3
    everyone = client.billing.ListAllocations(pb.ListAllocationsRequest(org_id="acme", page_size=1000, include_revoked=True))
    assert len(everyone.allocations) == 25 and not everyone.next_page_token


@pytest.mark.parametrize("changes, bad_field", [
    ({"page_size": -1}, "page_size"),
    ({"page_size": 1001}, "page_size"),
    ({"page_token": "not a token"}, "page_token"),
    ({"page_token": "WyJvdGhlciIsICJ4Il0="}, "page_token"),  # another org's token
])
def test_list_allocations_rejects_bad_paging(client, changes, bad_field):
    client.funded_org("acme", 10, {})
    request = pb.ListAllocationsRequest(org_id="acme", **changes)
    with raises_rpc(CODE.INVALID_ARGUMENT) as refused:
        client.billing.ListAllocations(request)
    assert bad_field in field_violations(refused["error"])
