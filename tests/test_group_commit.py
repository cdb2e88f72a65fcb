"""Group commit and DeductCreditsBatch: many deductions in one transaction,
with the semantics of running them one at a time in arrival order."""

import asyncio
import concurrent.futures
import contextvars
import threading
import time

import grpc
import psycopg
import pytest

from orgbilling.v1 import credit_service_pb2 as pb
from orgbilling.server.errors import ServiceError
from orgbilling.server.group_commit import GroupCommitter
from orgbilling.server.request_context import call_deadline_var
from orgbilling.server.store import Deduction, DeductionResult
from orgbilling.server.verify import violations
from tests.support import field_violations, new_key, raises_rpc


def item(amount, user="alice", org="acme", key=None, **extra):
    return pb.DeductCreditsRequest(org_id=org, user_id=user, amount_millicredits=amount, service_type="llm",
                                   service_name="batch", idempotency_key=key or new_key(), **extra)


def batch(client, items, all_or_nothing=False):
    return client.credits.DeductCreditsBatch(
        pb.DeductCreditsBatchRequest(deductions=items, all_or_nothing=all_or_nothing)).results


# Through the real server and database.

def test_batch_runs_items_in_order_and_a_refusal_fails_alone(client, database_url):
    """Each item is checked against what the ones before it left; one that
    does not fit is refused alone, and later ones that fit still charge."""
    client.funded_org("acme", 10_000, {"alice": 1_000})
    results = batch(client, [item(600), item(500), item(400), item(1)])
    assert [r.WhichOneof("result") for r in results] == ["deduction", "error", "deduction", "error"]
    assert results[0].deduction.allocation_remaining_millicredits == 400
    assert results[1].error.reason == "INSUFFICIENT_CREDITS"
    assert results[1].error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert results[1].error.metadata["available_millicredits"] == "400"
    assert results[2].deduction.allocation_remaining_millicredits == 0
    assert violations(database_url) == {}


def test_batch_replays_and_refuses_reused_keys_per_item(client, database_url):
    client.funded_org("acme", 10_000, {"alice": 1_000, "bob": 1_000})
    first = batch(client, [item(100, key="a")])[0].deduction
    results = batch(client, [item(100, key="a"), item(50, key="b"), item(51, key="b"), item(50, key="b"),
                             item(10, user="nobody"), item(10, org="ghost")])
    assert results[0].deduction.replayed and results[0].deduction.deduction_id == first.deduction_id
    assert not results[1].deduction.replayed
    assert results[2].error.reason == "IDEMPOTENCY_KEY_REUSED"
    assert results[3].deduction.replayed
    assert results[4].error.reason == "ALLOCATION_NOT_FOUND"
    assert results[5].error.reason == "ORG_NOT_FOUND"
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*), sum(amount_millicredits) FROM credit_usage_attribution").fetchone() == (2, 150)


def test_all_or_nothing_charges_all_or_none(client, database_url):
    client.funded_org("acme", 10_000, {"alice": 1_000})
    with raises_rpc(grpc.StatusCode.FAILED_PRECONDITION, "BATCH_NOT_APPLIED") as refused:
        batch(client, [item(300), item(800), item(100)], all_or_nothing=True)
    assert refused["info"].metadata["refused_items"] == "1"
    assert refused["info"].metadata["first_refused_reason"] == "INSUFFICIENT_CREDITS"
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM credit_usage_attribution").fetchone()[0] == 0
    results = batch(client, [item(300), item(700)], all_or_nothing=True)
    assert results[1].deduction.allocation_remaining_millicredits == 0
    assert violations(database_url) == {}


