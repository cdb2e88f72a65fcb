"""The server under faults: PostgreSQL down or unreachable, overload beyond
the concurrency cap, a full connection pool, SIGTERM under load, and a
client's own retry policy carrying calls through a drain and an outage. Each test
runs `orgbilling serve` as a process over a private PostgreSQL that the test
may stop and cut off."""

import collections
import concurrent.futures
import contextlib
import itertools
import json
import os
import signal
import threading
import time

import grpc
import psycopg
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status
from psycopg_pool import ConnectionPool

from orgbilling.v1 import credit_service_pb2 as credit_pb
from orgbilling.v1 import credit_service_pb2_grpc as credit_pb_grpc
from orgbilling.v1 import org_billing_service_pb2 as billing_pb
from orgbilling.v1 import types_pb2
from orgbilling.server.database import connection_options
from orgbilling.server.request_context import call_deadline_var
from orgbilling.server.settings import Settings
from orgbilling.server.store import DEADLINE_SLACK_MS, Store
from orgbilling.server.verify import violations
from tests.bank.connect import Connection, connect
from tests.bank.proxy import TcpProxy
from tests.postgres import SERVER_APPLICATION_NAME, Postgres
from tests.server_process import ServerProcess
from tests.support import admin_token, error_reason, new_key

ORG = "acme"
USER = "alice"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_databases = itertools.count(1)


@pytest.fixture(scope="module")
def cluster():
    """A PostgreSQL of this module's own: the tests stop it."""
    postgres = Postgres(prefix="orgbilling-faults-")
    yield postgres
    postgres.close()


@pytest.fixture
def cluster_url(cluster):
    """A fresh database on the private cluster, which is running."""
    if not cluster.is_running():
        cluster.start()
    return cluster.create_database(f"faults_{next(_databases)}")


class RunningServer:
    """A server process and a connection to it with an all-scopes key."""

    def __init__(self, database_url: str, settings: dict[str, object], connect_url: str | None = None):
        token = admin_token(database_url)  # before start: servers load keys periodically
        self.process = ServerProcess(connect_url or database_url, **settings).start()
        self.connection: Connection = connect(self.process.address, token)
        self.database_url = database_url

    @property
    def pid(self) -> int:
        return self.process.pid

    def health(self) -> int:
        try:
            return self.connection.health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
        except grpc.RpcError:
            return -1

    def wait_health(self, status: int, timeout_s: float) -> float:
        """Seconds until health reports status; fails after timeout_s."""
        started = time.monotonic()
        while self.health() != status:
            assert time.monotonic() - started < timeout_s, \
                f"health not {status} after {timeout_s} s:\n{self.process.log()[-3000:]}"
            time.sleep(0.05)
        return time.monotonic() - started

    def fund(self, pool_millicredits: int = 10**9, limit_millicredits: int = 10**8) -> None:
        billing, metadata = self.connection.billing, self.connection.metadata
        billing.CreateSubscription(billing_pb.CreateSubscriptionRequest(
            org_id=ORG, plan=types_pb2.PLAN_BYOK, billing_cycle=types_pb2.BILLING_CYCLE_MONTHLY,
            idempotency_key=new_key()), metadata=metadata, timeout=10)
        billing.AddCredits(billing_pb.AddCreditsRequest(
            org_id=ORG, source=types_pb2.CREDIT_SOURCE_GRANT, amount_millicredits=pool_millicredits,
            idempotency_key=new_key()), metadata=metadata, timeout=10)
        self.allocate(limit_millicredits, timeout_s=10)

    def allocate(self, limit_millicredits: int, timeout_s: float, key: str | None = None):
        return self.connection.billing.AllocateCredits(billing_pb.AllocateCreditsRequest(
            org_id=ORG, user_id=USER, limit_millicredits=limit_millicredits,
            reset_period=types_pb2.RESET_PERIOD_NEVER, idempotency_key=key or new_key()),
            metadata=self.connection.metadata, timeout=timeout_s)

    def deduct(self, timeout_s: float, key: str | None = None, amount: int = 1):
        return self.connection.credits.DeductCredits(credit_pb.DeductCreditsRequest(
            org_id=ORG, user_id=USER, amount_millicredits=amount, service_type="llm",
            service_name="faults", idempotency_key=key or new_key()),
            metadata=self.connection.metadata, timeout=timeout_s)

    def get_pool(self, timeout_s: float):
        return self.connection.billing.GetCreditPool(
            billing_pb.GetCreditPoolRequest(org_id=ORG), metadata=self.connection.metadata,
            timeout=timeout_s)

    def stop(self) -> int:
        self.connection.close()
        return self.process.stop()


