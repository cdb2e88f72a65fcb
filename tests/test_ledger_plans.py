"""A batch reads the rows of its own items, whatever the size of the ledger's
tables and whatever their statistics said when its plans were made.

plpgsql keeps each statement's plan for the session, and the server's
connections live for many minutes: a plan made while a table was small or
empty (a new deployment) must not read the whole table once it has grown.
Measured with the tables' own counters of the rows and index entries read
(pg_stat_user_tables, pg_stat_user_indexes). With a few thousand
allocations or fewer, the planner would rather hash all of them, through
any index, than probe a few: 30_deductions.sql says how the batch keeps
to its own rows."""

import os

import psycopg
import pytest

from orgbilling.server.binary_arrays import BigintArray, ByteaArray, JsonbArray, TextArray
from tests.support import add_orgs_in_sql

LEDGER_TABLES = ("organization_credit_pools", "user_credit_allocations", "credit_usage_attribution",
                 "idempotency_records", "credit_reservations")
# What a batch of two deductions may read: each item's pool, allocation,
# key in the ledger and in the stored refusals, locked, read and written
# back; a few times over, never a table's worth.
ROWS_READ_MAX = 60


def deduct_batch(conn: psycopg.Connection, org_ids: list[str], *, user_id: str = "u") -> list[str]:
    n = len(org_ids)
    rows = conn.execute(
        "SELECT outcome FROM deduct_credits_batch(%b, %b, %b, %b, %b, %b, %b, %b, %b) ORDER BY item",
        (TextArray(org_ids), TextArray([user_id] * n), BigintArray([1] * n), TextArray(["llm"] * n),
         TextArray(["m"] * n), TextArray(os.urandom(8).hex() for _ in range(n)),
         ByteaArray(os.urandom(32) for _ in range(n)), TextArray(["r"] * n), JsonbArray([{}] * n)),
    ).fetchall()
    return [outcome for (outcome,) in rows]


def reservations_batch(conn: psycopg.Connection, org_ids: list[str], *,
                       commit: list[str] | None = None) -> list[dict]:
    """Holds of 2 millicredits for org_ids' user 'u', or, with commit (their
    reservation IDs), commits of 1 of them; the answers in order."""
    n = len(org_ids)
    rows = conn.execute(
        "SELECT result FROM reservations_batch(%b, %b, %b, %b::uuid[], %b, %b, %b, %b, %b, %b, %b, %b)"
        " ORDER BY item",
        (TextArray(["CommitReservation" if commit else "ReserveCredits"] * n), TextArray(org_ids),
         TextArray(["u"] * n), commit or [None] * n, BigintArray([1 if commit else 2] * n),
         BigintArray([None if commit else 60_000_000] * n), TextArray(["llm"] * n),
         TextArray(["m"] * n), TextArray(os.urandom(8).hex() for _ in range(n)),
         ByteaArray(os.urandom(32) for _ in range(n)), TextArray(["r"] * n), JsonbArray([{}] * n)),
    ).fetchall()
    return [answer for (answer,) in rows]


def rows_read(conn: psycopg.Connection) -> int:
    """Rows and index entries the ledger's tables have given so far, this
    connection's own included (flushed first)."""
    conn.execute("SELECT pg_stat_force_next_flush()")
    conn.execute("SELECT pg_stat_clear_snapshot()")
    return conn.execute(
        "SELECT (SELECT sum(coalesce(seq_tup_read, 0)) FROM pg_stat_user_tables WHERE relname = ANY (%(t)s))"
        "     + (SELECT sum(idx_tup_read) FROM pg_stat_user_indexes WHERE relname = ANY (%(t)s))",
        {"t": list(LEDGER_TABLES)}).fetchone()[0]


def add_past_deductions(conn: psycopg.Connection, org_id: str, count: int) -> None:
    """count deductions of org_id's user 'u', written straight in SQL."""
    conn.execute("""
        INSERT INTO credit_usage_attribution (org_id, user_id, amount_millicredits, service_type,
            service_name, idempotency_key, request_hash, request_id, metadata, allocation_period,
            allocation_remaining_after, pool_spendable_after)
        SELECT %s, 'u', 1, 'llm', 'm', 'past-' || g, '\\x00', 'r', '{}', 0, 0, 0
          FROM generate_series(1, %s) AS g""", (org_id, count))


def rows_read_by_a_batch(conn: psycopg.Connection, org_ids: list[str]) -> int:
    """The rows and index entries one batch of deductions on org_ids reads."""
    before = rows_read(conn)
    assert deduct_batch(conn, org_ids) == ["OK"] * len(org_ids)
    return rows_read(conn) - before


