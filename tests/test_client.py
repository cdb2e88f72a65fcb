"""orgbilling.client against the real server and database: typed results
and errors, replays, batches, holds as context managers, the RPCs beyond
charging, an answer lost on the way back, and the async client under 200
concurrent calls."""

import asyncio
import threading
import time

import pytest

from orgbilling.client import (
    AllocationNotFound,
    AsyncCreditClient,
    BatchNotApplied,
    CreditClient,
    Deduction,
    FailedPrecondition,
    InsufficientCredits,
    InvalidArgument,
    KeyReused,
    OrgNotFound,
    PermissionDenied,
    ReservationNotOpen,
    RetryPolicy,
    Unauthenticated,
    deduction_request,
)
from tests.bank.proxy import TcpProxy
from tests.support import api_key, fund_org

CHARGE = dict(service_type="llm", service_name="chat-api")


@pytest.fixture
def target(server):
    return f"127.0.0.1:{server.port}"


@pytest.fixture
def billing(target, token):
    with CreditClient(target, token=token, insecure=True) as client:
        yield client


def pool_of(client: CreditClient, org_id: str):
    return client.get_credit_pool(org_id=org_id).response.pool


def test_a_deduction_is_charged_once_and_its_replay_says_so(billing):
    fund_org(billing, "acme", 10_000, {"alice": 5_000})
    first = billing.deduct_credits(org_id="acme", user_id="alice", amount_millicredits=1_500, **CHARGE)
    again = billing.deduct_credits(org_id="acme", user_id="alice", amount_millicredits=1_500,
                                   idempotency_key=first.idempotency_key, **CHARGE)
    assert isinstance(first, Deduction) and not first.replayed and first.request_id
    assert again.replayed and again.deduction_id == first.deduction_id
    assert first.allocation_remaining_millicredits == 3_500
    assert pool_of(billing, "acme").used_millicredits == 1_500
    check = billing.check_credits(org_id="acme", user_id="alice", amount_millicredits=3_500)
    assert check.sufficient and check.allocation_remaining_millicredits == 3_500
    assert not billing.check_credits(org_id="acme", user_id="alice", amount_millicredits=3_501).sufficient


def test_refusals_are_typed_with_their_numbers_and_request_id(billing, database_url, target):
    fund_org(billing, "acme", 10_000, {"alice": 1_000})
    with pytest.raises(InsufficientCredits) as refused:
        billing.deduct_credits(org_id="acme", user_id="alice", amount_millicredits=1_001, **CHARGE)
    error = refused.value
    assert (error.available_millicredits, error.requested_millicredits) == (1_000, 1_001)
    assert error.request_id and error.attempts == 1 and error.idempotency_key

    with pytest.raises(AllocationNotFound):
        billing.deduct_credits(org_id="acme", user_id="bob", amount_millicredits=1, **CHARGE)
    with pytest.raises(OrgNotFound):
        billing.get_credit_pool(org_id="nobody")

    billing.deduct_credits(org_id="acme", user_id="alice", amount_millicredits=10,
                           idempotency_key="k-1", **CHARGE)
    with pytest.raises(KeyReused) as reused:
        billing.deduct_credits(org_id="acme", user_id="alice", amount_millicredits=11,
                               idempotency_key="k-1", **CHARGE)
    assert reused.value.idempotency_key == "k-1"

    with pytest.raises(InvalidArgument) as invalid:
        billing.deduct_credits(org_id="acme", user_id="alice", amount_millicredits=0, **CHARGE)
    assert "amount_millicredits" in dict(invalid.value.field_violations)

    reader = api_key(database_url, ["credits.read"])
    with CreditClient(target, token=reader, insecure=True) as read_only:
        assert read_only.check_credits(org_id="acme", user_id="alice", amount_millicredits=1).sufficient
        with pytest.raises(PermissionDenied) as denied:
            read_only.deduct_credits(org_id="acme", user_id="alice", amount_millicredits=1, **CHARGE)
    assert denied.value.reason == "MISSING_SCOPE"
    with CreditClient(target, token="obk_not-a-key", insecure=True) as stranger:
        with pytest.raises(Unauthenticated):
            stranger.check_credits(org_id="acme", user_id="alice", amount_millicredits=1)
    assert pool_of(billing, "acme").used_millicredits == 10


