"""Rebuilds the usage summary tables from the attribution rows they sum.

The server never needs this: every charge adds to the summaries in its own
transaction (add_usage_to_summaries, migrations/functions/30_deductions.sql).
Bulk loaders do: rows written straight into credit_usage_attribution, at times
of their choosing (benchmarks' seed data, tests of time ranges), then
summarized here in one pass, with the same buckets as the ledger's function.
"""

import psycopg

_SUMMARIES = {
    "usage_daily": """
        INSERT INTO usage_daily (org_id, day, service_type, service_name,
                                 used_millicredits, request_count)
        SELECT org_id, (created_at AT TIME ZONE 'UTC')::date, service_type, service_name,
               sum(amount_millicredits), count(*)
          FROM credit_usage_attribution WHERE {where}
         GROUP BY 1, 2, 3, 4""",
    "user_usage_daily": """
        INSERT INTO user_usage_daily (org_id, day, user_id, service_type, service_name,
                                      used_millicredits, request_count, last_used_at)
        SELECT org_id, (created_at AT TIME ZONE 'UTC')::date, user_id, service_type,
               service_name, sum(amount_millicredits), count(*), max(created_at)
          FROM credit_usage_attribution WHERE {where}
         GROUP BY 1, 2, 3, 4, 5""",
    "user_usage_monthly": """
        INSERT INTO user_usage_monthly (org_id, month, user_id, service_type, service_name,
                                        used_millicredits, request_count, last_used_at)
        SELECT org_id, date_trunc('month', created_at AT TIME ZONE 'UTC')::date, user_id,
               service_type, service_name, sum(amount_millicredits), count(*), max(created_at)
          FROM credit_usage_attribution WHERE {where}
         GROUP BY 1, 2, 3, 4, 5""",
}


def rebuild_usage_summaries(conn: psycopg.Connection, *, org_ids: list[str] | None = None) -> None:
    """Replaces the summaries of `org_ids` (all organizations when None) with
    sums of their attribution rows, in the caller's transaction. Callers must
    keep deductions of those organizations out meanwhile (a bulk load, a
    test): a charge in flight meanwhile would be missed or summed twice."""
    where, params = ("true", ()) if org_ids is None else ("org_id = ANY(%s)", (list(org_ids),))
    with conn.transaction():
        for table, insert in _SUMMARIES.items():
            conn.execute(f"DELETE FROM {table} WHERE {where}", params)
            conn.execute(insert.format(where=where), params)