def test_a_refused_all_or_nothing_batch_stays_refused_when_sent_again_after_credits_are_freed(
        client, database_url):
    """Its refusals are kept under their keys, as a call alone keeps its own:
    the same batch again (a retry, or a first attempt arriving late) is
    refused again, never charged because credits were freed meanwhile. The
    items that fitted were not applied, and keep nothing under their keys."""
    client.funded_org("acme", 10_000, {"alice": 1_000})
    items = [item(300, key="fits"), item(800, key="too-much"), item(300, key="fits")]
    with raises_rpc(grpc.StatusCode.FAILED_PRECONDITION, "BATCH_NOT_APPLIED") as refused:
        batch(client, items, all_or_nothing=True)
    assert refused["info"].metadata["refused_items"] == "1"
    client.allocate("acme", "alice", 5_000)
    with raises_rpc(grpc.StatusCode.FAILED_PRECONDITION, "BATCH_NOT_APPLIED") as again:
        batch(client, items, all_or_nothing=True)
    assert again["info"].metadata["refused_items"] == "1"
    assert again["info"].metadata["first_refused_reason"] == "INSUFFICIENT_CREDITS"
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM credit_usage_attribution").fetchone()[0] == 0
        kept = conn.execute("SELECT idempotency_key, result ->> 'outcome', result ->> 'allocation_remaining'"
                            " FROM idempotency_records WHERE family = 'deductions'").fetchall()
    assert kept == [("too-much", "INSUFFICIENT_CREDITS", "700")]
    # The refused item alone replays its refusal; the one that fitted, never
    # charged, charges now.
    alone = batch(client, [item(800, key="too-much"), item(300, key="fits")])
    assert alone[0].error.reason == "INSUFFICIENT_CREDITS"
    assert not alone[1].deduction.replayed and alone[1].deduction.allocation_remaining_millicredits == 4_700
    assert violations(database_url) == {}


def test_an_all_or_nothing_batch_refused_leaves_earlier_charges_it_replays_as_they_are(
        client, database_url):
    """A key charged before, replayed inside a refused all-or-nothing batch,
    stays charged (once), and the batch charges nothing new."""
    client.funded_org("acme", 10_000, {"alice": 1_000})
    first = batch(client, [item(100, key="earlier")])[0].deduction
    with raises_rpc(grpc.StatusCode.FAILED_PRECONDITION, "BATCH_NOT_APPLIED"):
        batch(client, [item(100, key="earlier"), item(200), item(5_000)], all_or_nothing=True)
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT idempotency_key, deduction_id::text FROM credit_usage_attribution"
                            ).fetchall() == [("earlier", first.deduction_id)]
    assert violations(database_url) == {}


def test_an_all_or_nothing_batch_refused_answers_each_item_as_it_stands(client, database_url):
    """deduct_credits_batch's own answers: a charge made before the batch,
    replayed, stays OK (replayed); what the batch would have charged, and
    its replays later in the batch, are NOT_APPLIED; the refusal is the
    refusal."""
    client.funded_org("acme", 10_000, {"alice": 1_000})

    def run(conn, keys_and_amounts, all_or_nothing):
        keys, amounts = zip(*keys_and_amounts)
        n = len(keys)
        return conn.execute(
            "SELECT item, outcome, deduction_id::text, replayed FROM deduct_credits_batch("
            "%s::text[], %s::text[], %s::bigint[], %s::text[], %s::text[], %s::text[], %s::bytea[],"
            " %s::text[], %s::jsonb[], %s) ORDER BY item",
            (["acme"] * n, ["alice"] * n, list(amounts), ["llm"] * n, ["batch"] * n, list(keys),
             [key.encode() for key in keys], [""] * n, ["{}"] * n, all_or_nothing)).fetchall()

    with psycopg.connect(database_url, autocommit=True) as conn:
        ((_, _, earlier_id, _),) = run(conn, [("earlier", 100)], False)
        rows = run(conn, [("fits", 300), ("earlier", 100), ("too-much", 800), ("fits", 300)], True)
        assert rows == [(1, "NOT_APPLIED", None, False), (2, "OK", earlier_id, True),
                        (3, "INSUFFICIENT_CREDITS", None, False), (4, "NOT_APPLIED", None, False)]
        assert conn.execute("SELECT count(*) FROM credit_usage_attribution").fetchone()[0] == 1
    assert violations(database_url) == {}


def test_batch_rejects_malformed_items_by_position(client, server):
    client.funded_org("acme", 10_000, {"alice": 1_000})
    with raises_rpc(grpc.StatusCode.INVALID_ARGUMENT) as refused:
        batch(client, [])
    assert "deductions" in field_violations(refused["error"])
    with raises_rpc(grpc.StatusCode.INVALID_ARGUMENT) as refused:
        batch(client, [item(1), item(0), item(1, user="")])
    assert {"deductions[1].amount_millicredits", "deductions[2].user_id"} <= field_violations(refused["error"])
    too_many = server.settings.deduct_batch_items_max + 1
    with raises_rpc(grpc.StatusCode.INVALID_ARGUMENT) as refused:
        batch(client, [item(1) for _ in range(too_many)])
    assert "deductions" in field_violations(refused["error"])


