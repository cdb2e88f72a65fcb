"""Database and client CPU per hold when a group-commit batch of holds is sent
as one statement each (pipelined, as server/store.py does) or as one
statement over unnest(): does the statement's own overhead matter?

    .venv/bin/python -m benchmarks.micro.hold_batch_statements

One connection, batches of 16 holds on one allocation, each batch in one
transaction under the pool's lock; the backend's own CPU time is read from
/proc/<pid>/stat, which no other process disturbs. The two ways alternate,
three rounds each; the first round warms plans and caches. See benchmarks/README.md.
"""

import os
import time
import uuid

import psycopg
from psycopg.types.json import Jsonb

from tests.postgres import TEMPLATE_DATABASE, Postgres

ONE = "SELECT reserve_credits(%b, %b, %b, %b, %b, %b, %b, %b, %b, %b)"
MANY = """
    SELECT reserve_credits(i.o, i.u, i.a, i.t, i.st, i.sn, i.k, i.h, i.r, i.m)
      FROM unnest(%b::text[], %b::text[], %b::int8[], %b::int8[], %b::text[], %b::text[],
                  %b::text[], %b::bytea[], %b::text[], %b::jsonb[])
           WITH ORDINALITY AS i(o, u, a, t, st, sn, k, h, r, m, n)
     ORDER BY i.n"""
BATCHES, BATCH_SIZE = 100, 16
TTL_US = 600_000_000


def backend_cpu_s(conn: psycopg.Connection) -> float:
    fields = open(f"/proc/{conn.info.backend_pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def holds(count: int) -> list[tuple]:
    return [("o", "u", 1, TTL_US, "s", "n", uuid.uuid4().hex, b"\x00", "", Jsonb({}))
            for _ in range(count)]


def measure(conn: psycopg.Connection, *, one_statement: bool) -> str:
    cpu_before, wall_before, client_before = backend_cpu_s(conn), time.perf_counter(), time.process_time()
    for _ in range(BATCHES):
        batch = holds(BATCH_SIZE)
        with conn.transaction():
            conn.execute("SELECT 1 FROM organization_credit_pools WHERE org_id = 'o' FOR UPDATE")
            if one_statement:
                conn.execute(MANY, [list(column) for column in zip(*batch)]).fetchall()
            else:
                with conn.pipeline():
                    cursors = [conn.execute(ONE, hold) for hold in batch]
                for cursor in cursors:
                    cursor.fetchall()
    time.sleep(0.05)  # /proc's CPU time catches up
    count = BATCHES * BATCH_SIZE
    return (f"db {(backend_cpu_s(conn) - cpu_before) / count * 1e6:.0f} us/hold, "
            f"client {(time.process_time() - client_before) / count * 1e6:.0f} us/hold, "
            f"wall {(time.perf_counter() - wall_before) / count * 1e6:.0f} us/hold")


def main() -> None:
    postgres = Postgres()
    try:
        postgres.new_database()  # makes the migrated template
        url = postgres.create_database("hold_batches", template=TEMPLATE_DATABASE)
        with psycopg.connect(url, autocommit=True, prepare_threshold=0) as conn:
            conn.execute("INSERT INTO organizations VALUES ('o')")
            conn.execute("INSERT INTO organization_credit_pools (org_id, total_millicredits)"
                         " VALUES ('o', 10^15)")
            conn.execute("INSERT INTO user_credit_allocations (org_id, user_id, limit_millicredits,"
                         " reset_period) VALUES ('o', 'u', 10^15, 'NEVER')")
            for one_statement in (False, True) * 3:
                # Fresh statistics each round: the holds pile up (none is
                # committed), and a plan of an empty table would scan them all.
                conn.execute("ANALYZE credit_reservations")
                way = "one statement over unnest()" if one_statement else "one statement a hold"
                print(f"{way}: {measure(conn, one_statement=one_statement)}", flush=True)
    finally:
        postgres.close()


if __name__ == "__main__":
    main()
