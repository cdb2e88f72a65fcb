"""Database CPU per deduction of group-commit batches as `make bench` makes
them: spread over many orgs (each item its own org, as deduct_spread's
batches are) and on one hot allocation, in a database shaped like the
bench's (1,000 orgs, one allocation each, all of the same user).

    .venv/bin/python -m benchmarks.micro.deduct_batch_spread

One connection (autocommit, statements prepared, as the server's); the
backend's own CPU from /proc. Each way alternates with the other, ROUNDS
times, the first round warming plans and caches; the session's plans are
made after a first batch and ANALYZE, as autovacuum takes the statistics
after a deployment's first writes. Run it from a worktree of an older
commit (copy benchmarks/micro/ there) to measure that commit's functions
(benchmarks/README.md, "Plans that read whole tables").
"""

import os
import time

import psycopg

from benchmarks.micro.ledger import backend_cpu_s
from orgbilling.server.binary_arrays import BigintArray, ByteaArray, JsonbArray, TextArray
from tests.postgres import Postgres
from tests.support import add_orgs_in_sql

ORGS = 1000
BATCHES = 300
ROUNDS = 4
BATCH = "SELECT * FROM deduct_credits_batch(%b, %b, %b, %b, %b, %b, %b, %b, %b)"
WAYS = (("spread over 8 orgs", 8, True), ("hot, 16 a batch", 16, False))


def many_orgs_database(postgres: Postgres) -> str:
    url = postgres.create_database("deduct_batch_spread")
    with psycopg.connect(url, autocommit=True) as conn:
        add_orgs_in_sql(conn, ORGS, user_id="u", millicredits=10**15)
        conn.execute(BATCH, batch(["o1", "o2"]))
        conn.execute("ANALYZE")
    return url


def batch(org_ids: list[str]) -> tuple:
    n = len(org_ids)
    return (TextArray(org_ids), TextArray(["u"] * n), BigintArray([1] * n), TextArray(["llm"] * n),
            TextArray(["bench"] * n), TextArray(os.urandom(16).hex() for _ in range(n)),
            ByteaArray(os.urandom(32) for _ in range(n)), TextArray(os.urandom(16).hex() for _ in range(n)),
            JsonbArray([{"model": "bench-model"}] * n))


def us_per_deduction(conn: psycopg.Connection, size: int, spread: bool, start: int) -> float:
    batches = [batch(sorted(f"o{(start + b * size + i) % ORGS + 1}" for i in range(size)) if spread
                     else ["o1"] * size) for b in range(BATCHES)]
    before = backend_cpu_s(conn)
    for params in batches:
        conn.execute(BATCH, params).fetchall()
    time.sleep(0.05)  # /proc's CPU time catches up
    return (backend_cpu_s(conn) - before) / (BATCHES * size) * 1e6


def main() -> None:
    postgres = Postgres()
    try:
        url = many_orgs_database(postgres)
        with psycopg.connect(url, autocommit=True, prepare_threshold=0) as conn:
            for round_number in range(ROUNDS):
                for name, size, spread in WAYS:
                    us = us_per_deduction(conn, size, spread, start=round_number * 7919)
                    print(f"{name:>20}: {us:6.1f} us of database CPU a deduction (round {round_number})",
                          flush=True)
    finally:
        postgres.close()


if __name__ == "__main__":
    main()
