"""What the micro benches of the ledger share: a database with one hot
allocation, the CPU time of the PostgreSQL backend serving a connection,
and the server's CreditServicer without gRPC. To run them from a worktree
of an older commit, copy this folder there."""

import os
import time
from pathlib import Path

import psycopg

from orgbilling.server.servicers.credit import CreditServicer
from orgbilling.server.settings import Settings
from orgbilling.server.store import Store
from tests.postgres import Postgres


def hot_allocation_database(postgres: Postgres, name: str) -> str:
    """A new database called name, migrated as a deployment's is (not cut
    from the tests' template, whose test clock, tests/postgres.py, costs each
    ledger_now() a query), holding org 'o' with a pool of 10^15 millicredits
    and user 'u''s allocation of as much, reset never. Returns its URL."""
    url = postgres.create_database(name)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO organizations VALUES ('o')")
        conn.execute("INSERT INTO organization_credit_pools (org_id, total_millicredits)"
                     " VALUES ('o', 10^15)")
        conn.execute("INSERT INTO user_credit_allocations (org_id, user_id, limit_millicredits,"
                     " reset_period) VALUES ('o', 'u', 10^15, 'NEVER')")
    return url


def credit_servicer(settings: Settings, store: Store, *, committer=None) -> CreditServicer:
    """CreditServicer over store, with the settings' limits, as the server
    builds it (no check coalescing, no metrics)."""
    return CreditServicer(
        store, committer=committer, checks=None, batch_items_max=settings.deduct_batch_items_max,
        reservation_ttl_default_ms=settings.reservation_ttl_default_ms,
        reservation_ttl_min_ms=settings.reservation_ttl_min_ms,
        reservation_ttl_max_ms=settings.reservation_ttl_max_ms,
        page_size_default=settings.page_size_default, page_size_max=settings.page_size_max)


def backend_cpu_s(conn: psycopg.Connection) -> float:
    """The CPU time of conn's backend so far, from /proc (a few ms late:
    sleep a little before the last reading)."""
    fields = Path(f"/proc/{conn.info.backend_pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(conn: psycopg.Connection, way, *, unit: str) -> str:
    """Runs way(conn), which returns how many units it did, and says the CPU
    of conn's backend and of this process, and the wall time, per unit."""
    db_before, client_before, wall_before = backend_cpu_s(conn), time.process_time(), time.perf_counter()
    count = way(conn)
    client_s, wall_s = time.process_time() - client_before, time.perf_counter() - wall_before
    time.sleep(0.05)  # /proc's CPU time catches up
    db_s = backend_cpu_s(conn) - db_before
    return ", ".join(f"{name} {seconds / count * 1e6:.1f} us/{unit}"
                     for name, seconds in (("db", db_s), ("client", client_s), ("wall", wall_s)))


def compare(database: str, ways, *, unit: str, before_each: str, rounds: int = 3) -> None:
    """On a new hot_allocation_database, on one connection, runs the ways
    (ways(conn): the functions to compare, each returning how many units it
    did) in turn, rounds times, before_each before each, and prints what
    each measured. The first round warms plans and caches."""
    postgres = Postgres()
    try:
        url = hot_allocation_database(postgres, database)
        with psycopg.connect(url, autocommit=True, prepare_threshold=0) as conn:
            chosen = ways(conn)
            width = max(len(way.__name__) for way in chosen)
            for _ in range(rounds):
                for way in chosen:
                    conn.execute(before_each)
                    print(f"{way.__name__:>{width}}: {measure(conn, way, unit=unit)}", flush=True)
    finally:
        postgres.close()
