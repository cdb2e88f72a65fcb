"""The client through a server's death and a drain, with real server
processes: its own retries, with one key per operation, charge exactly
once, and callers see answers, not errors."""

import threading
import time

import psycopg

from orgbilling.client import CreditClient, RetryPolicy
from tests.server_process import ServerProcess
from tests.support import fund_org

CHARGE = dict(service_type="llm", service_name="chat-api")


def wait_for_lock_waiter(database_url: str, timeout_s: float = 10.0) -> None:
    """Until some session waits on a row lock (the server's deduction)."""
    deadline = time.monotonic() + timeout_s
    with psycopg.connect(database_url, autocommit=True) as conn:
        while not conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'").fetchone()[0]:
            assert time.monotonic() < deadline, "the deduction never reached the database"
            time.sleep(0.02)


def test_a_server_killed_in_the_middle_of_a_deduction_and_restarted_charges_once(database_url):
    """The deduction waits in the database (the test holds the pool's row)
    when the server is SIGKILLed; a new server starts on the same port; the
    caller's one call, retried by the client with the same key, returns one
    charge."""
    first = ServerProcess(database_url)
    first.start()
    outcome = {}
    try:
        with CreditClient(first.address, token=first.token, insecure=True, timeout_s=3,
                          retry=RetryPolicy(budget_s=60, backoff_max_s=0.5)) as client:
            fund_org(client, "acme", 10_000, {"alice": 5_000})
            with psycopg.connect(database_url) as lock:
                lock.execute("SELECT 1 FROM organization_credit_pools WHERE org_id = 'acme' FOR UPDATE")

                def charge():
                    try:
                        outcome["result"] = client.deduct_credits(
                            org_id="acme", user_id="alice", amount_millicredits=700, **CHARGE)
                    except Exception as error:  # noqa: BLE001 - asserted below
                        outcome["error"] = error
                caller = threading.Thread(target=charge)
                caller.start()
                wait_for_lock_waiter(database_url)
                first.kill()
                lock.rollback()
            second = ServerProcess(database_url, port=first.port, token=first.token).start()
            try:
                caller.join(timeout=90)
                assert "error" not in outcome, outcome
                result = outcome["result"]
                pool = client.get_credit_pool(org_id="acme").response.pool
                records = client.list_usage(org_id="acme").response.records
            finally:
                second.stop()
    finally:
        first.stop()
    assert pool.used_millicredits == 700
    assert [record.deduction_id for record in records] == [result.deduction_id]


def test_a_drain_sends_the_clients_retries_to_the_other_replica(database_url):
    """Two replicas behind one client (round robin); four threads charging
    while one replica is stopped with SIGTERM: every call answers, and the
    pool holds exactly the charges the callers were told of."""
    replicas = [ServerProcess(database_url).start()]
    replicas.append(ServerProcess(database_url, token=replicas[0].token).start())
    target = "ipv4:" + ",".join(replica.address for replica in replicas)
    charged, failures = [], []
    try:
        with CreditClient(target, token=replicas[0].token, insecure=True,
                          retry=RetryPolicy(budget_s=30)) as client:
            fund_org(client, "acme", 1_000_000, {f"user-{i}": 100_000 for i in range(4)})
            started = threading.Barrier(5)

            def charge(user_id: str):
                started.wait()
                for _ in range(60):
                    try:
                        charged.append(client.deduct_credits(
                            org_id="acme", user_id=user_id, amount_millicredits=3, **CHARGE))
                    except Exception as error:  # noqa: BLE001 - asserted below
                        failures.append(error)
            callers = [threading.Thread(target=charge, args=(f"user-{i}",)) for i in range(4)]
            for caller in callers:
                caller.start()
            started.wait()
            while len(charged) < 40:
                time.sleep(0.01)
            assert replicas[0].stop() == 0, replicas[0].log()
            for caller in callers:
                caller.join(timeout=120)
            pool = client.get_credit_pool(org_id="acme").response.pool
    finally:
        for replica in replicas:
            replica.stop()
    assert failures == []
    assert len(charged) == 240 and len({c.deduction_id for c in charged}) == 240
    assert pool.used_millicredits == 3 * 240