def test_a_batch_gives_each_item_its_result_or_typed_error(billing):
    fund_org(billing, "acme", 10_000, {"alice": 1_000})
    items = [deduction_request(org_id="acme", user_id="alice", amount_millicredits=100, **CHARGE),
             dict(org_id="acme", user_id="bob", amount_millicredits=100, **CHARGE)]
    batch = billing.deduct_credits_batch(items)
    assert isinstance(batch.items[0], Deduction) and isinstance(batch.items[1], AllocationNotFound)
    assert batch.items[0].idempotency_key == items[0].idempotency_key
    assert batch.items[1].idempotency_key and list(batch.errors) == [1]

    with pytest.raises(BatchNotApplied) as refused:
        billing.deduct_credits_batch(
            [dict(org_id="acme", user_id="alice", amount_millicredits=100, **CHARGE),
             dict(org_id="acme", user_id="alice", amount_millicredits=5_000, **CHARGE)],
            all_or_nothing=True)
    assert refused.value.refused_items == [1]
    replay = billing.deduct_credits_batch(items)
    assert replay.items[0].replayed
    assert pool_of(billing, "acme").used_millicredits == 100


def test_a_hold_commits_what_was_used_and_releases_the_rest(billing):
    fund_org(billing, "acme", 10_000, {"alice": 5_000})
    with billing.reserve(org_id="acme", user_id="alice", amount_millicredits=2_000, **CHARGE) as hold:
        assert pool_of(billing, "acme").reserved_millicredits == 2_000
        charged = hold.commit(1_200)
        with pytest.raises(RuntimeError, match="COMMITTED"):
            hold.commit(1_200)
    assert hold.state == "COMMITTED" and hold.deduction == charged and not charged.replayed
    pool = pool_of(billing, "acme")
    assert (pool.used_millicredits, pool.reserved_millicredits) == (1_200, 0)
    with pytest.raises(ReservationNotOpen) as resolved:
        billing.release_reservation(org_id="acme", reservation_id=hold.reservation_id)
    assert resolved.value.state == "COMMITTED"


def test_a_hold_is_released_on_an_exception_and_when_left_uncommitted(billing):
    fund_org(billing, "acme", 10_000, {"alice": 5_000})
    with pytest.raises(ZeroDivisionError):
        with billing.reserve(org_id="acme", user_id="alice", amount_millicredits=2_000,
                             **CHARGE) as failed:
            raise ZeroDivisionError("the work failed")
    with billing.reserve(org_id="acme", user_id="alice", amount_millicredits=2_000,
                         **CHARGE) as unused:
        pass
    assert failed.state == unused.state == "RELEASED"
    pool = pool_of(billing, "acme")
    assert (pool.used_millicredits, pool.reserved_millicredits) == (0, 0)
    with pytest.raises(InsufficientCredits):
        with billing.reserve(org_id="acme", user_id="alice", amount_millicredits=5_001, **CHARGE):
            raise AssertionError("a refused hold never enters its block")


def test_refunds_and_the_administrative_and_report_rpcs(billing):
    """The RPCs beyond charging take their request's fields as keywords and
    answer a Result with the response, the replay flag and the key."""
    created = billing.create_subscription(org_id="acme", plan="PLAN_HYBRID",
                                          billing_cycle="BILLING_CYCLE_MONTHLY")
    replay = billing.create_subscription(org_id="acme", plan="PLAN_HYBRID",
                                         billing_cycle="BILLING_CYCLE_MONTHLY",
                                         idempotency_key=created.idempotency_key)
    assert not created.replayed and replay.replayed and created.request_id
    billing.add_credits(org_id="acme", source="CREDIT_SOURCE_GRANT", amount_millicredits=10_000)
    billing.allocate_credits(org_id="acme", user_id="alice", limit_millicredits=5_000,
                             reset_period="RESET_PERIOD_NEVER")
    charged = billing.deduct_credits(org_id="acme", user_id="alice", amount_millicredits=800, **CHARGE)
    refund = billing.refund_credits(org_id="acme", deduction_id=charged.deduction_id,
                                    amount_millicredits=300, reason="partial outage")
    assert refund.allocation_remaining_millicredits == 5_000 - 500
    with pytest.raises(FailedPrecondition) as too_much:
        billing.refund_credits(org_id="acme", deduction_id=charged.deduction_id,
                               amount_millicredits=501, reason="too much")
    assert too_much.value.reason == "REFUND_EXCEEDS_DEDUCTION"

    usage = billing.list_usage(org_id="acme").response
    assert sorted(record.amount_millicredits for record in usage.records) == [-300, 800]
    exported = list(billing.export_usage(org_id="acme", chunk_size=1))
    assert len(exported) == 2
    summary = billing.get_usage_summary(org_id="acme").response
    assert summary.totals.used_millicredits == 500
    with pytest.raises(ValueError, match="no_such_field"):
        billing.get_usage_summary(org_id="acme", no_such_field=1)


