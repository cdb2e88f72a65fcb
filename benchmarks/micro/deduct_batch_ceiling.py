"""The most DeductCreditsBatch deductions a second one hot pool can take on
this machine, PostgreSQL alone: no gRPC, no server, batches built before
the clock starts.

    .venv/bin/python -m benchmarks.micro.deduct_batch_ceiling

Batches of 1,000 on one pool commit one at a time: each holds the pool's
lock from its first statement to its commit. So however many callers send
them, the deductions a second are bounded by the time one batch holds that
lock, and no server in front can pass that bound. Each of `callers` threads
sends deduct_credits_batch on a connection of its own (autocommit, as
server.store sends a batch), for a few seconds. Alternated with the same
without credit_usage_attribution's foreign key, dropped in this database
only: what checking each new row against its allocation costs
(benchmarks/README.md, "The batch's ceiling"). Two rounds. Each figure comes
with the backends' CPU and the WAL a deduction took (bytes, records,
full-page images: what the commit of a batch has to flush).
"""

import os
import threading
import time

import psycopg
from psycopg.types.json import Jsonb

from benchmarks.micro.ledger import backend_cpu_s, hot_allocation_database
from tests.postgres import Postgres

ITEMS = 1000
DURATION_S = 4.0
CALLERS = (1, 4, 16)
ROUNDS = 2
BATCH = "SELECT * FROM deduct_credits_batch(%b, %b, %b, %b, %b, %b, %b, %b, %b)"
METADATA = {"model": "bench-model", "tokens": "100"}
FOREIGN_KEY = "credit_usage_attribution_org_id_user_id_fkey"
DROP_FOREIGN_KEY = f"ALTER TABLE credit_usage_attribution DROP CONSTRAINT {FOREIGN_KEY}"
ADD_FOREIGN_KEY = (f"ALTER TABLE credit_usage_attribution ADD CONSTRAINT {FOREIGN_KEY}"
                   " FOREIGN KEY (org_id, user_id) REFERENCES user_credit_allocations NOT VALID")


def batch_columns() -> list[list]:
    rows = [("o", "u", 1, "llm", "bench", os.urandom(16).hex(), os.urandom(32), os.urandom(16).hex(),
             Jsonb(METADATA)) for _ in range(ITEMS)]
    return [list(column) for column in zip(*rows)]


def deductions_per_s(url: str, callers: int) -> tuple[float, int, float]:
    """Deductions a second over DURATION_S, `callers` connections sending
    batches; how many deductions they made, and their backends' CPU
    seconds meanwhile."""
    # More than any caller can send in the window: built before it starts.
    batches_each = int(DURATION_S * 60 / callers) + 2
    ready = threading.Barrier(callers + 1)
    window = {"end": float("inf")}  # until all callers are ready
    sent = [0] * callers
    cpu_s = [0.0] * callers

    def caller(index: int) -> None:
        batches = [batch_columns() for _ in range(batches_each)]
        with psycopg.connect(url, autocommit=True) as conn:
            ready.wait()
            cpu_before = backend_cpu_s(conn)
            for columns in batches:
                if time.monotonic() >= window["end"]:
                    time.sleep(0.05)  # /proc's CPU time catches up
                    cpu_s[index] = backend_cpu_s(conn) - cpu_before
                    return
                rows = conn.execute(BATCH, columns).fetchall()
                assert all(row[1] == "OK" for row in rows)
                sent[index] += 1
            raise RuntimeError("a caller ran out of batches before the window ended")

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(callers)]
    for thread in threads:
        thread.start()
    ready.wait()
    start = time.monotonic()
    window["end"] = start + DURATION_S
    for thread in threads:
        thread.join()
    deductions = sum(sent) * ITEMS
    return deductions / (time.monotonic() - start), deductions, sum(cpu_s)


def wal_written(conn: psycopg.Connection) -> tuple[int, int, int]:
    """The cluster's WAL so far: bytes (exact, from the insert position),
    records and full-page images (pg_stat_wal, which a backend publishes
    when it ends: read after the callers' connections closed)."""
    time.sleep(0.2)
    conn.execute("SELECT pg_stat_clear_snapshot()")
    return conn.execute(
        "SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn, wal_records, wal_fpi FROM pg_stat_wal"
    ).fetchone()


def measured(url: str, callers: int) -> str:
    with psycopg.connect(url, autocommit=True) as conn:
        before = wal_written(conn)
        per_s, deductions, cpu_s = deductions_per_s(url, callers)
        wal_bytes, records, full_pages = (
            (after - earlier) / deductions for after, earlier in zip(wal_written(conn), before))
    return (f"{callers} callers {per_s:,.0f}/s (a deduction: {cpu_s / deductions * 1e6:.1f} us of"
            f" backend CPU; WAL {wal_bytes:,.0f} bytes, {records:.1f} records,"
            f" {full_pages:.2f} full pages)")


def main() -> None:
    postgres = Postgres()
    try:
        url = hot_allocation_database(postgres, "deduct_batch_ceiling")
        # Alternated round by round, as the ledger grows through the run.
        # NOT VALID: the rows already there are not checked again, new ones are.
        variants = (("as shipped", ADD_FOREIGN_KEY), ("without the foreign key", DROP_FOREIGN_KEY))
        for round_number in range(1, ROUNDS + 1):
            for label, change in variants:
                with psycopg.connect(url, autocommit=True) as conn:
                    if round_number > 1 or change is DROP_FOREIGN_KEY:
                        conn.execute(change)
                figures = ", ".join(measured(url, callers) for callers in CALLERS)
                print(f"round {round_number}, {label}: {figures}", flush=True)
    finally:
        postgres.close()


if __name__ == "__main__":
    main()