@contextlib.contextmanager
def running_server(database_url: str, connect_url: str | None = None, **settings):
    server = RunningServer(database_url, settings, connect_url)
    try:
        yield server
    finally:
        server.stop()


def timed(call):
    """(status code, seconds) of one call; OK when it succeeds."""
    started = time.monotonic()
    try:
        call()
        code = grpc.StatusCode.OK
    except grpc.RpcError as error:
        code = error.code()
    return code, time.monotonic() - started


@contextlib.contextmanager
def pool_row_locked(database_url: str):
    """Holds the org's pool row lock, so every mutation of the org waits."""
    with psycopg.connect(database_url) as conn:
        conn.execute("SELECT 1 FROM organization_credit_pools WHERE org_id = %s FOR UPDATE", (ORG,))
        yield
        conn.rollback()


def wait_lock_waiters(database_url: str, count: int, timeout_s: float = 10) -> None:
    """Waits until `count` server connections wait for a lock."""
    deadline = time.monotonic() + timeout_s
    with psycopg.connect(database_url, autocommit=True) as conn:
        while True:
            waiting = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
                " AND wait_event_type = 'Lock'", (SERVER_APPLICATION_NAME,)).fetchone()[0]
            if waiting >= count:
                return
            assert time.monotonic() < deadline, f"{waiting} of {count} calls wait for the lock"
            time.sleep(0.05)


def applied_history_keys(database_url: str) -> set[str]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        return {key for (key,) in conn.execute(
            "SELECT idempotency_key FROM org_billing_history WHERE idempotency_key IS NOT NULL")}


def charged_keys(database_url: str) -> set[str]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        return {key for (key,) in conn.execute("SELECT idempotency_key FROM credit_usage_attribution")}


# PostgreSQL down, stalled, back.

@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgres_down_means_not_serving_and_fast_unavailable_then_the_same_process_recovers(
        cluster, cluster_url, mode):
    """Stopped PostgreSQL: health NOT_SERVING within seconds, every call fails
    with UNAVAILABLE well within its deadline; started again: the same
    process serves again on its own."""
    with running_server(cluster_url, pool_wait_timeout_ms=1000) as server:
        server.fund()
        pid = server.pid
        cluster.stop(mode)
        try:
            assert server.wait_health(NOT_SERVING, timeout_s=5) < 5
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                results = list(pool.map(timed, [
                    *(lambda: server.deduct(timeout_s=5) for _ in range(8)),
                    *(lambda: server.get_pool(timeout_s=5) for _ in range(8)),
                ]))
            for code, seconds in results:
                assert code == grpc.StatusCode.UNAVAILABLE and seconds < 3, (code, seconds)
            # A deadline shorter than the pool's wait is honoured too.
            code, seconds = timed(lambda: server.deduct(timeout_s=0.3))
            assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            assert seconds < 0.8
        finally:
            cluster.start()
        assert server.wait_health(SERVING, timeout_s=10) < 10
        assert server.pid == pid and server.process.process.poll() is None
        server.deduct(timeout_s=5)
        assert violations(server.database_url) == {}


def test_a_stalled_database_link_means_not_serving_and_calls_end_by_their_deadline(cluster, cluster_url):
    """A database that stops answering (the link stalls, nothing is refused)
    is the nastier outage: health must still turn NOT_SERVING, calls must
    still end by their deadline, and all must recover when it answers."""
    proxy = TcpProxy(cluster.socket_path)
    try:
        with running_server(cluster_url, connect_url=proxy.proxied_url(cluster_url),
                            pool_wait_timeout_ms=1000) as server:
            server.fund()
            proxy.stall()
            try:
                assert server.wait_health(NOT_SERVING, timeout_s=5) < 5
                with concurrent.futures.ThreadPoolExecutor(8) as pool:
                    results = list(pool.map(timed, [
                        *(lambda: server.deduct(timeout_s=2) for _ in range(4)),
                        *(lambda: server.get_pool(timeout_s=2) for _ in range(4)),
                    ]))
                for code, seconds in results:
                    assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                    assert seconds < 2.5, (code, seconds)
            finally:
                proxy.resume()
            assert server.wait_health(SERVING, timeout_s=10) < 10
            server.deduct(timeout_s=5)
            assert violations(cluster_url) == {}
    finally:
        proxy.close()


