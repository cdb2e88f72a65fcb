"""Database CPU per deduction, for deductions sent as the server sends them:
alone (deduct_credits, one a transaction), in group-commit batches of 16 and
in DeductCreditsBatch batches of 1,000 (deduct_credits_batch), all on one hot
allocation.

    .venv/bin/python -m benchmarks.micro.deduct_batch_statements

Run it from a worktree of an older commit to measure that commit's
functions (the SQL here is the server's, written out: the functions'
signatures have not changed since deduct_credits_batch was written). One
connection; the backend's own CPU time is read from /proc/<pid>/stat, which no
other process disturbs, so the figures hold on a busy machine where make
bench's do not. The ways alternate, three rounds each; the first round warms
plans and caches. See benchmarks/README.md.
"""

import os

import psycopg
from psycopg.types.json import Jsonb

from benchmarks.micro.ledger import compare

ONE = "SELECT 1, * FROM deduct_credits(%b, %b, %b, %b, %b, %b, %b, %b, %b)"
BATCH = "SELECT * FROM deduct_credits_batch(%b, %b, %b, %b, %b, %b, %b, %b, %b)"
DEDUCTIONS = 8000
METADATA = {"model": "bench-model", "tokens": "100"}


def deductions(count: int) -> list[tuple]:
    return [("o", "u", 1, "llm", "bench", os.urandom(16).hex(), os.urandom(32), os.urandom(16).hex(),
             Jsonb(METADATA)) for _ in range(count)]


def alone(conn: psycopg.Connection) -> int:
    count = DEDUCTIONS // 8  # the slowest way: fewer, for the same time
    for deduction in deductions(count):
        conn.execute(ONE, deduction).fetchall()
    return count


def batches_of(size: int):
    def way(conn: psycopg.Connection) -> int:
        for _ in range(DEDUCTIONS // size):
            columns = [list(column) for column in zip(*deductions(size))]
            conn.execute(BATCH, columns).fetchall()
        return DEDUCTIONS // size * size
    way.__name__ = f"batch_of_{size}"
    return way


def main() -> None:
    compare("deduct_batches", lambda conn: [alone, batches_of(16), batches_of(1000)],
            unit="deduction", before_each="ANALYZE")


if __name__ == "__main__":
    main()
