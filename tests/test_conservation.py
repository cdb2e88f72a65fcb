"""Conservation: after a random mix of operations (holds among them), every
pool's and allocation's totals equal the sums of their history, attribution
rows and open holds."""

import random

import grpc
import psycopg

from orgbilling.v1 import credit_service_pb2 as pb
from orgbilling.v1 import org_billing_service_pb2 as billing_pb
from orgbilling.v1 import types_pb2 as t
from orgbilling.server.verify import violations
from tests.support import new_key


def test_random_mix_keeps_every_invariant(client, database_url):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    orgs = ["o1", "o2", "o3"]
    users = ["a", "b", "c", "d"]
    for org in orgs:
        client.funded_org(org, 50_000, {})
    used_keys = []
    holds = []  # (org, reservation_id) of holds made so far, however they ended
    for _ in range(600):
        org, user = rng.choice(orgs), rng.choice(users)
        roll = rng.random()
        try:
            if roll < 0.4:
                key = rng.choice(used_keys) if used_keys and rng.random() < 0.1 else new_key()
                used_keys.append(key)
                client.credits.DeductCredits(pb.DeductCreditsRequest(
                    org_id=org, user_id=user, amount_millicredits=rng.randint(1, 3_000),
                    service_type="llm", service_name="mix", idempotency_key=key))
            elif roll < 0.55:
                # Holds: made, committed (less or more than held), released,
                # or left open to expire; some resolved twice (refused).
                if holds and rng.random() < 0.6:
                    hold_org, reservation_id = rng.choice(holds)
                    if rng.random() < 0.6:
                        client.credits.CommitReservation(pb.CommitReservationRequest(
                            org_id=hold_org, reservation_id=reservation_id,
                            amount_millicredits=rng.randint(1, 4_000), idempotency_key=new_key()))
                    else:
                        client.credits.ReleaseReservation(pb.ReleaseReservationRequest(
                            org_id=hold_org, reservation_id=reservation_id, idempotency_key=new_key()))
                else:
                    held = client.credits.ReserveCredits(pb.ReserveCreditsRequest(
                        org_id=org, user_id=user, amount_millicredits=rng.randint(1, 3_000),
                        service_type="llm", service_name="mix", idempotency_key=new_key()))
                    holds.append((org, held.reservation_id))
            elif roll < 0.75:
                client.allocate(org, user, rng.randint(0, 20_000),
                                reset_period=rng.choice([t.RESET_PERIOD_NEVER, t.RESET_PERIOD_DAILY]))
            elif roll < 0.85:
                client.billing.AddCredits(billing_pb.AddCreditsRequest(
                    org_id=org, source=rng.choice([t.CREDIT_SOURCE_GRANT, t.CREDIT_SOURCE_ADJUSTMENT]),
                    amount_millicredits=rng.randint(1, 10_000), idempotency_key=new_key()))
            elif roll < 0.9:
                client.billing.AddCredits(billing_pb.AddCreditsRequest(
                    org_id=org, source=t.CREDIT_SOURCE_ADJUSTMENT,
                    amount_millicredits=-rng.randint(1, 5_000), idempotency_key=new_key()))
            elif roll < 0.95:
                client.billing.RevokeAllocation(billing_pb.RevokeAllocationRequest(
                    org_id=org, user_id=user, idempotency_key=new_key()))
            else:
                client.billing.AddCredits(billing_pb.AddCreditsRequest(
                    org_id=org, source=t.CREDIT_SOURCE_PURCHASE, amount_paid_cents=rng.randint(1, 5),
                    currency="USD", payment_reference=new_key(), idempotency_key=new_key()))
        except grpc.RpcError as error:
            assert error.code() in (grpc.StatusCode.FAILED_PRECONDITION,), (seed, error)
        if rng.random() < 0.02:
            with psycopg.connect(database_url) as conn:
                conn.execute("UPDATE user_credit_allocations SET next_reset_at = now()"
                             " WHERE reset_period = 'DAILY'")
        if rng.random() < 0.02:
            with psycopg.connect(database_url) as conn:  # some open holds expire
                conn.execute("UPDATE credit_reservations SET expires_at = now()"
                             " WHERE state = 'OPEN' AND random() < 0.5")
    assert violations(database_url) == {}, f"seed {seed}"
    with psycopg.connect(database_url) as conn:
        deductions = conn.execute("SELECT count(*) FROM credit_usage_attribution").fetchone()[0]
    assert deductions > 50, f"seed {seed}: the mix should charge often"


def test_verify_finds_a_tampered_ledger(client, database_url):
    """The checker can fail: a pool edited behind the ledger's back is reported."""
    client.funded_org("acme", 1_000, {"alice": 100})
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE organization_credit_pools SET total_millicredits = 2000")
        conn.execute("UPDATE user_credit_allocations SET used_millicredits = 5")
    found = violations(database_url)
    assert set(found) == {
        "pool total equals the sum of its credit events",
        "allocation used equals this period's charges less this period's refunds",
    }