# Deadlines.

@pytest.mark.parametrize("deadline_s, own_transaction, timeout_ms", [
    (None, False, 5000),
    (6.0, False, 5000),
    # As the client's default arrives: a little under the timeout, most of
    # the slack left for the time this test takes to reach the check.
    (5.0 - DEADLINE_SLACK_MS / 1000 / 5, False, 5000),
    (2.0, True, 2000),
], ids=["none", "longer", "within-the-slack", "shorter"])
def test_only_a_deadline_shorter_than_the_statement_timeout_bounds_the_statements(
        database_url, deadline_s, own_transaction, timeout_ms):
    """A deadline shorter than statement_timeout_ms runs the call's
    statements in a transaction of its own, with the deadline as their
    timeout; one no shorter (or shorter by less than DEADLINE_SLACK_MS)
    costs no more round trips than no deadline."""
    settings = Settings(database_url=database_url, statement_timeout_ms=5000)
    with ConnectionPool(database_url, min_size=1, max_size=1, kwargs=connection_options(settings)) as pool:
        pool.wait()  # connecting is not part of the deadline's budget here
        store = Store(pool, pool_wait_timeout_ms=5000, statement_timeout_ms=settings.statement_timeout_ms)
        token = call_deadline_var.set(None if deadline_s is None else time.monotonic() + deadline_s)
        try:
            with store._connection() as conn:
                status = conn.info.transaction_status
                timeout = conn.execute("SHOW statement_timeout").fetchone()[0]
        finally:
            call_deadline_var.reset(token)
    assert (status == psycopg.pq.TransactionStatus.INTRANS) == own_transaction
    milliseconds = int(timeout[:-2]) if timeout.endswith("ms") else int(timeout[:-1]) * 1000
    assert timeout_ms - 100 <= milliseconds <= timeout_ms, timeout


def test_an_administrative_call_that_outlives_its_deadline_is_never_applied_later(cluster_url):
    """The statement timeout comes from the caller's deadline: a mutation
    stuck behind a lock is cancelled when its caller gives up, not applied
    after the caller was told DEADLINE_EXCEEDED."""
    with running_server(cluster_url) as server:
        server.fund()
        key = new_key()
        with pool_row_locked(cluster_url):
            code, seconds = timed(lambda: server.allocate(5_000, timeout_s=1, key=key))
            assert code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
            time.sleep(1.5)  # the lock outlives the caller's deadline
        time.sleep(0.5)
        assert key not in applied_history_keys(cluster_url)
        assert violations(cluster_url) == {}


class LateFirstAttempt:
    """A mutation that a retry may see refused while its first attempt is
    still on its way to the database: the refusal's reason, and what then
    makes the mutation fit."""

    def __init__(self, name, send, refusal_reason, make_it_fit, applied_keys):
        self.name, self.send, self.refusal_reason = name, send, refusal_reason
        self.make_it_fit, self.applied_keys = make_it_fit, applied_keys


def deduct_all_or_nothing(server: RunningServer, key: str, timeout_s: float):
    """An all-or-nothing DeductCreditsBatch: 1 millicredit under key-fits,
    which fits, then 1,500 under key, which does not (the limit is 1,000)."""
    items = [credit_pb.DeductCreditsRequest(
        org_id=ORG, user_id=USER, amount_millicredits=amount, service_type="llm",
        service_name="faults", idempotency_key=item_key)
        for item_key, amount in ((f"{key}-fits", 1), (key, 1_500))]
    return server.connection.credits.DeductCreditsBatch(
        credit_pb.DeductCreditsBatchRequest(deductions=items, all_or_nothing=True),
        metadata=server.connection.metadata, timeout=timeout_s)