@pytest.fixture(params=[100, 1000, 5000], ids=lambda orgs: f"{orgs} orgs")
def many_orgs(request, database_url):
    """Orgs whose allocations all belong to one user (one person in
    many orgs), each with a few deductions and a stored refusal, and the
    tables' statistics taken then, as autovacuum takes them after the
    first writes."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        add_orgs_in_sql(conn, request.param, user_id="u", millicredits=10**12)
        for first in range(1, 100, 2):
            assert deduct_batch(conn, [f"o{first}", f"o{first + 1}"]) == ["OK", "OK"]
        assert deduct_batch(conn, ["o1"], user_id="nobody") == ["ALLOCATION_NOT_FOUND"]
        conn.execute("ANALYZE")
    return database_url


def test_a_batch_reads_its_own_rows_not_the_tables(many_orgs):
    with psycopg.connect(many_orgs, autocommit=True, prepare_threshold=0) as conn:
        # The session's plans are made now.
        assert deduct_batch(conn, ["o1", "o2"]) == ["OK", "OK"]
        # Then the ledger grows: o1 has 20,000 deductions, and refusals are
        # stored under 2,000 keys of o2.
        add_past_deductions(conn, "o1", 20_000)
        conn.execute("""
            INSERT INTO idempotency_records (org_id, family, idempotency_key, operation, request_hash, result)
            SELECT 'o2', 'deductions', 'refused-' || g, 'DeductCredits', '\\x00', '{}'
              FROM generate_series(1, 2000) AS g""")
        read = rows_read_by_a_batch(conn, ["o1", "o2"])
    assert read <= ROWS_READ_MAX, f"a batch of two deductions read {read} rows and index entries"


def test_plans_made_on_an_empty_ledger_are_made_again_at_its_next_analyze(database_url):
    """Statistics taken while no deduction existed make any index holding
    org_id look as good as the key (PostgreSQL 18 skip-scans them): the
    plans made then may read a whole org, until the next ANALYZE
    (autovacuum's, after the first 50 rows) makes them again."""
    with psycopg.connect(database_url, autocommit=True, prepare_threshold=0) as conn:
        add_orgs_in_sql(conn, 2, user_id="u", millicredits=10**12)
        conn.execute("ANALYZE")
        assert deduct_batch(conn, ["o1", "o2"]) == ["OK", "OK"]
        add_past_deductions(conn, "o1", 20_000)
        conn.execute("ANALYZE credit_usage_attribution")
        read = rows_read_by_a_batch(conn, ["o1", "o2"])
    assert read <= ROWS_READ_MAX, f"a batch of two deductions read {read} rows and index entries"


def test_a_batch_of_holds_and_commits_reads_its_own_rows_not_the_tables(many_orgs):
    """reservations_batch: its holds and their commits, written at the
    batch's end (35_reservations.sql), probe the rows they name; so does
    the probe for expired holds of each pool it locks, which, with the plan
    kept from a small table, read every hold the org ever had."""
    def reserve_and_commit(conn) -> tuple[int, int]:
        before = rows_read(conn)
        held = reservations_batch(conn, ["o1", "o2"])
        assert [answer["outcome"] for answer in held] == ["OK", "OK"]
        after_holds = rows_read(conn)
        committed = reservations_batch(conn, ["o1", "o2"],
                                       commit=[answer["reservation_id"] for answer in held])
        assert [answer["outcome"] for answer in committed] == ["OK", "OK"]
        return after_holds - before, rows_read(conn) - after_holds

    with psycopg.connect(many_orgs, autocommit=True, prepare_threshold=0) as conn:
        reserve_and_commit(conn)  # the session's plans are made now
        # Then the ledger grows: o1 has 20,000 ended holds and as many deductions.
        add_past_deductions(conn, "o1", 20_000)
        conn.execute("""
            INSERT INTO credit_reservations (org_id, user_id, amount_millicredits, state, service_type,
                service_name, idempotency_key, expires_at, resolved_at)
            SELECT 'o1', 'u', 1, 'RELEASED', 'llm', 'm', 'past-hold-' || g,
                   now() + interval '1 minute', now()
              FROM generate_series(1, 20000) AS g""")
        holds_read, commits_read = reserve_and_commit(conn)
    assert holds_read <= ROWS_READ_MAX, f"a batch of two holds read {holds_read} rows and index entries"
    assert commits_read <= ROWS_READ_MAX, f"a batch of two commits read {commits_read} rows and index entries"