def test_reports_read_in_one_snapshot_answer_a_deadline_shorter_than_the_statement_timeout(
        billing, server):
    """A deadline under statement_timeout_ms bounds a call's statements in a
    transaction of its own (Store._connection): the reports that read one
    snapshot set their isolation level in it and answer. They failed
    INTERNAL, and the client always sends a deadline (5 s by default, the
    server's statement timeout too)."""
    fund_org(billing, "acme", 10_000, {"alice": 5_000})
    billing.deduct_credits(org_id="acme", user_id="alice", amount_millicredits=800, **CHARGE)
    short_s = server.settings.statement_timeout_ms / 1000 / 5
    summary = billing.get_usage_summary(org_id="acme", timeout_s=short_s).response
    assert summary.totals.used_millicredits == 800
    system = billing.get_system_billing(timeout_s=short_s).response
    assert system.organization_count >= 1
    assert [org.org_id for org in system.top_orgs] == ["acme"]


def test_an_answer_lost_on_the_way_back_is_retried_as_a_replay(server, token, billing):
    """The deduction lands, its answer never arrives, the connection is cut:
    the client sends it again with the same key and gets the original
    result, flagged as a replay; the pool is charged once."""
    fund_org(billing, "acme", 10_000, {"alice": 5_000})
    proxy = TcpProxy(("127.0.0.1", server.port))
    outcome = {}
    try:
        with CreditClient(f"127.0.0.1:{proxy.port}", token=token, insecure=True) as client:
            client.check_credits(org_id="acme", user_id="alice", amount_millicredits=1)  # connected
            proxy.lose_answers()
            caller = threading.Thread(target=lambda: outcome.setdefault(
                "result", client.deduct_credits(org_id="acme", user_id="alice",
                                                amount_millicredits=700, **CHARGE)))
            caller.start()
            deadline = time.monotonic() + 10
            while pool_of(billing, "acme").used_millicredits == 0:
                assert time.monotonic() < deadline, "the deduction never landed"
                time.sleep(0.02)
            proxy.deliver_answers()
            assert proxy.drop() >= 1
            caller.join(timeout=30)
    finally:
        proxy.close()
    assert outcome["result"].replayed
    assert pool_of(billing, "acme").used_millicredits == 700
    assert len(billing.list_usage(org_id="acme").response.records) == 1


def test_the_async_client_under_200_concurrent_calls(target, token, billing):
    """200 deductions at once from one event loop, each with its own key:
    all charged, once each; then holds, committed and released under an
    exception, the async way."""
    users = {f"user-{i}": 10_000 for i in range(20)}
    fund_org(billing, "acme", 1_000_000, users)

    async def main():
        async with AsyncCreditClient(target, token=token, insecure=True,
                                     retry=RetryPolicy(budget_s=60)) as client:
            results = await asyncio.gather(*(
                client.deduct_credits(org_id="acme", user_id=f"user-{i % 20}",
                                      amount_millicredits=10 + i, **CHARGE)
                for i in range(200)))
            checks = await asyncio.gather(*(
                client.check_credits(org_id="acme", user_id="user-0", amount_millicredits=1)
                for _ in range(50)))
            async with client.reserve(org_id="acme", user_id="user-0", amount_millicredits=500,
                                      **CHARGE) as hold:
                await hold.commit(400)
            with pytest.raises(KeyError):
                async with client.reserve(org_id="acme", user_id="user-0",
                                          amount_millicredits=500, **CHARGE) as failed:
                    raise KeyError("boom")
            with pytest.raises(InsufficientCredits) as refused:
                await client.deduct_credits(org_id="acme", user_id="user-1",
                                            amount_millicredits=10_000, **CHARGE)
            return results, checks, hold, failed, refused.value

    results, checks, hold, failed, refused = asyncio.run(main())
    assert len({result.deduction_id for result in results}) == 200
    assert not any(result.replayed for result in results)
    assert all(check.sufficient for check in checks)
    assert (hold.state, failed.state) == ("COMMITTED", "RELEASED")
    assert refused.request_id and refused.requested_millicredits == 10_000
    pool = pool_of(billing, "acme")
    assert pool.used_millicredits == sum(10 + i for i in range(200)) + 400
    assert pool.reserved_millicredits == 0
