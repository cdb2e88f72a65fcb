"""The server behind PgBouncer in transaction mode (tests/pgbouncer.py), as
production runs it: prepared statements must be off (PgBouncer 1.18 does
not track them), no setting may outlive its transaction, migrations keep
replicas apart, and the bank test holds (a short run).
tests/test_pgbouncer_credit_service.py runs the credit-service tests through it."""

import concurrent.futures
import os
import time

import grpc
import psycopg
import pytest
from psycopg_pool import ConnectionPool

from orgbilling.server.database import connection_options
from orgbilling.server.migrate import migrate, migration_files, repeatable_files
from orgbilling.server.request_context import call_deadline_var
from orgbilling.server.settings import Settings
from orgbilling.server.store import Store
from tests.bank import replicas as bank_replicas
from tests.bank.run import BankRun, RunOptions
from tests.pgbouncer import PgBouncer, check_codes, missing_reason


@pytest.fixture(scope="module")
def pgbouncer(postgres):
    """One server connection per database: every client of a database
    shares it, so whatever one leaves on it, the next one finds."""
    if missing_reason():
        pytest.skip(missing_reason())
    bouncer = PgBouncer(postgres.admin_url, run_as=postgres.system_user, pool_size=1)
    yield bouncer
    bouncer.close()


@pytest.mark.parametrize("prepared", [True, False], ids=["prepared", "not-prepared"])
def test_prepared_statements_break_calls_through_pgbouncer_unless_turned_off(
        start_server, database_url, token, pgbouncer, prepared):
    """Each psycopg connection names its prepared statements _pg3_0, _pg3_1...:
    through one shared server connection, the second client's first PREPARE
    finds the first one's (and a statement prepared on one server connection
    is missing on the next). With prepared_statements off, every call works."""
    server = start_server(pgbouncer.url(database_url), prepared_statements=prepared)
    codes = check_codes(f"127.0.0.1:{server.port}", token, 20)  # the pool hands out its connections in turn
    answered = codes.count(grpc.StatusCode.NOT_FOUND)  # the unknown org: the call worked
    if prepared:
        # A missing or duplicate prepared statement is no outage: INTERNAL.
        assert grpc.StatusCode.INTERNAL in codes and answered < len(codes), codes
    else:
        assert answered == len(codes), codes


def test_a_short_deadline_timeout_ends_with_its_transaction(database_url, pgbouncer):
    """A caller's deadline shorter than statement_timeout_ms limits its
    statements, and no one else's: the setting is local to the work's
    transaction, which holds the server connection meanwhile, so a
    client sharing it waits, then finds the server's own value. (A session
    SET would be seen by that client during the work, and stay if its
    RESET ran on another server connection.)"""
    url = pgbouncer.url(database_url)
    settings = Settings(database_url=url, prepared_statements=False, statement_timeout_ms=5000)
    pool = ConnectionPool(url, min_size=1, max_size=1, kwargs=connection_options(settings), open=True)
    store = Store(pool, pool_wait_timeout_ms=5000, statement_timeout_ms=settings.statement_timeout_ms)

    def other_clients_timeout() -> str:
        with psycopg.connect(url, autocommit=True, prepare_threshold=None) as conn:
            return conn.execute("SHOW statement_timeout").fetchone()[0]

    with pool, concurrent.futures.ThreadPoolExecutor(1) as executor:
        baseline = other_clients_timeout()
        deadline = call_deadline_var.set(time.monotonic() + 2.0)
        try:
            with store._connection() as conn:
                ours = conn.execute("SHOW statement_timeout").fetchone()[0]
                theirs = executor.submit(other_clients_timeout)
                done, _ = concurrent.futures.wait([theirs], timeout=1.0)
        finally:
            call_deadline_var.reset(deadline)
        assert not done, f"another client ran on our server connection meanwhile, and saw {theirs.result()}"
        assert theirs.result(timeout=10) == baseline
        assert other_clients_timeout() == baseline
    assert ours.endswith("ms") and 1000 <= int(ours[:-2]) <= 2000, ours  # the deadline's, not 5 s


def test_replicas_migrating_at_once_through_pgbouncer_apply_each_file_once(postgres, pgbouncer):
    """The migration lock is a transaction's: a session-level lock, taken on
    a server connection every replica shares, would let them all in at once
    (it is reentrant) and leave it held there."""
    url = pgbouncer.url(postgres.create_database("pgbouncer_migrate", migrated=False))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = [f.result() for f in [pool.submit(migrate, url) for _ in range(4)]]
    applied = sorted(name for result in results for name in result)
    assert applied == sorted([name for _, name, _ in migration_files()]
                             + [name for name, _ in repeatable_files()])
    with postgres.admin_connection() as conn:
        assert conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'").fetchone()[0] == 0


class BankThroughPgBouncer(BankRun):
    """The bank run, its replicas reaching PostgreSQL through one PgBouncer
    in transaction mode, which reaches it through the run's TCP proxy: the
    nemesis's stalls and drops cut the pooler's server connections, its
    backend terminations and restarts hit them too."""

    def _start_replicas(self, postgres, database_url, proxy, code_dir, cleanup):
        bouncer = PgBouncer(postgres.admin_url, run_as=postgres.system_user, pool_size=4,
                            upstream=("127.0.0.1", proxy.port))
        cleanup.callback(bouncer.close)
        replicas = []
        for number in range(self.options.replicas):
            replica = bank_replicas.Replica(f"replica-{number} (via PgBouncer)", bouncer.url(database_url),
                                            code_dir)
            cleanup.callback(replica.stop)
            replica.start()
            replicas.append(replica)
        return replicas


def test_bank_through_pgbouncer(monkeypatch):
    """A short bank run through PgBouncer: nothing acknowledged is lost or
    doubled, nothing refused is applied."""
    if missing_reason():
        pytest.skip(missing_reason())
    monkeypatch.setitem(bank_replicas.REPLICA_SETTINGS, "prepared_statements", "false")
    lines = []
    # ORGBILLING_BANK_SEED replays another seed, as in tests/bank/test_bank.py.
    seed = int(os.environ.get("ORGBILLING_BANK_SEED", "20251125"))
    report = BankThroughPgBouncer(RunOptions(seed=seed, duration_s=20, checkpoint_interval_s=10),
                                  say=lines.append).run()
    lines += report.lines()
    print("\n".join(lines))
    assert report.ok, "\n".join(lines)
    assert report.counters["acknowledged"] > 200 and report.counters["refused"] > 20, "\n".join(lines)