def test_concurrent_batches_over_many_orgs_do_not_deadlock(client, database_url):
    """Batches naming the same orgs in opposite orders, at once: pools are
    locked in org order, so every batch completes."""
    orgs = [f"org-{i}" for i in range(6)]
    for org in orgs:
        client.funded_org(org, 100_000, {"u": 100_000})

    def send(order):
        for _ in range(15):
            batch(client, [item(1, org=o, user="u") for o in order for _ in range(3)])

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(send, orgs if n % 2 else orgs[::-1]) for n in range(8)]
        for future in futures:
            future.result(timeout=120)
    assert violations(database_url) == {}
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM credit_usage_attribution").fetchone()[0] == 8 * 15 * 18


def test_hot_deductions_through_group_commit_spend_exactly_the_balance(client, database_url):
    """64 threads on one allocation through DeductCredits (group commit on):
    exactly the affordable number succeed and the ledger balances."""
    client.funded_org("acme", 1_000_000, {"alice": 5_000})
    barrier = threading.Barrier(64)

    def spend():
        barrier.wait()
        ok = 0
        for _ in range(40):  # 2,560 attempts for 1,666 affordable charges
            try:
                client.credits.DeductCredits(item(3))
                ok += 1
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
        return ok

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        total_ok = sum(f.result() for f in [pool.submit(spend) for _ in range(64)])
    assert total_ok == 5_000 // 3
    assert violations(database_url) == {}


def test_connections_ended_under_the_server_are_replaced_and_no_call_fails(client, server, database_url):
    """Every server connection ended between calls (a PostgreSQL restart or
    a proxy does this): the next deduction, hold and check each succeed, on
    a fresh connection of their pool (the lanes' pool and the calls' each
    retry a connection found dead on use once)."""
    client.funded_org("acme", 10_000, {"alice": 1_000})
    client.credits.DeductCredits(item(1))
    check = pb.CheckCreditsRequest(org_id="acme", user_id="alice", amount_millicredits=1)
    client.credits.CheckCredits(check)
    with psycopg.connect(database_url, autocommit=True) as conn:
        ended = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = 'orgbilling'"
            " AND pid <> pg_backend_pid()").fetchone()[0]
    assert ended >= server.settings.lane_pool_size + 1  # the lanes' and at least one of the calls'
    assert client.credits.DeductCredits(item(10)).allocation_remaining_millicredits == 989
    hold = client.credits.ReserveCredits(pb.ReserveCreditsRequest(
        org_id="acme", user_id="alice", amount_millicredits=100, service_type="llm",
        service_name="batch", idempotency_key=new_key()))
    assert hold.allocation_remaining_millicredits == 889
    assert client.credits.CheckCredits(check).allocation_remaining_millicredits == 889
    assert violations(database_url) == {}


# The committer alone, with a recording commit function instead of the database.

def deduction(n, org="o"):
    return Deduction(org_id=org, user_id="u", amount_millicredits=n, service_type="t",
                     service_name="s", idempotency_key=f"k{n}", request_hash=b"", request_id="",
                     metadata={})


def ok(d):
    return DeductionResult(outcome="OK", deduction_id=f"id-{d.amount_millicredits}",
                           allocation_remaining_millicredits=0, pool_spendable_millicredits=0,
                           replayed=False)


class Recorder:
    """A commit function: records each batch's amounts, takes delay_s, and
    fails a batch that holds fail_amount."""

    def __init__(self, delay_s=0.0, fail_amount=None):
        self.batches, self.delay_s, self.fail_amount = [], delay_s, fail_amount

    async def __call__(self, items):
        self.batches.append([d.amount_millicredits for d in items])
        await asyncio.sleep(self.delay_s)
        if self.fail_amount is not None and any(d.amount_millicredits == self.fail_amount for d in items):
            raise ValueError("a bad item")
        return [ok(d) for d in items]


