"""Database and client CPU per hold, for holds sent one transaction each or
in batches of 16 in one transaction as the group commit sends them, and
per hold reserved and then committed, in batches of 16 each.

    .venv/bin/python -m benchmarks.micro.hold_batch_statements

Ways: "alone", one hold per transaction as the server sends a lone call
(a reservations_batch of one where the schema has it, else
reserve_credits); "pipelined", 16 reserve_credits statements in one
transaction (the group commit before reservations_batch; only where the
schema still has reserve_credits); "batch", one reservations_batch of 16
(the group commit now), when the schema has it; "batch_then_commit", a
batch of 16 holds of 2 millicredits, then one of their 16 commits of 1
(the load's reserve_commit_hot pairs, as a lane sends them). Run it from a
worktree of an older commit to measure that commit's functions. One
connection, one hot allocation; the backend's own CPU time is read from
/proc/<pid>/stat, which no other process disturbs. The ways alternate,
three rounds each; the first round warms plans and caches. See
benchmarks/README.md.
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


def holds(count: int, *, amount: int = 1) -> list[tuple]:
    return [("o", "u", amount, TTL_US, "s", "n", uuid.uuid4().hex, b"\x00", "", Jsonb({}))
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


def reserve_batch(conn: psycopg.Connection, *, amount: int = 1) -> list[tuple]:
    """One reservations_batch of BATCH_SIZE holds, in a transaction of its own."""
    columns = [list(column) for column in zip(*holds(BATCH_SIZE, amount=amount))]
    with conn.transaction():
        conn.execute(LOCK)
        return conn.execute(BATCH, dict(zip(("o", "u", "a", "t", "st", "sn", "k", "h", "r", "m"), columns),
                                        n=BATCH_SIZE)).fetchall()


def batch(conn: psycopg.Connection) -> int:
    for _ in range(HOLDS // BATCH_SIZE):
        reserve_batch(conn)
    return HOLDS


COMMITS = """
    SELECT * FROM reservations_batch(
        array_fill('CommitReservation'::text, ARRAY[%(n)s]), %(o)b::text[],
        array_fill(NULL::text, ARRAY[%(n)s]), %(ids)b::uuid[], array_fill(1::int8, ARRAY[%(n)s]),
        array_fill(NULL::int8, ARRAY[%(n)s]), array_fill(NULL::text, ARRAY[%(n)s]),
        array_fill(NULL::text, ARRAY[%(n)s]), %(k)b::text[], %(h)b::bytea[], %(r)b::text[],
        %(m)b::jsonb[])"""


def batch_then_commit(conn: psycopg.Connection) -> int:
    for _ in range(HOLDS // BATCH_SIZE):
        held = reserve_batch(conn, amount=2)
        ids = [uuid.UUID(answer["reservation_id"]) for _, answer in sorted(held)]
        with conn.transaction():
            conn.execute(LOCK)
            conn.execute(COMMITS, {"n": BATCH_SIZE, "o": ["o"] * BATCH_SIZE, "ids": ids,
                                   "k": [uuid.uuid4().hex for _ in ids], "h": [b"\x01"] * BATCH_SIZE,
                                   "r": [""] * BATCH_SIZE, "m": [Jsonb({})] * BATCH_SIZE}).fetchall()
    return HOLDS


def ways(conn: psycopg.Connection) -> list:
    def has(function: str) -> bool:
        return conn.execute("SELECT to_regproc(%s) IS NOT NULL", (function,)).fetchone()[0]

    batched = has("reservations_batch")
    chosen = [alone_batch if batched else alone]
    if has("reserve_credits"):  # 0008_drop_single_hold_functions.sql dropped it
        chosen.append(pipelined)
    if batched:
        chosen += [batch, batch_then_commit]
    return chosen


def main() -> None:
    # Fresh statistics each round: the holds pile up, and a plan of an
    # empty table would scan them all.
    compare("hold_batches", ways, unit="hold", before_each="ANALYZE credit_reservations")


if __name__ == "__main__":
    main()