LATE_FIRST_ATTEMPTS = [
    LateFirstAttempt(
        "deduction",
        lambda server, key, timeout_s: server.deduct(timeout_s=timeout_s, key=key, amount=1_500),
        "INSUFFICIENT_CREDITS",
        lambda server: server.allocate(5_000, timeout_s=5),
        charged_keys),
    LateFirstAttempt(
        "allocation",
        lambda server, key, timeout_s: server.allocate(10**7, timeout_s=timeout_s, key=key),
        "INSUFFICIENT_UNALLOCATED_CREDITS",
        lambda server: server.connection.billing.AddCredits(billing_pb.AddCreditsRequest(
            org_id=ORG, source=types_pb2.CREDIT_SOURCE_GRANT, amount_millicredits=10**8,
            idempotency_key=new_key()), metadata=server.connection.metadata, timeout=5),
        applied_history_keys),
    # Either of its items charged is the batch applied.
    LateFirstAttempt(
        "all-or-nothing-batch",
        lambda server, key, timeout_s: deduct_all_or_nothing(server, key, timeout_s),
        "BATCH_NOT_APPLIED",
        lambda server: server.allocate(5_000, timeout_s=5),
        lambda url: {key.removesuffix("-fits") for key in charged_keys(url)}),
]


@pytest.mark.parametrize("mutation", LATE_FIRST_ATTEMPTS, ids=lambda m: m.name)
def test_a_refused_retry_stays_refused_when_an_earlier_attempt_reaches_the_database_late(
        cluster, cluster_url, mutation):
    """A caller whose first attempt timed out retries with the same key on
    another replica and is told FAILED_PRECONDITION: a definite no. The
    first attempt, held up on its way to the database, must not apply the
    key after that. The bank test found this under faults."""
    proxy = TcpProxy(cluster.socket_path)
    try:
        with running_server(cluster_url) as direct, running_server(
                cluster_url, connect_url=proxy.proxied_url(cluster_url)) as delayed:
            direct.fund(pool_millicredits=10**6, limit_millicredits=1_000)
            delayed.get_pool(timeout_s=5)  # its connections are open, through the proxy
            key = new_key()
            proxy.stall()
            try:
                code, _ = timed(lambda: mutation.send(delayed, key, 1))
                assert code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
                with pytest.raises(grpc.RpcError) as refused:
                    mutation.send(direct, key, 5)
                assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert error_reason(refused.value) == mutation.refusal_reason
                mutation.make_it_fit(direct)
            finally:
                proxy.resume()
            time.sleep(3)  # the held-up attempt reaches the database
            assert key not in mutation.applied_keys(cluster_url), "refused, then applied"
            assert violations(cluster_url) == {}
    finally:
        proxy.close()


# Overload.

@contextlib.contextmanager
def every_slot_stuck(server: RunningServer, database_url: str, slots: int):
    """Fills every slot of the concurrency cap with calls stuck on a lock;
    yields their futures, which complete once the block ends."""
    with concurrent.futures.ThreadPoolExecutor(slots) as stuck_pool:
        with pool_row_locked(database_url):
            stuck = [stuck_pool.submit(timed, lambda: server.allocate(1_000, timeout_s=20))
                     for _ in range(slots)]
            wait_lock_waiters(database_url, slots)
            yield stuck


def test_beyond_the_concurrency_cap_calls_get_resource_exhausted_at_once(cluster_url):
    """With every slot taken by calls stuck on a lock, the next calls are
    refused with RESOURCE_EXHAUSTED at once, memory stays bounded, and the
    stuck calls complete when the lock goes."""
    cap = 4
    with running_server(cluster_url, concurrent_rpcs_max=cap) as server:
        server.fund()
        with every_slot_stuck(server, cluster_url, cap) as stuck:
            rss_before = server.process.rss_bytes()
            refused = [timed(lambda: server.get_pool(timeout_s=5)) for _ in range(20)]
            flood_codes = flood(server, calls=2000, threads=8)
            rss_after = server.process.rss_bytes()
        for code, seconds in refused:
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and seconds < 0.5, (code, seconds)
        assert set(flood_codes) == {grpc.StatusCode.RESOURCE_EXHAUSTED}, flood_codes
        assert rss_after - rss_before < 50 * 2**20, (rss_before, rss_after)
        assert [future.result()[0] for future in stuck] == [grpc.StatusCode.OK] * cap
        assert violations(cluster_url) == {}


