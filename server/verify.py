"""Checks the ledger's invariants for every organization, read-only.

Each query returns the rows that break one invariant; a healthy ledger
returns none from all of them.
"""

import psycopg

# Refunds are attribution rows too (negative amounts, 0004_refunds.sql): they
# count in every sum and last use, but are no request.
_REQUESTS = "count(*) FILTER (WHERE refund_of IS NULL)"


def _summary_differences(table: str, bucket: str, per_user: bool) -> str:
    """The buckets where a summary table and the attribution rows it sums
    disagree: a full join of the two, so a bucket missing on either side is
    found too."""
    user = "user_id" if per_user else "''"
    return f"""
        WITH raw AS (
            SELECT org_id, date_trunc('{bucket}', created_at AT TIME ZONE 'UTC')::date AS bucket,
                   {user} AS user_id, service_type, service_name,
                   sum(amount_millicredits) AS used, {_REQUESTS} AS requests,
                   {"max(created_at)" if per_user else "NULL::timestamptz"} AS last_used
              FROM credit_usage_attribution
             GROUP BY 1, 2, 3, 4, 5),
        summary AS (
            SELECT org_id, {bucket} AS bucket, {user} AS user_id, service_type, service_name,
                   used_millicredits AS used, request_count AS requests,
                   {"last_used_at" if per_user else "NULL::timestamptz"} AS last_used
              FROM {table})
        SELECT * FROM raw FULL JOIN summary USING (org_id, bucket, user_id, service_type, service_name)
         WHERE raw.used IS DISTINCT FROM summary.used
            OR raw.requests IS DISTINCT FROM summary.requests
            OR raw.last_used IS DISTINCT FROM summary.last_used"""


def _running_differences(table: str, per_user: bool) -> str:
    """The days where a running-total table disagrees with the running sums
    of the attribution rows (and, per user, with the day's last use)."""
    keys = "org_id, user_id" if per_user else "org_id"
    return f"""
        WITH raw AS (
            SELECT {keys}, day, sum(used) OVER running AS used, sum(requests) OVER running AS requests,
                   last_used
              FROM (SELECT {keys}, (created_at AT TIME ZONE 'UTC')::date AS day,
                           sum(amount_millicredits) AS used, {_REQUESTS} AS requests,
                           {"max(created_at)" if per_user else "NULL::timestamptz"} AS last_used
                      FROM credit_usage_attribution GROUP BY {keys}, day) AS d
            WINDOW running AS (PARTITION BY {keys} ORDER BY day)),
        summary AS (
            SELECT {keys}, day, used_millicredits_total AS used, request_count_total AS requests,
                   {"last_used_at" if per_user else "NULL::timestamptz"} AS last_used
              FROM {table})
        SELECT * FROM raw FULL JOIN summary USING ({keys}, day)
         WHERE raw.used IS DISTINCT FROM summary.used
            OR raw.requests IS DISTINCT FROM summary.requests
            OR raw.last_used IS DISTINCT FROM summary.last_used"""


