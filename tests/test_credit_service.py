"""CheckCredits and DeductCredits through a real server: success paths and
every documented refusal."""

import grpc
import psycopg
import pytest

from orgbilling.v1 import credit_service_pb2 as pb
from tests.support import field_violations, new_key, raises_rpc, with_fields

CODE = grpc.StatusCode


def deduct_request(org="acme", user="alice", amount=100, key=None, **extra):
    return pb.DeductCreditsRequest(
        org_id=org, user_id=user, amount_millicredits=amount, service_type="llm",
        service_name="chat-api", idempotency_key=key or new_key(), **extra,
    )


@pytest.fixture
def acme(client):
    client.funded_org("acme", 10_000, {"alice": 1_000, "bob": 5_000})
    return client


def test_deduct_charges_allocation_and_pool_and_records_attribution(acme, database_url):
    """A deduction lowers both balances by its amount and writes one attribution row."""
    response = acme.credits.DeductCredits(
        deduct_request(amount=250, key="k-1", metadata={"model": "m1", "tokens": "42"})
    )
    assert response.allocation_remaining_millicredits == 750
    assert response.pool_spendable_millicredits == 9_750
    assert not response.replayed and response.deduction_id
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT user_id, amount_millicredits, service_type, service_name, idempotency_key,"
            " metadata FROM credit_usage_attribution WHERE deduction_id = %s",
            (response.deduction_id,),
        ).fetchone()
    assert row == ("alice", 250, "llm", "chat-api", "k-1", {"model": "m1", "tokens": "42"})


def test_check_reports_fit_without_changing_anything(acme):
    """CheckCredits says whether an amount fits, and charges nothing."""
    fits = acme.credits.CheckCredits(pb.CheckCreditsRequest(org_id="acme", user_id="alice", amount_millicredits=1_000))
    assert fits.sufficient and fits.allocation_remaining_millicredits == 1_000
    assert fits.pool_spendable_millicredits == 10_000
    too_much = acme.credits.CheckCredits(pb.CheckCreditsRequest(org_id="acme", user_id="alice", amount_millicredits=1_001))
    assert not too_much.sufficient
    again = acme.credits.CheckCredits(pb.CheckCreditsRequest(org_id="acme", user_id="alice", amount_millicredits=1))
    assert again.allocation_remaining_millicredits == 1_000


def test_overdraft_of_allocation_is_refused_with_numbers(acme):
    """More than the allocation holds is FAILED_PRECONDITION INSUFFICIENT_CREDITS
    with available and requested in the metadata, and charges nothing."""
    acme.credits.DeductCredits(deduct_request(amount=900))
    with raises_rpc(CODE.FAILED_PRECONDITION, "INSUFFICIENT_CREDITS") as refused:
        acme.credits.DeductCredits(deduct_request(amount=101))
    metadata = refused["info"].metadata
    assert metadata["available_millicredits"] == "100"
    assert metadata["requested_millicredits"] == "101"
    assert acme.credits.DeductCredits(deduct_request(amount=100)).allocation_remaining_millicredits == 0


def test_pool_balance_is_checked_as_well_as_the_allocation(acme):
    """An allocation cannot spend what the pool no longer has: limits are
    carved from the total, but what was spent stays spent when a limit is cut."""
    acme.credits.DeductCredits(deduct_request(user="bob", amount=5_000))
    acme.allocate("acme", "bob", 0)
    acme.allocate("acme", "carol", 5_000)
    acme.credits.DeductCredits(deduct_request(user="carol", amount=4_500))
    with raises_rpc(CODE.FAILED_PRECONDITION, "INSUFFICIENT_CREDITS") as refused:
        acme.credits.DeductCredits(deduct_request(user="alice", amount=600))
    assert refused["info"].metadata["pool_spendable_millicredits"] == "500"


def test_unknown_org_and_missing_allocation(acme):
    with raises_rpc(CODE.NOT_FOUND, "ORG_NOT_FOUND"):
        acme.credits.DeductCredits(deduct_request(org="nobody"))
    with raises_rpc(CODE.NOT_FOUND, "ORG_NOT_FOUND"):
        acme.credits.CheckCredits(pb.CheckCreditsRequest(org_id="nobody", user_id="alice", amount_millicredits=1))
    with raises_rpc(CODE.FAILED_PRECONDITION, "ALLOCATION_NOT_FOUND"):
        acme.credits.DeductCredits(deduct_request(user="mallory"))
    with raises_rpc(CODE.FAILED_PRECONDITION, "ALLOCATION_NOT_FOUND"):
        acme.credits.CheckCredits(pb.CheckCreditsRequest(org_id="acme", user_id="mallory", amount_millicredits=1))