def test_a_call_refused_by_the_concurrency_cap_says_why_and_when_to_retry(cluster_url):
    """DESIGN.md: every failure has exactly one ErrorInfo; RESOURCE_EXHAUSTED
    for the concurrency cap (admission control, not gRPC's own cap) comes
    with reason SERVER_BUSY and a RetryInfo."""
    cap = 2
    with running_server(cluster_url, concurrent_rpcs_max=cap) as server:
        server.fund()
        with every_slot_stuck(server, cluster_url, cap):
            with pytest.raises(grpc.RpcError) as refused:
                server.get_pool(timeout_s=5)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        status = rpc_status.from_call(refused.value)
        assert status is not None, "no google.rpc.Status details"
        assert error_reason(refused.value) == "SERVER_BUSY"
        assert any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details)


def test_health_answers_while_the_concurrency_cap_is_reached(cluster_url):
    """An overloaded replica is busy, not dead: its health check must still
    answer (SERVING: the database answers)."""
    cap = 2
    with running_server(cluster_url, concurrent_rpcs_max=cap) as server:
        server.fund()
        with every_slot_stuck(server, cluster_url, cap):
            status = server.connection.health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
        assert status == SERVING


def flood(server: RunningServer, calls: int, threads: int) -> dict:
    """Sends `calls` reads from `threads` threads; returns the codes seen."""
    codes = {}
    lock = threading.Lock()

    def send(_):
        code, _seconds = timed(lambda: server.get_pool(timeout_s=5))
        with lock:
            codes[code] = codes.get(code, 0) + 1

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(send, range(calls)))
    return codes


def test_a_full_connection_pool_answers_unavailable_or_resource_exhausted_within_the_deadline(cluster_url):
    """Both connections held by calls stuck on a lock: calls that queue for
    a connection get UNAVAILABLE when the pool's wait ends, calls past the
    queue's length get RESOURCE_EXHAUSTED at once, all within their deadline."""
    with running_server(cluster_url, pool_size_min=1, pool_size_max=2, pool_waiting_max=3,
                        pool_wait_timeout_ms=500) as server:
        server.fund()
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            with pool_row_locked(cluster_url):
                stuck = [pool.submit(timed, lambda: server.allocate(1_000, timeout_s=20)) for _ in range(2)]
                wait_lock_waiters(cluster_url, 2)
                results = list(pool.map(timed, [lambda: server.get_pool(timeout_s=3)] * 10))
            assert [future.result()[0] for future in stuck] == [grpc.StatusCode.OK] * 2
        codes = {code for code, _ in results}
        assert codes <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}, results
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes, "the waiting queue was never full"
        assert max(seconds for _, seconds in results) < 1.5, results


# Shutdown.

def test_sigterm_under_load_completes_or_refuses_every_call_and_exits_zero_within_grace(cluster_url):
    """Callers keep charging while the server gets SIGTERM: each call either
    completes or gets UNAVAILABLE (never CANCELLED or a deadline), every
    acknowledged charge is stored, none refused is, and the process exits 0
    within its grace period."""
    grace_s = 5
    with running_server(cluster_url, shutdown_grace_ms=grace_s * 1000) as server:
        server.fund()
        outcomes: list[tuple[str, grpc.StatusCode, str | None]] = []
        lock = threading.Lock()
        stop = threading.Event()

        def charge_until_refused():
            refused_since = None
            while not stop.is_set():
                key = new_key()
                try:
                    server.deduct(timeout_s=10, key=key)
                    code, reason = grpc.StatusCode.OK, None
                except grpc.RpcError as error:
                    code, reason = error.code(), error_reason(error)
                with lock:
                    outcomes.append((key, code, reason))
                if code is grpc.StatusCode.OK:
                    refused_since = None
                elif refused_since is None:
                    refused_since = time.monotonic()
                elif time.monotonic() - refused_since > 1:
                    return  # the server is gone

        callers = [threading.Thread(target=charge_until_refused) for _ in range(8)]
        for caller in callers:
            caller.start()
        time.sleep(1.0)
        os.kill(server.pid, signal.SIGTERM)
        signalled = time.monotonic()
        exit_code = server.process.process.wait(grace_s + 5)
        exited_s = time.monotonic() - signalled
        stop.set()
        for caller in callers:
            caller.join(15)

    assert exit_code == 0, server.process.log()[-3000:]
    assert exited_s < grace_s + 1, exited_s
    codes = {code for _, code, _ in outcomes}
    assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
    acknowledged = {key for key, code, _ in outcomes if code is grpc.StatusCode.OK}
    shed = {key for key, code, reason in outcomes if reason == "SHUTTING_DOWN"}
    stored = charged_keys(cluster_url)
    assert len(acknowledged) > 100
    assert acknowledged <= stored, "an acknowledged charge is missing"
    assert not shed & stored, "a call refused as SHUTTING_DOWN was applied"
    assert violations(cluster_url) == {}


