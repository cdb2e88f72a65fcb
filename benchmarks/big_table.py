"""Grows credit_usage_attribution to millions of rows in one SQL statement,
to see whether a deduction slows down as the ledger grows."""

import time

import psycopg

from orgbilling.server.summaries import rebuild_usage_summaries

# Keys, times and (by default) deduction ids all grow with g, so every index
# is filled in order, at its right edge: many times faster than random
# inserts. The keys are still spread evenly over the hex key space, as uuid
# keys are, so a new random key lands anywhere in the big unique index.
FILL = """
INSERT INTO credit_usage_attribution (
    org_id, user_id, amount_millicredits, service_type, service_name,
    idempotency_key, request_hash, allocation_period,
    allocation_remaining_after, pool_spendable_after, created_at)
SELECT %(org_id)s, %(user_id)s, 1, 'llm', 'bulk',
       lpad(to_hex((g - 1) * (x'1000000000000000'::bigint / %(rows)s)), 15, '0'), '\\x00'::bytea, 0,
       0, 0, now() - (%(rows)s - g) * interval '100 milliseconds'
  FROM generate_series(1, %(rows)s) AS g
"""

# Conservation (design invariant 2): the pool's and the allocation's used
# equal the sum of their attribution rows, so the bulk rows are charged too.
CHARGE = [
    "UPDATE organization_credit_pools SET used_millicredits = used_millicredits + %(rows)s"
    " WHERE org_id = %(org_id)s",
    "UPDATE user_credit_allocations SET used_millicredits = used_millicredits + %(rows)s"
    " WHERE org_id = %(org_id)s AND user_id = %(user_id)s",
]


def _skip_foreign_key_checks(conn: psycopg.Connection) -> None:
    """Every bulk row references the one allocation the org has, so the
    per-row foreign key check proves nothing and costs much of the time.
    Only a superuser may skip it (the embedded server's user is one)."""
    try:
        conn.execute("SET session_replication_role = replica")
    except psycopg.errors.InsufficientPrivilege:
        pass


def attribution_rows(url: str) -> int:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT count(*) FROM credit_usage_attribution").fetchone()[0]


def settle(url: str) -> None:
    """VACUUM (ANALYZE) and CHECKPOINT, so none of them runs in the
    background of the next measurement: right after a bulk insert,
    autovacuum and a checkpoint would, and the first reads of the new rows
    would write their hint bits. A table of millions of old rows in
    production is vacuumed long ago; this puts the fresh one in that state."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET statement_timeout = 0")
        conn.execute("VACUUM (ANALYZE) credit_usage_attribution")
        try:
            conn.execute("CHECKPOINT")
        except psycopg.errors.InsufficientPrivilege:
            pass  # an external database's user may not checkpoint: measure anyway


def fill_attribution(url: str, org_id: str, user_id: str, rows: int) -> float:
    """Adds `rows` attribution rows to org_id's user, sums them into the
    usage summary tables (which must equal the rows they sum, as `verify`
    checks) and settles the table; returns the seconds taken."""
    started = time.monotonic()
    params = {"org_id": org_id, "user_id": user_id, "rows": rows}
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET statement_timeout = 0")
        _skip_foreign_key_checks(conn)
        with conn.transaction():  # all rows and their charge, or nothing
            conn.execute(FILL, params)
            for statement in CHARGE:
                conn.execute(statement, params)
            # The server adds each charge to the summaries in its own
            # transaction; rows written in bulk are summed here, in the same
            # transaction as they are, for the one org they went to.
            rebuild_usage_summaries(conn, org_ids=[org_id])
    settle(url)
    return time.monotonic() - started
