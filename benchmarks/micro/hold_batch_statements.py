"""Database and client CPU per hold, for holds sent one transaction each or
in batches of 16 in one transaction as the group commit sends them.

    .venv/bin/python -m benchmarks.micro.hold_batch_statements

Ways: "alone", one hold per transaction as the server sends a lone call (a
reservations_batch of one where the schema has it, else reserve_credits); "pipelined",
16 reserve_credits statements in one transaction (the group commit before
reservations_batch); "batch", one reservations_batch of 16 (the group
commit now), when the schema has it. Run it from a worktree of an older
commit to measure that commit's functions. One connection, one hot
allocation; the backend's own CPU time is read from /proc/<pid>/stat, which
no other process disturbs. The ways alternate, three rounds each; the first
round warms plans and caches. See benchmarks/README.md.
"""

import uuid

import psycopg
from psycopg.types.json import Jsonb

from benchmarks.micro.ledger import compare

ONE = "SELECT reserve_credits(%b, %b, %b, %b, %b, %b, %b, %b, %b, %b)"
BATCH = """
    SELECT * FROM reservations_batch(
        array_fill('ReserveCredits'::text, ARRAY[%(n)s]), %(o)b::text[], %(u)b::text[],
        array_fill(NULL::uuid, ARRAY[%(n)s]), %(a)b::int8[], %(t)b::int8[], %(st)b::text[],
        %(sn)b::text[], %(k)b::text[], %(h)b::bytea[], %(r)b::text[], %(m)b::jsonb[])"""
# As server/store.py sends a lone call: scalars, made arrays by the server.
BATCH_OF_ONE = """
    SELECT * FROM reservations_batch(
        ARRAY['ReserveCredits'], ARRAY[%b::text], ARRAY[%b::text], ARRAY[NULL::uuid], ARRAY[%b::int8],
        ARRAY[%b::int8], ARRAY[%b::text], ARRAY[%b::text], ARRAY[%b::text], ARRAY[%b::bytea],
        ARRAY[%b::text], ARRAY[%b::jsonb])"""
HOLDS, BATCH_SIZE = 1600, 16
TTL_US = 600_000_000
LOCK = "SELECT 1 FROM organization_credit_pools WHERE org_id = 'o' FOR UPDATE"


def holds(count: int) -> list[tuple]:
    return [("o", "u", 1, TTL_US, "s", "n", uuid.uuid4().hex, b"\x00", "", Jsonb({}))
            for _ in range(count)]


def alone(conn: psycopg.Connection) -> int:
    for hold in holds(HOLDS):
        conn.execute(ONE, hold).fetchall()
    return HOLDS


def alone_batch(conn: psycopg.Connection) -> int:
    for hold in holds(HOLDS):
        conn.execute(BATCH_OF_ONE, hold).fetchall()
    return HOLDS


def pipelined(conn: psycopg.Connection) -> int:
    for _ in range(HOLDS // BATCH_SIZE):
        with conn.transaction():
            conn.execute(LOCK)
            with conn.pipeline():
                cursors = [conn.execute(ONE, hold) for hold in holds(BATCH_SIZE)]
            for cursor in cursors:
                cursor.fetchall()
    return HOLDS


def batch(conn: psycopg.Connection) -> int:
    for _ in range(HOLDS // BATCH_SIZE):
        columns = [list(column) for column in zip(*holds(BATCH_SIZE))]
        with conn.transaction():
            conn.execute(LOCK)
            conn.execute(BATCH, dict(zip(("o", "u", "a", "t", "st", "sn", "k", "h", "r", "m"), columns),
                                     n=BATCH_SIZE)).fetchall()
    return HOLDS


def ways(conn: psycopg.Connection) -> list:
    has_batch = conn.execute("SELECT to_regproc('reservations_batch') IS NOT NULL").fetchone()[0]
    return [alone_batch, pipelined, batch] if has_batch else [alone, pipelined]


def main() -> None:
    # Fresh statistics each round: the holds pile up (none is committed),
    # and a plan of an empty table would scan them all.
    compare("hold_batches", ways, unit="hold", before_each="ANALYZE credit_reservations")


if __name__ == "__main__":
    main()
