"""No caller can starve the others: a token bucket per authenticated caller
(never per address: these callers share 127.0.0.1), separate read and write
budgets, RESOURCE_EXHAUSTED with RetryInfo past them, and a concurrency cap
that refuses rather than queues without bound."""

import asyncio
import concurrent.futures
import threading
import time

import grpc
import pytest

from orgbilling.v1 import credit_service_pb2 as pb
from orgbilling.v1 import org_billing_service_pb2 as billing_pb
from orgbilling.server.interceptors.ratelimit import TokenBuckets
from tests.support import Client, admin_token, api_key, error_info, new_key, retry_delay_s


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_token_bucket_allows_the_burst_then_the_rate_per_key():
    clock = FakeClock()
    buckets = TokenBuckets(rate_per_s=2, burst=3, keys_max=100, clock=clock)
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(0.5)
    assert buckets.take("b") == 0.0  # another caller has its own bucket
    clock.now += 0.5
    assert buckets.take("a") == 0.0
    assert buckets.take("a") == pytest.approx(0.5)
    clock.now += 60
    assert [buckets.take("a") for _ in range(4)][-1] > 0  # refills to the burst, no more


def test_full_buckets_are_forgotten_past_the_caller_limit():
    clock = FakeClock()
    buckets = TokenBuckets(rate_per_s=1, burst=1, keys_max=10, clock=clock)
    for n in range(10):
        buckets.take(f"old-{n}")
    clock.now += 5  # every old bucket has refilled
    for n in range(5):
        buckets.take(f"new-{n}")
    assert len(buckets._buckets) <= 10
    assert buckets.take("new-0") > 0  # a busy bucket is kept


def test_taking_a_token_costs_microseconds():
    buckets = TokenBuckets(rate_per_s=10**9, burst=10**9, keys_max=1000)
    started = time.perf_counter()
    for n in range(20_000):
        buckets.take(f"caller-{n % 50}")
    assert (time.perf_counter() - started) / 20_000 < 50e-6


@pytest.fixture
def limited(start_server, database_url):
    """A server allowing each caller 3 reads at once then 2 a second, and 10
    writes at once then 1 a second; keys made before it starts."""
    keys = {"admin": admin_token(database_url), "a": api_key(database_url, ["credits.read", "credits.manage"]),
            "b": api_key(database_url, ["credits.read"])}
    running = start_server(database_url, rate_limit_reads_per_s=2, rate_limit_read_burst=3,
                           rate_limit_writes_per_s=1, rate_limit_write_burst=10)
    clients = {name: Client(f"127.0.0.1:{running.port}", token=key) for name, key in keys.items()}
    clients["admin"].funded_org("acme", 10_000, {"alice": 1_000})
    yield clients
    for client in clients.values():
        client.close()
    running.stop()


def read(client):
    return client.billing.GetCreditPool(billing_pb.GetCreditPoolRequest(org_id="acme"), timeout=5)


def test_a_burst_past_the_budget_is_refused_with_retry_info_then_passes_again(limited):
    a, b = limited["a"], limited["b"]
    for _ in range(3):
        read(a)
    with pytest.raises(grpc.RpcError) as refused:
        read(a)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = error_info(refused.value)
    assert (info.reason, info.metadata["budget"]) == ("RATE_LIMITED", "read")
    delay = retry_delay_s(refused.value)
    assert 0 < delay <= 0.5

    # Another caller from the same address is not affected...
    for _ in range(3):
        read(b)
    # ...nor is the same caller's write budget.
    a.allocate("acme", "bob", 10)

    time.sleep(delay + 0.05)
    assert read(a).pool.total_millicredits == 10_000


def test_a_batch_costs_a_write_token_per_item_refused_items_included(limited, database_url):
    """A DeductCreditsBatch of 8 spends 8 of the 10-token write burst, even
    when its items are refused (each stores its answer): a batch of 3 is then
    refused, while 2 single deductions still fit."""
    deducting = Client(limited["a"].address, token=api_key(database_url, ["credits.deduct"]))
    try:
        def batch(count: int, user_id: str):
            return deducting.credits.DeductCreditsBatch(pb.DeductCreditsBatchRequest(deductions=[
                pb.DeductCreditsRequest(org_id="acme", user_id=user_id, amount_millicredits=1,
                                        service_type="llm", service_name="batch",
                                        idempotency_key=new_key())
                for _ in range(count)]), timeout=5)

        refused_items = batch(8, "nobody").results
        assert [r.error.reason for r in refused_items] == ["ALLOCATION_NOT_FOUND"] * 8
        with pytest.raises(grpc.RpcError) as refused:
            batch(3, "alice")
        assert error_info(refused.value).reason == "RATE_LIMITED"
        assert len(batch(1, "alice").results) == 1
        assert len(batch(1, "alice").results) == 1
    finally:
        deducting.close()


def test_refusals_are_cheap_and_change_nothing(limited):
    """A limited write is refused before the servicer: no row is written."""
    a = limited["a"]
    results = []
    for n in range(12):
        try:
            a.allocate("acme", f"user-{n}", 1)
            results.append("ok")
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            results.append("limited")
    allocations = limited["admin"].billing.ListAllocations(
        billing_pb.ListAllocationsRequest(org_id="acme")).allocations
    assert results.count("ok") in (10, 11)  # the burst, plus at most one refilled token
    assert len(allocations) == 1 + results.count("ok")  # alice and the admitted ones


def test_the_concurrency_cap_refuses_with_resource_exhausted(start_server, database_url, token, monkeypatch):
    """concurrent_rpcs_max: calls beyond it are refused at once, not queued."""
    running = start_server(database_url, concurrent_rpcs_max=2)
    release = threading.Event()
    original = running.check_coalescer._commit_batch

    async def slow_check(*args, **kwargs):
        await asyncio.to_thread(release.wait, 10)
        return await original(*args, **kwargs)

    monkeypatch.setattr(running.check_coalescer, "_commit_batch", slow_check)
    client = Client(f"127.0.0.1:{running.port}", token=token)
    try:
        request = pb.CheckCreditsRequest(org_id="acme", user_id="alice", amount_millicredits=1)
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            calls = [pool.submit(client.credits.CheckCredits, request, timeout=20) for _ in range(6)]
            time.sleep(1.0)
            release.set()
            codes = []
            for call in calls:
                try:
                    call.result()
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as error:
                    codes.append(error.code())
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 3, codes
        assert set(codes) <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.NOT_FOUND}, codes
    finally:
        client.close()
        running.stop()
