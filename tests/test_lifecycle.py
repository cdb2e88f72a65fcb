"""The server as a process: the embedded default, restarts, SIGTERM."""

import os
import signal
import time

import grpc
import psycopg
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orgbilling.v1 import credit_service_pb2 as pb
from orgbilling.v1 import org_billing_service_pb2 as billing_pb
from tests.server_process import ServerProcess
from tests.support import new_key


def test_embedded_default_keeps_data_across_restarts(embedded_data_dir):
    """With no database URL the server starts its own PostgreSQL in the data
    directory; stop it, start it again, and nothing is lost."""
    first = ServerProcess("", data_dir=embedded_data_dir).start(ready_timeout_s=60)
    client = first.client()
    try:
        client.funded_org("acme", 10_000, {"alice": 1_000})
        charged = client.credits.DeductCredits(pb.DeductCreditsRequest(
            org_id="acme", user_id="alice", amount_millicredits=300, service_type="llm",
            service_name="t", idempotency_key="before-restart"))
    finally:
        client.close()
        assert first.stop() == 0, first.log()

    second = ServerProcess("", data_dir=embedded_data_dir, port=first.port).start(ready_timeout_s=60)
    client = second.client()
    try:
        pool = client.billing.GetCreditPool(billing_pb.GetCreditPoolRequest(org_id="acme")).pool
        assert (pool.total_millicredits, pool.used_millicredits) == (10_000, 300)
        replay = client.credits.DeductCredits(pb.DeductCreditsRequest(
            org_id="acme", user_id="alice", amount_millicredits=300, service_type="llm",
            service_name="t", idempotency_key="before-restart"))
        assert replay.replayed and replay.deduction_id == charged.deduction_id
    finally:
        client.close()
        assert second.stop() == 0, second.log()


def test_sigterm_finishes_in_flight_calls_and_exits_zero(database_url):
    """On SIGTERM health turns NOT_SERVING, calls in flight complete, nothing is
    half written, and the process exits 0."""
    server = ServerProcess(database_url).start()
    client = server.client()
    client.funded_org("acme", 10**9, {"alice": 10**9})
    futures = []
    for _ in range(200):
        futures.append(client.credits.DeductCredits.future(pb.DeductCreditsRequest(
            org_id="acme", user_id="alice", amount_millicredits=1, service_type="llm",
            service_name="t", idempotency_key=new_key()), timeout=20))
    os.kill(server.process.pid, signal.SIGTERM)
    acknowledged = 0
    for future in futures:
        try:
            future.result()
            acknowledged += 1
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error
    assert server.process.wait(30) == 0, server.log()
    client.close()
    with psycopg.connect(database_url) as conn:
        rows, used = conn.execute(
            "SELECT count(*), coalesce(sum(amount_millicredits), 0) FROM credit_usage_attribution").fetchone()
        pool_used = conn.execute("SELECT used_millicredits FROM organization_credit_pools").fetchone()[0]
    # Every acknowledged charge is stored; any stored beyond those were cut off
    # after commit, never half written.
    assert rows >= acknowledged and used == pool_used == rows


def test_health_reports_not_serving_while_the_database_is_unreachable(database_url):
    """A server whose database is gone says NOT_SERVING and fails calls fast
    with UNAVAILABLE instead of hanging."""
    bad_url = database_url.replace("dbname=", "dbname=missing_") if "dbname=" in database_url \
        else database_url.rsplit("/", 1)[0] + "/missing_database"
    server = ServerProcess(bad_url, pool_wait_timeout_ms=500)
    import subprocess

    # Migrations need the database, so start the server without them: the
    # server process refuses to start, which is itself the fail-closed answer.
    result = subprocess.run(server.command, env=server.env, cwd=server.cwd, capture_output=True, timeout=60)
    assert result.returncode != 0


def test_health_service_is_serving_for_each_service(client, server):
    stub = health_pb2_grpc.HealthStub(client.channel)
    deadline = time.monotonic() + 5
    for service in ("", "orgbilling.v1.CreditService", "orgbilling.v1.OrgBillingService"):
        while True:
            status = stub.Check(health_pb2.HealthCheckRequest(service=service)).status
            if status == health_pb2.HealthCheckResponse.SERVING or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert status == health_pb2.HealthCheckResponse.SERVING