def committed(committer, amounts):
    """Submits a deduction of each amount at once, as callers on the event
    loop do; each one's deduction_id, or the exception it got."""
    async def submit_all():
        return await asyncio.gather(*(committer.submit(deduction(n)) for n in amounts),
                                    return_exceptions=True)

    return [r if isinstance(r, BaseException) else r.deduction_id for r in asyncio.run(submit_all())]


def test_a_lone_call_commits_at_once_in_a_batch_of_one():
    recorder = Recorder()
    committer = GroupCommitter(recorder, lanes=2, batch_size_max=10, queue_length_max=10)
    assert committed(committer, [1]) == ["id-1"]
    assert committed(committer, [2]) == ["id-2"]
    assert recorder.batches == [[1], [2]]


def test_waiting_calls_share_a_transaction_in_arrival_order():
    recorder = Recorder(delay_s=0.05)
    committer = GroupCommitter(recorder, lanes=1, batch_size_max=100, queue_length_max=100)

    async def arriving():
        # 40 callers arriving 2 ms apart, while batches take 50 ms.
        calls = []
        for n in range(1, 41):
            calls.append(asyncio.create_task(committer.submit(deduction(n))))
            await asyncio.sleep(0.002)
        return [(await call).deduction_id for call in calls]

    assert asyncio.run(arriving()) == [f"id-{n}" for n in range(1, 41)]
    assert [a for b in recorder.batches for a in b] == list(range(1, 41))  # in arrival order
    assert len(recorder.batches) < 40  # batches formed
    assert max(len(b) for b in recorder.batches) > 1


def test_batch_size_is_bounded():
    recorder = Recorder(delay_s=0.02)
    committer = GroupCommitter(recorder, lanes=1, batch_size_max=3, queue_length_max=100)
    assert committed(committer, range(1, 33)) == [f"id-{n}" for n in range(1, 33)]
    assert max(len(b) for b in recorder.batches) == 3


def test_one_failing_item_does_not_fail_the_others():
    recorder = Recorder(delay_s=0.02, fail_amount=7)
    committer = GroupCommitter(recorder, lanes=1, batch_size_max=100, queue_length_max=100)
    results = committed(committer, range(1, 17))
    assert isinstance(results[6], ValueError)
    assert [r for i, r in enumerate(results) if i != 6] == [f"id-{n}" for n in range(1, 17) if n != 7]


def test_a_batch_that_fails_outside_its_items_fails_its_callers_and_the_lane_goes_on():
    """Whatever goes wrong around a batch (here its metrics hook), its
    callers hear of it rather than wait for ever, and the next batch runs."""
    recorder = Recorder()
    failing = [True]

    def on_batch(size):
        if failing[0]:
            raise RuntimeError("the hook failed")

    committer = GroupCommitter(recorder, lanes=1, batch_size_max=100, queue_length_max=100,
                               on_batch=on_batch)

    async def two_rounds():
        first = await asyncio.wait_for(asyncio.gather(
            committer.submit(deduction(1)), committer.submit(deduction(2)), return_exceptions=True), 5)
        failing[0] = False
        second = await asyncio.wait_for(committer.submit(deduction(3)), 5)
        return first, second

    first, second = asyncio.run(two_rounds())
    assert [type(r) for r in first] == [RuntimeError, RuntimeError]
    assert second.deduction_id == "id-3"
    assert recorder.batches == [[3]]  # the failed batch never reached the database


def test_each_batch_runs_in_its_first_callers_context_under_no_deadline():
    """A batch's statements are its first call's children (their spans, its
    request ID), though the lane's committer was started by another call;
    and a batch serves every caller in it, so no caller's deadline bounds it."""
    caller = contextvars.ContextVar("caller")
    seen = []

    async def commit(items):
        seen.append((caller.get(None), call_deadline_var.get()))
        await asyncio.sleep(0.05)
        return [ok(d) for d in items]

    committer = GroupCommitter(commit, lanes=1, batch_size_max=100, queue_length_max=100)

    async def as_caller(name, amount):
        caller.set(name)
        call_deadline_var.set(time.monotonic() + 10)
        return (await committer.submit(deduction(amount))).deduction_id

    async def arriving():
        first = asyncio.create_task(as_caller("first", 1))
        await asyncio.sleep(0.01)  # its batch is committing: these two wait for the next
        later = [asyncio.create_task(as_caller(name, n)) for name, n in (("second", 2), ("third", 3))]
        return [await first] + [await call for call in later]

    assert asyncio.run(arriving()) == ["id-1", "id-2", "id-3"]
    assert seen == [("first", None), ("second", None)]


