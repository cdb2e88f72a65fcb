"""Rebuilds the usage summary tables from the attribution rows they sum.

The server never needs this: every charge adds to the summaries in its own
transaction (add_usage_to_summaries, migrations/functions/30_deductions.sql).
Bulk loaders do: rows written straight into credit_usage_attribution, at times
of their choosing (benchmarks' seed data, tests of time ranges), then
summarized here in one pass, with the same buckets as the ledger's function. Refunds (negative rows,
0004_refunds.sql) are summed in but count no request.
"""

import psycopg

_SUMMARIES = {
    "usage_daily": """
        INSERT INTO usage_daily (org_id, day, service_type, service_name,
                                 used_millicredits, request_count)
        SELECT org_id, (created_at AT TIME ZONE 'UTC')::date, service_type, service_name,
               sum(amount_millicredits), count(*) FILTER (WHERE refund_of IS NULL)
          FROM credit_usage_attribution WHERE {where}
         GROUP BY 1, 2, 3, 4""",
    "user_usage_daily": """
        INSERT INTO user_usage_daily (org_id, user_id, day, service_type, service_name,
                                      used_millicredits, request_count, last_used_at)
        SELECT org_id, user_id, (created_at AT TIME ZONE 'UTC')::date, service_type,
               service_name, sum(amount_millicredits), count(*) FILTER (WHERE refund_of IS NULL), max(created_at)
          FROM credit_usage_attribution WHERE {where}
         GROUP BY 1, 2, 3, 4, 5""",
    "user_usage_monthly": """
        INSERT INTO user_usage_monthly (org_id, user_id, month, service_type, service_name,
                                        used_millicredits, request_count, last_used_at)
        SELECT org_id, user_id, date_trunc('month', created_at AT TIME ZONE 'UTC')::date,
               service_type, service_name, sum(amount_millicredits), count(*) FILTER (WHERE refund_of IS NULL), max(created_at)
          FROM credit_usage_attribution WHERE {where}
         GROUP BY 1, 2, 3, 4, 5""",
    "org_usage_running": """
        INSERT INTO org_usage_running (org_id, day, used_millicredits_total, request_count_total)
        SELECT org_id, day, sum(used) OVER running, sum(requests) OVER running
          FROM (SELECT org_id, (created_at AT TIME ZONE 'UTC')::date AS day,
                       sum(amount_millicredits) AS used, count(*) FILTER (WHERE refund_of IS NULL) AS requests
                  FROM credit_usage_attribution WHERE {where}
                 GROUP BY 1, 2) AS d
        WINDOW running AS (PARTITION BY org_id ORDER BY day)""",
    "user_usage_running": """
        INSERT INTO user_usage_running (org_id, user_id, day, used_millicredits_total,
                                        request_count_total, last_used_at)
        SELECT org_id, user_id, day, sum(used) OVER running, sum(requests) OVER running,
               last_used_at
          FROM (SELECT org_id, user_id, (created_at AT TIME ZONE 'UTC')::date AS day,
                       sum(amount_millicredits) AS used, count(*) FILTER (WHERE refund_of IS NULL) AS requests,
                       max(created_at) AS last_used_at
                  FROM credit_usage_attribution WHERE {where}
                 GROUP BY 1, 2, 3) AS d
        WINDOW running AS (PARTITION BY org_id, user_id ORDER BY day)""",
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
