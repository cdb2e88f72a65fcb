"""The report indexes never serve the ledger's key lookups.

0002_reporting.sql adds the first indexes besides primary keys that lead with
org_id. A cached generic plan once settled on such an index for the
idempotency lookup and read every attribution row of the org per deduction
(see 0001_baseline.sql). These tests run the ledger through the server, on a
fresh (empty, just analyzed) database and on a full one, and check in
PostgreSQL's own statistics that the report indexes were never scanned.
"""

import time

import psycopg
import pytest

from orgbilling.v1 import credit_service_pb2 as pb
from tests.support import new_key

REPORT_INDEXES = ("credit_usage_attribution_by_time", "credit_usage_attribution_by_user_time")


def index_scans(database_url: str) -> dict[str, int]:
    # Backends report their statistics when idle, at most once a second.
    time.sleep(1.5)
    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT indexrelname, idx_scan FROM pg_stat_user_indexes WHERE indexrelname = ANY(%s)",
            (list(REPORT_INDEXES),),
        ).fetchall()
    return dict(rows)


def deduct_every_way(client, org: str, users: list[str], rounds: int) -> None:
    """Lone deductions, batches, replays of both, and refusals."""
    for n in range(rounds):
        key = new_key()
        request = pb.DeductCreditsRequest(
            org_id=org, user_id=users[n % len(users)], amount_millicredits=1,
            service_type="llm", service_name="plans", idempotency_key=key)
        client.credits.DeductCredits(request)
        client.credits.DeductCredits(request)  # a replay looks the key up again
        batch = pb.DeductCreditsBatchRequest(deductions=[
            pb.DeductCreditsRequest(org_id=org, user_id=user, amount_millicredits=1,
                                    service_type="llm", service_name="plans",
                                    idempotency_key=new_key())
            for user in users
        ] + [request])
        client.credits.DeductCreditsBatch(batch)
        client.credits.CheckCredits(pb.CheckCreditsRequest(
            org_id=org, user_id=users[0], amount_millicredits=1))


@pytest.mark.parametrize("rows_before", [0, 50_000], ids=["empty", "full"])
def test_the_ledger_never_scans_a_report_index(client, database_url, rows_before):
    """Deductions, batches, replays and checks use primary keys only, whether
    the plans were made on an empty table or a full one."""
    users = ["u1", "u2", "u3"]
    client.funded_org("plans", 10**12, {user: 10**11 for user in users})
    with psycopg.connect(database_url, autocommit=True) as conn:
        if rows_before:
            conn.execute(
                """INSERT INTO credit_usage_attribution (
                       org_id, user_id, amount_millicredits, service_type, service_name,
                       idempotency_key, request_hash, allocation_period,
                       allocation_remaining_after, pool_spendable_after, created_at)
                   SELECT 'plans', 'u' || (1 + g %% 3), 1, 'llm', 'bulk', 'bulk-' || g,
                          '\\x00'::bytea, 0, 0, 0, now() - g * interval '1 second'
                     FROM generate_series(1, %s) AS g""",
                (rows_before,),
            )
        conn.execute("ANALYZE")
    before = index_scans(database_url)
    deduct_every_way(client, "plans", users, rounds=30)
    assert index_scans(database_url) == before


@pytest.mark.parametrize("query, index", [
    ("SELECT deduction_id FROM credit_usage_attribution"
     " WHERE org_id = $1 AND created_at >= $2 AND created_at < $3"
     "   AND (created_at, deduction_id) < ($3, $4)"
     " ORDER BY created_at DESC, deduction_id DESC LIMIT 100",
     "credit_usage_attribution_by_time"),
    ("SELECT deduction_id FROM credit_usage_attribution"
     " WHERE org_id = $1 AND user_id = $5 AND created_at >= $2 AND created_at < $3"
     " ORDER BY created_at DESC, deduction_id DESC LIMIT 100",
     "credit_usage_attribution_by_user_time"),
], ids=["by_time", "by_user_time"])
def test_a_range_query_can_use_the_report_indexes(database_url, query, index):
    """The partial indexes' predicate is implied by any bound on created_at,
    in a generic plan too (parameters, not constants)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SET plan_cache_mode = force_generic_plan")
        conn.execute("SET enable_seqscan = off")
        conn.execute(f"PREPARE q(text, timestamptz, timestamptz, uuid, text) AS {query}")
        plan = "\n".join(row[0] for row in conn.execute(
            "EXPLAIN EXECUTE q('o', now(), now(), uuidv7(), 'u')").fetchall())
    assert index in plan, plan