INVARIANT_QUERIES: dict[str, str] = {
    "pool total equals the sum of its credit events": """
        SELECT p.org_id, p.total_millicredits, coalesce(sum(h.credits_delta_millicredits), 0)
          FROM organization_credit_pools p
          LEFT JOIN org_billing_history h ON h.org_id = p.org_id
         GROUP BY p.org_id, p.total_millicredits
        HAVING p.total_millicredits <> coalesce(sum(h.credits_delta_millicredits), 0)""",
    "pool used equals the sum of its attributions net of refunds": """
        SELECT p.org_id, p.used_millicredits, coalesce(sum(u.amount_millicredits), 0)
          FROM organization_credit_pools p
          LEFT JOIN credit_usage_attribution u ON u.org_id = p.org_id
         GROUP BY p.org_id, p.used_millicredits
        HAVING p.used_millicredits <> coalesce(sum(u.amount_millicredits), 0)""",
    "pool allocated equals the sum of its users' limits": """
        SELECT p.org_id, p.allocated_millicredits, coalesce(sum(a.limit_millicredits), 0)
          FROM organization_credit_pools p
          LEFT JOIN user_credit_allocations a ON a.org_id = p.org_id
         GROUP BY p.org_id, p.allocated_millicredits
        HAVING p.allocated_millicredits <> coalesce(sum(a.limit_millicredits), 0)""",
    "pool reserved equals the sum of its users' reservations": """
        SELECT p.org_id, p.reserved_millicredits, coalesce(sum(a.reserved_millicredits), 0)
          FROM organization_credit_pools p
          LEFT JOIN user_credit_allocations a ON a.org_id = p.org_id
         GROUP BY p.org_id, p.reserved_millicredits
        HAVING p.reserved_millicredits <> coalesce(sum(a.reserved_millicredits), 0)""",
    # A refund belongs to the period it was made in, and takes off that
    # period's used what it recorded (all of it for a deduction of the same
    # period, at most what was used for an earlier one: 37_refunds.sql).
    "allocation used equals this period's charges less this period's refunds": """
        SELECT a.org_id, a.user_id, a.used_millicredits, coalesce(sum(u.charged), 0)
          FROM user_credit_allocations a
          LEFT JOIN LATERAL (
              SELECT CASE WHEN c.refund_of IS NULL THEN c.amount_millicredits
                          ELSE -c.allocation_refund_millicredits END AS charged
                FROM credit_usage_attribution c
               WHERE c.org_id = a.org_id AND c.user_id = a.user_id
                 AND c.allocation_period = a.period_number) u ON true
         GROUP BY a.org_id, a.user_id, a.used_millicredits
        HAVING a.used_millicredits <> coalesce(sum(u.charged), 0)""",
    "no deduction is refunded more than it charged, and each refund is its deduction's": """
        SELECT r.org_id, r.refund_of, d.deduction_id, d.amount_millicredits, -sum(r.amount_millicredits)
          FROM credit_usage_attribution r
          LEFT JOIN credit_usage_attribution d
            ON d.org_id = r.org_id AND d.deduction_id = r.refund_of AND d.refund_of IS NULL
           AND d.user_id = r.user_id AND d.service_type = r.service_type
           AND d.service_name = r.service_name
         WHERE r.refund_of IS NOT NULL
         GROUP BY r.org_id, r.refund_of, d.deduction_id, d.amount_millicredits
        HAVING d.deduction_id IS NULL OR -sum(r.amount_millicredits) > d.amount_millicredits""",
    "each refund has exactly its one REFUND event in billing history": """
        SELECT r.org_id, r.deduction_id, h.event_id
          FROM (SELECT * FROM credit_usage_attribution WHERE refund_of IS NOT NULL) r
          FULL JOIN (SELECT * FROM org_billing_history WHERE event_type = 'REFUND') h
            ON h.org_id = r.org_id AND (h.details ->> 'refund_id')::uuid = r.deduction_id
           AND (h.details ->> 'deduction_id')::uuid = r.refund_of
           AND (h.details ->> 'amount_millicredits')::bigint = -r.amount_millicredits
         WHERE r.deduction_id IS NULL OR h.event_id IS NULL""",
    **{
        f"{table} equals the attribution rows it sums": _summary_differences(table, bucket, per_user)
        for table, bucket, per_user in (
            ("usage_daily", "day", False),
            ("user_usage_daily", "day", True),
            ("user_usage_monthly", "month", True),
        )
    },
    **{
        f"{table} equals the running sums of the attribution rows": _running_differences(table, per_user)
        for table, per_user in (("org_usage_running", False), ("user_usage_running", True))
    },
    # Reservations (0003_reservations.sql). Reserved is the sum of OPEN rows:
    # an expired one not yet persisted still counts on disk, and every reader
    # and writer treats it as released (35_reservations.sql).
    "pool reserved equals the sum of its open holds": """
        SELECT p.org_id, p.reserved_millicredits, coalesce(sum(r.amount_millicredits), 0)
          FROM organization_credit_pools p
          LEFT JOIN credit_reservations r ON r.org_id = p.org_id AND r.state = 'OPEN'
         GROUP BY p.org_id, p.reserved_millicredits
        HAVING p.reserved_millicredits <> coalesce(sum(r.amount_millicredits), 0)""",
    "allocation reserved equals the sum of its open holds": """
        SELECT a.org_id, a.user_id, a.reserved_millicredits, coalesce(sum(r.amount_millicredits), 0)
          FROM user_credit_allocations a
          LEFT JOIN credit_reservations r
            ON r.org_id = a.org_id AND r.user_id = a.user_id AND r.state = 'OPEN'
         GROUP BY a.org_id, a.user_id, a.reserved_millicredits
        HAVING a.reserved_millicredits <> coalesce(sum(r.amount_millicredits), 0)""",
    "each committed hold has exactly its one attribution row, and only those": """
        SELECT r.org_id, r.reservation_id, r.state, u.deduction_id, u.amount_millicredits
          FROM credit_reservations r
          FULL JOIN (SELECT * FROM credit_usage_attribution WHERE reservation_id IS NOT NULL) u
            ON u.org_id = r.org_id AND u.reservation_id = r.reservation_id
         WHERE r.reservation_id IS NULL OR u.deduction_id IS NULL AND r.state = 'COMMITTED'
            OR u.deduction_id IS NOT NULL AND (r.state <> 'COMMITTED'
               OR u.deduction_id <> r.deduction_id
               OR u.amount_millicredits <> r.committed_millicredits
               OR u.user_id <> r.user_id)""",
    "no expired hold resolved at another time than its expiry": """
        SELECT org_id, reservation_id FROM credit_reservations
         WHERE state = 'EXPIRED' AND resolved_at <> expires_at""",
    "no pool balance is negative": """
        SELECT org_id FROM organization_credit_pools
         WHERE used_millicredits + reserved_millicredits
               > total_millicredits + overage_limit_millicredits""",
    # Periods and refreshes (0007_periods_and_refresh.sql).
    "a pool's period end is its live subscription's, and none without one": """
        SELECT p.org_id, p.period_ends_at, s.current_period_end
          FROM organization_credit_pools p
          LEFT JOIN organization_subscriptions s
            ON s.org_id = p.org_id AND s.status IN ('TRIALING', 'ACTIVE', 'PAST_DUE')
         WHERE p.period_ends_at IS DISTINCT FROM s.current_period_end""",
    "each subscription period is whole cycles from its anchor, the one after the last": """
        SELECT org_id, subscription_id, current_period_start, current_period_end
          FROM organization_subscriptions
         WHERE current_period_end <> cycles_after(period_anchor, billing_cycle, periods_from_anchor)
            OR current_period_start >= current_period_end""",
    "each period after the first was renewed once and refreshed at most once": """
        SELECT s.org_id, s.subscription_id, h.period_start_us, h.renewals, h.refreshes
          FROM organization_subscriptions s
          JOIN (SELECT org_id, subscription_id, details ->> 'period_start_us' AS period_start_us,
                       count(*) FILTER (WHERE event_type = 'SUBSCRIPTION_RENEWED') AS renewals,
                       count(*) FILTER (WHERE credit_source = 'REFRESH') AS refreshes
                  FROM org_billing_history
                 WHERE event_type = 'SUBSCRIPTION_RENEWED' OR credit_source IN ('REFRESH', 'LAPSE')
                 GROUP BY 1, 2, 3) h USING (org_id, subscription_id)
         WHERE h.refreshes > 1 OR h.renewals > 1
            OR h.renewals = 0 AND h.period_start_us::bigint <> epoch_micros(s.created_at)""",
    "each organization has at most one live subscription": """
        SELECT org_id FROM organization_subscriptions
         WHERE status IN ('TRIALING', 'ACTIVE', 'PAST_DUE')
         GROUP BY org_id HAVING count(*) > 1""",
}


def violations(database_url: str) -> dict[str, list[tuple]]:
    """Every invariant that is broken, with the rows that break it."""
    found = {}
    with psycopg.connect(database_url, autocommit=True) as conn:
        # One snapshot for all checks, so a running server cannot make them disagree.
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            for name, sql in INVARIANT_QUERIES.items():
                rows = conn.execute(sql).fetchall()
                if rows:
                    found[name] = rows
    return found