@pytest.mark.parametrize(
    "changes, bad_field",
    [
        ({"amount_millicredits": 0}, "amount_millicredits"),
        ({"amount_millicredits": -1}, "amount_millicredits"),
        ({"amount_millicredits": 10**15 + 1}, "amount_millicredits"),
        ({"amount_millicredits": 2**63 - 1}, "amount_millicredits"),
        ({"amount_millicredits": -(2**63)}, "amount_millicredits"),
        ({"org_id": ""}, "org_id"),
        ({"org_id": "x" * 129}, "org_id"),
        ({"org_id": "acme corp"}, "org_id"),
        ({"org_id": "acme\x00"}, "org_id"),
        ({"user_id": ""}, "user_id"),
        ({"user_id": "é"}, "user_id"),
        ({"service_type": ""}, "service_type"),
        ({"service_type": "LLM"}, "service_type"),
        ({"service_name": ""}, "service_name"),
        ({"service_name": "n" * 129}, "service_name"),
        ({"idempotency_key": ""}, "idempotency_key"),
        ({"idempotency_key": "has space"}, "idempotency_key"),
        ({"idempotency_key": "k" * 129}, "idempotency_key"),
    ],
)
def test_deduct_rejects_bad_fields_by_name(acme, changes, bad_field):
    """Each malformed field is INVALID_ARGUMENT naming that field; nothing is charged."""
    request = with_fields(deduct_request(), changes)
    with raises_rpc(CODE.INVALID_ARGUMENT, "INVALID_ARGUMENT") as refused:
        acme.credits.DeductCredits(request)
    assert bad_field in field_violations(refused["error"])
    assert acme.credits.CheckCredits(
        pb.CheckCreditsRequest(org_id="acme", user_id="alice", amount_millicredits=1)
    ).allocation_remaining_millicredits == 1_000


def test_deduct_rejects_oversized_metadata(acme):
    with raises_rpc(CODE.INVALID_ARGUMENT) as refused:
        acme.credits.DeductCredits(deduct_request(metadata={f"k{i}": "v" for i in range(33)}))
    assert "metadata" in field_violations(refused["error"])
    with raises_rpc(CODE.INVALID_ARGUMENT):
        acme.credits.DeductCredits(deduct_request(metadata={"k": "v" * 1025}))
    with raises_rpc(CODE.INVALID_ARGUMENT):
        acme.credits.DeductCredits(deduct_request(metadata={"": "v"}))


def test_every_bad_field_is_reported_at_once(acme):
    request = pb.DeductCreditsRequest()
    with raises_rpc(CODE.INVALID_ARGUMENT) as refused:
        acme.credits.DeductCredits(request)
    assert field_violations(refused["error"]) >= {
        "org_id", "user_id", "amount_millicredits", "service_type", "service_name", "idempotency_key",
    }


def test_lowered_limit_below_used_leaves_zero_remaining(acme):
    """An allocation lowered below what is used has 0 remaining and refuses charges."""
    acme.credits.DeductCredits(deduct_request(amount=600))
    allocation = acme.allocate("acme", "alice", 500).allocation
    assert allocation.used_millicredits == 600 and allocation.remaining_millicredits == 0
    with raises_rpc(CODE.FAILED_PRECONDITION, "INSUFFICIENT_CREDITS"):
        acme.credits.DeductCredits(deduct_request(amount=1))


def test_revoked_allocation_cannot_spend(acme):
    from orgbilling.v1 import org_billing_service_pb2 as billing_pb

    acme.billing.RevokeAllocation(
        billing_pb.RevokeAllocationRequest(org_id="acme", user_id="alice", idempotency_key=new_key())
    )
    with raises_rpc(CODE.FAILED_PRECONDITION, "ALLOCATION_NOT_FOUND"):
        acme.credits.DeductCredits(deduct_request(amount=1))


def test_period_reset_restores_the_allocation(acme, database_url):
    """When an allocation's reset time has passed, its used amount starts again
    from zero at the next charge, and the reset is recorded in history."""
    from orgbilling.v1 import types_pb2

    acme.allocate("acme", "dave", 1_000, reset_period=types_pb2.RESET_PERIOD_DAILY)
    acme.credits.DeductCredits(deduct_request(user="dave", amount=1_000))
    with raises_rpc(CODE.FAILED_PRECONDITION, "INSUFFICIENT_CREDITS"):
        acme.credits.DeductCredits(deduct_request(user="dave", amount=1))
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE user_credit_allocations SET next_reset_at = now() - interval '1 second'"
                     " WHERE user_id = 'dave'")
    check = acme.credits.CheckCredits(pb.CheckCreditsRequest(org_id="acme", user_id="dave", amount_millicredits=1_000))
    assert check.sufficient
    response = acme.credits.DeductCredits(deduct_request(user="dave", amount=400))
    assert response.allocation_remaining_millicredits == 600
    with psycopg.connect(database_url) as conn:
        resets = conn.execute("SELECT count(*) FROM org_billing_history WHERE event_type = 'PERIOD_RESET'").fetchone()[0]
        next_reset = conn.execute("SELECT next_reset_at > now() FROM user_credit_allocations WHERE user_id = 'dave'").fetchone()[0]
    assert resets == 1 and next_reset
    # The pool's used is lifetime: it does not reset.
    from orgbilling.v1 import org_billing_service_pb2 as billing_pb

    pool = acme.billing.GetCreditPool(billing_pb.GetCreditPoolRequest(org_id="acme")).pool
    assert pool.used_millicredits == 1_400
