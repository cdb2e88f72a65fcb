"""How long PostgreSQL alone takes to answer one lone deduction, next to a
bare round trip: the floor under `make bench`'s `deduct @1 p50 vs noop
p50`.

    .venv/bin/python -m benchmarks.micro.lone_deduction

One caller, one connection (autocommit, statements prepared, as the
server's), no gRPC and no server: each way sends its statement CALLS
times, one after the other, and says the median wall time a call and
the backend's CPU a call. Three rounds, the ways alternated:
- `round trip`: SELECT 1;
- `lone deduction`: the server's own statement for a group-committed batch
  of one (server.store's _DEDUCT_ONE: deduct_credits, its attribution row,
  summaries and balances, and the commit's WAL flush) on one hot allocation;
- `same, no WAL flush wait`: the same with synchronous_commit off on this
  connection, to show what of it is the wait for the disk.

A served deduction pays everything the served no-op does (the client, gRPC,
our chain) and then its statement: its p50 is at least the no-op's p50
plus `lone deduction`'s (benchmarks/README.md, "deduct @1: the floor").
"""

import os
import statistics
import time

import psycopg
from psycopg.types.json import Jsonb

from benchmarks.micro.ledger import backend_cpu_s, hot_allocation_database
from orgbilling.server.store import _DEDUCT_ONE
from tests.postgres import Postgres

CALLS = 2000
ROUNDS = 3


def round_trip(conn: psycopg.Connection) -> None:
    conn.execute("SELECT 1").fetchall()


def lone_deduction(conn: psycopg.Connection) -> None:
    conn.execute(_DEDUCT_ONE, ("o", "u", 1, "llm", "bench", os.urandom(16).hex(), os.urandom(32),
                               os.urandom(16).hex(), Jsonb({"model": "bench-model"}))).fetchall()


def timed(conn: psycopg.Connection, call, *, settings: str) -> tuple[float, float]:
    """The median wall time and the backend's mean CPU of CALLS calls, in us."""
    conn.execute(settings)
    walls = []
    cpu_before = backend_cpu_s(conn)
    for _ in range(CALLS):
        start = time.perf_counter()
        call(conn)
        walls.append(time.perf_counter() - start)
    time.sleep(0.05)  # /proc's CPU time catches up
    cpu_s = backend_cpu_s(conn) - cpu_before
    return statistics.median(walls) * 1e6, cpu_s / CALLS * 1e6


WAYS = (
    ("round trip", round_trip, "SET synchronous_commit = on"),
    ("lone deduction", lone_deduction, "SET synchronous_commit = on"),
    ("same, no WAL flush wait", lone_deduction, "SET synchronous_commit = off"),
)


def main() -> None:
    postgres = Postgres()
    try:
        url = hot_allocation_database(postgres, "lone_deduction")
        with psycopg.connect(url, autocommit=True, prepare_threshold=0) as conn:
            for way, call, settings in WAYS:  # warms plans and caches
                timed(conn, call, settings=settings)
            print(f"{'':>24}  {'p50 wall':>9}  {'db CPU':>8}  (us a call, {CALLS} calls)")
            for round_number in range(1, ROUNDS + 1):
                for way, call, settings in WAYS:
                    wall_us, cpu_us = timed(conn, call, settings=settings)
                    print(f"{way:>24}  {wall_us:9.0f}  {cpu_us:8.0f}  round {round_number}", flush=True)
    finally:
        postgres.close()


if __name__ == "__main__":
    main()
