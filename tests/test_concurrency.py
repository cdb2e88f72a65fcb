"""Correctness under concurrency: real threads against the real server and database."""

import concurrent.futures
import threading

import grpc
import psycopg

from orgbilling.v1 import credit_service_pb2 as pb
from orgbilling.server.verify import violations
from tests.support import new_key


def test_32_threads_on_one_allocation_spend_exactly_the_balance(client, database_url):
    """32 threads deducting from one allocation: successes are exactly what the
    balance allowed, nothing goes negative, attributions sum to used."""
    limit, amount, attempts_per_thread = 10_000, 7, 60
    client.funded_org("acme", 1_000_000, {"alice": limit})
    start = threading.Barrier(32)

    def spend():
        start.wait()
        outcomes = []
        for _ in range(attempts_per_thread):
            try:
                client.credits.DeductCredits(pb.DeductCreditsRequest(
                    org_id="acme", user_id="alice", amount_millicredits=amount,
                    service_type="llm", service_name="t", idempotency_key=new_key()))
                outcomes.append("ok")
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
                outcomes.append("refused")
        return outcomes

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = [o for f in [pool.submit(spend) for _ in range(32)] for o in f.result()]

    assert results.count("ok") == limit // amount  # 1428 of 1920 attempts
    with psycopg.connect(database_url) as conn:
        used, count = conn.execute(
            "SELECT sum(amount_millicredits), count(*) FROM credit_usage_attribution").fetchone()
        allocation_used = conn.execute(
            "SELECT used_millicredits FROM user_credit_allocations WHERE user_id = 'alice'").fetchone()[0]
    assert violations(database_url) == {}
    assert count == limit // amount and used == allocation_used == (limit // amount) * amount


def test_concurrent_deductions_across_users_and_orgs_never_deadlock(client, database_url):
    """Many users in two orgs, charged and re-limited at once: every call ends
    (no deadlock), and the invariants hold."""
    users = {f"u{i}": 5_000 for i in range(8)}
    client.funded_org("org-a", 100_000, users)
    client.funded_org("org-b", 100_000, users)

    def work(n):
        org = "org-a" if n % 2 else "org-b"
        for i in range(40):
            user = f"u{(n + i) % 8}"
            try:
                if i % 10 == 0:
                    client.allocate(org, user, 5_000 + i)
                else:
                    client.credits.DeductCredits(pb.DeductCreditsRequest(
                        org_id=org, user_id=user, amount_millicredits=13, service_type="llm",
                        service_name="t", idempotency_key=new_key()), timeout=30)
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        for future in [pool.submit(work, n) for n in range(16)]:
            future.result()
    assert violations(database_url) == {}