def test_a_full_queue_refuses_with_resource_exhausted():
    release = asyncio.Event()

    async def commit(items):
        await release.wait()
        return [ok(d) for d in items]

    committer = GroupCommitter(commit, lanes=1, batch_size_max=100, queue_length_max=2)

    async def overfill():
        running = [asyncio.create_task(committer.submit(deduction(1)))]
        await asyncio.sleep(0.1)  # committing
        running += [asyncio.create_task(committer.submit(deduction(n))) for n in (2, 3)]
        await asyncio.sleep(0.1)  # two waiting: the queue is full
        try:
            with pytest.raises(ServiceError) as refused:
                await committer.submit(deduction(4))
        finally:
            release.set()
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        return [(await call).deduction_id for call in running]

    assert asyncio.run(overfill()) == ["id-1", "id-2", "id-3"]


def test_a_waiter_whose_deadline_passes_is_withdrawn_unapplied():
    release = asyncio.Event()
    recorder_batches = []

    async def commit(items):
        recorder_batches.append([d.amount_millicredits for d in items])
        await asyncio.wait_for(release.wait(), 5)
        return [ok(d) for d in items]

    committer = GroupCommitter(commit, lanes=1, batch_size_max=100, queue_length_max=100)

    async def one_waits_too_long():
        committing = asyncio.create_task(committer.submit(deduction(1)))
        await asyncio.sleep(0.1)

        async def with_deadline():
            call_deadline_var.set(time.monotonic() + 0.2)
            return await committer.submit(deduction(2))

        with pytest.raises(ServiceError) as expired:
            await asyncio.create_task(with_deadline())  # a task of its own: its own deadline
        assert expired.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        release.set()
        assert (await committing).deduction_id == "id-1"
        return (await committer.submit(deduction(3))).deduction_id

    assert asyncio.run(one_waits_too_long()) == "id-3"  # the lane is not stuck
    assert recorder_batches == [[1], [3]]  # the withdrawn deduction was never committed


def test_a_cancelled_waiter_is_withdrawn_unapplied():
    """A call cancelled (by its caller, or by gRPC at its deadline) while its
    item waits takes the item out of the lane."""
    release = asyncio.Event()
    recorder = Recorder()

    async def commit(items):
        await asyncio.wait_for(release.wait(), 5)
        return await recorder(items)

    committer = GroupCommitter(commit, lanes=1, batch_size_max=100, queue_length_max=100)

    async def cancel_one():
        committing = asyncio.create_task(committer.submit(deduction(1)))
        await asyncio.sleep(0.1)
        waiting = asyncio.create_task(committer.submit(deduction(2)))
        kept = asyncio.create_task(committer.submit(deduction(3)))
        await asyncio.sleep(0.05)
        waiting.cancel()
        release.set()
        return [(await committing).deduction_id, (await kept).deduction_id, waiting.cancelled()]

    assert asyncio.run(cancel_one()) == ["id-1", "id-3", True]
    assert recorder.batches == [[1], [3]]


def test_a_key_refused_earlier_in_a_batch_replays_its_refusal(client, database_url):
    client.funded_org("acme", 10_000, {"alice": 100})
    results = batch(client, [item(500, key="x"), item(50, key="y"), item(500, key="x"), item(60, key="z")])
    assert results[0].error.reason == "INSUFFICIENT_CREDITS"
    assert results[2].error.reason == "INSUFFICIENT_CREDITS"
    assert results[2].error.metadata == results[0].error.metadata
    assert results[1].deduction.allocation_remaining_millicredits == 50
    assert results[3].error.reason == "INSUFFICIENT_CREDITS"
    # Stored: the same refusal comes back in a later batch, even with room now.
    client.allocate("acme", "alice", 5_000)
    assert batch(client, [item(500, key="x")])[0].error.reason == "INSUFFICIENT_CREDITS"
    assert violations(database_url) == {}