# A client's own retry policy (gRFC A6) retries only calls that received no
# response headers: every failure must be a trailers-only response.

RETRY_SERVICE_CONFIG = json.dumps({
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [{
        "name": [{"service": "orgbilling.v1.CreditService"}],
        "retryPolicy": {
            "maxAttempts": 5, "initialBackoff": "0.5s", "maxBackoff": "2s",
            "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"],
        },
    }],
})


def retrying_stub(addresses: list[str]) -> tuple[grpc.Channel, credit_pb_grpc.CreditServiceStub]:
    """A channel over `addresses` with the README's retry policy, as a caller writes it."""
    channel = grpc.insecure_channel("ipv4:" + ",".join(addresses), options=[
        ("grpc.service_config", RETRY_SERVICE_CONFIG), ("grpc.enable_retries", 1),
        ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 500),
    ])
    return channel, credit_pb_grpc.CreditServiceStub(channel)


def used_millicredits(database_url: str) -> int:
    with psycopg.connect(database_url, autocommit=True) as conn:
        return conn.execute("SELECT used_millicredits FROM organization_credit_pools WHERE org_id = %s",
                            (ORG,)).fetchone()[0]


def test_a_clients_retry_policy_carries_calls_through_a_drain_to_another_replica(cluster_url):
    """During a drain, UNAVAILABLE SHUTTING_DOWN is retried by the client's
    own service-config policy onto the other replica: every call ends OK and
    is charged once."""
    with running_server(cluster_url, shutdown_grace_ms=3000) as draining, \
            running_server(cluster_url) as steady:
        draining.fund()
        channel, stub = retrying_stub([draining.process.address, steady.process.address])
        metadata = draining.connection.metadata
        stop = threading.Event()
        results = []

        def charge():
            while not stop.is_set():
                request = credit_pb.DeductCreditsRequest(
                    org_id=ORG, user_id=USER, amount_millicredits=1, service_type="llm",
                    service_name="retries", idempotency_key=new_key())
                results.append(timed(lambda: stub.DeductCredits(request, metadata=metadata, timeout=20)))

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            callers = [pool.submit(charge) for _ in range(4)]
            time.sleep(1.0)
            os.kill(draining.pid, signal.SIGTERM)
            assert draining.process.process.wait(15) == 0
            time.sleep(0.5)
            stop.set()
            for caller in callers:
                caller.result()
        channel.close()
        assert "SHUTTING_DOWN" in draining.process.log(), "the drain refused no call: nothing was retried"
        codes = collections.Counter(code for code, _ in results)
        assert codes == {grpc.StatusCode.OK: len(results)}, codes
        assert used_millicredits(cluster_url) == len(results)
        assert violations(cluster_url) == {}


def test_a_clients_retry_policy_carries_a_deduction_over_a_database_outage(cluster, cluster_url):
    """With PostgreSQL down, UNAVAILABLE DATABASE_UNAVAILABLE is retried by
    the client's own policy; when the database is back the deduction ends OK,
    charged once."""
    with running_server(cluster_url, pool_wait_timeout_ms=500) as server:
        server.fund()
        channel, stub = retrying_stub([server.process.address])
        request = credit_pb.DeductCreditsRequest(
            org_id=ORG, user_id=USER, amount_millicredits=7, service_type="llm",
            service_name="retries", idempotency_key=new_key())
        cluster.stop("fast")
        try:
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                call = pool.submit(stub.DeductCredits, request, metadata=server.connection.metadata,
                                   timeout=30)
                time.sleep(1.5)
                assert not call.done(), "the call ended while the database was down"
                cluster.start()
                response = call.result()
        finally:
            if not cluster.is_running():
                cluster.start()
        channel.close()
        assert response.deduction_id and not response.replayed
        assert "DATABASE_UNAVAILABLE" in server.process.log(), "no attempt was refused: nothing was retried"
        assert used_millicredits(cluster_url) == 7
        assert violations(cluster_url) == {}
