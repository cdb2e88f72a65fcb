-- Repeatable: this file holds the one current definition of each of its
-- functions, and the migration runner (server/migrate.py) re-applies it whole
-- whenever its checksum changes. To change a function, edit it here, never in
-- a versioned migration. Settings are written in the CREATE, as SET lines
-- before the body: CREATE OR REPLACE resets any set otherwise. CREATE OR
-- REPLACE cannot change a function's arguments or result type: to change
-- them, or to remove a function, this file drops the old signature itself
-- (DROP FUNCTION IF EXISTS name(old argument types)) before the new CREATE.

-- Reporting: the figures of ReportingService (server/report_store.py calls
-- them; docs/reporting.md says what each means). Read only.
--
-- A range [start, end) of one organization's usage is read in parts, so that
-- a year of the largest organization (over a million attribution rows) reads
-- a few thousand summary rows instead (0002_reporting.sql):
--
--   start    first midnight                                 last midnight   end
--     |  raw   |               whole UTC days                  |      raw      |
--
--   * the partial days at the edges: raw attribution rows, through the index
--     (org_id, created_at, deduction_id);
--   * whole days, organization figures (totals, breakdowns, the daily
--     series): usage_daily, a row per day and service;
--   * whole days, user figures (active users, top users): the difference of
--     two running totals per user of the organization (user_usage_running),
--     whatever the range's length;
--   * services used by the top users: user_usage_monthly for whole months,
--     user_usage_daily for the whole days of partial months, for those users
--     only.
--
-- Building blocks (usage_range_parts, usage_edge_rows, org_usage_buckets,
-- user_usage_over_days, org_usage_over_days, user_usage_between,
-- last_30_days) are plain STABLE SQL with no settings, so the planner
-- inlines them into the report that calls them and plans the whole as one
-- query. Reports that read one organization's rows out of the big tables
-- carry SET enable_seqscan = off, for the reason given in 30_deductions.sql:
-- a plan cached while a table was small (a new database) must not stay a
-- sequential scan as it grows. The report over every subscription
-- (subscriptions_by_plan) keeps the planner's choice: reading all of a small
-- table is what it does.

-- The parts of [p_start, p_end), as above: raw rows in [p_start, head_end)
-- and [tail_start, p_end); whole UTC days [days_from, days_to); whole UTC
-- months [months_from, months_to), within those days. An empty part has
-- from >= to. Arithmetic on timestamps without time zone, in UTC, so that no
-- session's TimeZone can move a boundary.
CREATE OR REPLACE FUNCTION usage_range_parts(p_start timestamptz, p_end timestamptz)
RETURNS TABLE (head_end timestamptz, days_from date, days_to date,
               months_from date, months_to date, tail_start timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT least(p_end, d.days_from::timestamp AT TIME ZONE 'UTC'),
           d.days_from, d.days_to,
           (date_trunc('month', (d.days_from - 1)::timestamp) + interval '1 month')::date,
           date_trunc('month', d.days_to::timestamp)::date,
           -- Never before head_end: a range within one day is all head.
           greatest(d.days_from, d.days_to)::timestamp AT TIME ZONE 'UTC'
      FROM (SELECT ((p_start AT TIME ZONE 'UTC') - interval '1 microsecond')::date + 1 AS days_from,
                   (p_end AT TIME ZONE 'UTC')::date AS days_to) AS d
$$;

-- The last 30 UTC days, today included: from midnight 29 days before today.
-- It ends at the coming midnight rather than now: no deduction is dated
-- after now (created_at is its transaction's start), so the two hold the
-- same rows, and whole days are answered by the summary tables alone.
CREATE OR REPLACE FUNCTION last_30_days()
RETURNS TABLE (start_at timestamptz, end_at timestamptz, days_from date, days_to date)
LANGUAGE sql STABLE AS $$
    SELECT (t.today - 29)::timestamp AT TIME ZONE 'UTC', (t.today + 1)::timestamp AT TIME ZONE 'UTC',
           t.today - 29, t.today + 1
      FROM (SELECT (ledger_now() AT TIME ZONE 'UTC')::date AS today) AS t
$$;

-- The raw attribution rows of the partial days at the edges of a range.
CREATE OR REPLACE FUNCTION usage_edge_rows(p_org_id text, p_start timestamptz, p_end timestamptz)
RETURNS SETOF credit_usage_attribution
LANGUAGE sql STABLE AS $$
    SELECT c.*
      FROM usage_range_parts(p_start, p_end) AS r
      JOIN credit_usage_attribution AS c
        ON c.org_id = p_org_id AND c.created_at >= p_start AND c.created_at < r.head_end
    UNION ALL
    SELECT c.*
      FROM usage_range_parts(p_start, p_end) AS r
      JOIN credit_usage_attribution AS c
        ON c.org_id = p_org_id AND c.created_at >= r.tail_start AND c.created_at < p_end
$$;

-- An organization's usage in a range, by UTC day and service: a row per
-- summary row of a whole day, a row per raw row of a partial one. Callers
-- sum them. A refund's row (0004_refunds.sql) is negative usage and no request.
CREATE OR REPLACE FUNCTION org_usage_buckets(p_org_id text, p_start timestamptz, p_end timestamptz)
RETURNS TABLE (day date, service_type text, service_name text,
               used_millicredits bigint, request_count bigint)
LANGUAGE sql STABLE AS $$
    SELECT u.day, u.service_type, u.service_name, u.used_millicredits, u.request_count
      FROM usage_range_parts(p_start, p_end) AS r
      JOIN usage_daily AS u
        ON u.org_id = p_org_id AND u.day >= r.days_from AND u.day < r.days_to
    UNION ALL
    SELECT (e.created_at AT TIME ZONE 'UTC')::date, e.service_type, e.service_name,
           e.amount_millicredits, CASE WHEN e.refund_of IS NULL THEN 1 ELSE 0 END
      FROM usage_edge_rows(p_org_id, p_start, p_end) AS e
$$;

-- A user's usage over the whole UTC days [p_from, p_to), p_from < p_to:
-- the latest running total before p_to less the latest before p_from; the
-- last use is the later one's, when it falls in those days.
CREATE OR REPLACE FUNCTION user_usage_over_days(p_org_id text, p_user_id text, p_from date, p_to date)
RETURNS TABLE (used_millicredits bigint, request_count bigint, last_used_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT coalesce(hi.used_millicredits_total, 0) - coalesce(lo.used_millicredits_total, 0),
           coalesce(hi.request_count_total, 0) - coalesce(lo.request_count_total, 0),
           CASE WHEN hi.day >= p_from THEN hi.last_used_at END
      FROM (SELECT) AS one
      LEFT JOIN LATERAL (
          SELECT x.day, x.used_millicredits_total, x.request_count_total, x.last_used_at
            FROM user_usage_running AS x
           WHERE x.org_id = p_org_id AND x.user_id = p_user_id AND x.day < p_to
           ORDER BY x.day DESC LIMIT 1) AS hi ON true
      LEFT JOIN LATERAL (
          SELECT x.used_millicredits_total, x.request_count_total
            FROM user_usage_running AS x
           WHERE x.org_id = p_org_id AND x.user_id = p_user_id AND x.day < p_from
           ORDER BY x.day DESC LIMIT 1) AS lo ON true
$$;

-- The same for an organization, from org_usage_running.
CREATE OR REPLACE FUNCTION org_usage_over_days(p_org_id text, p_from date, p_to date)
RETURNS TABLE (used_millicredits bigint, request_count bigint)
LANGUAGE sql STABLE AS $$
    SELECT coalesce(hi.used_millicredits_total, 0) - coalesce(lo.used_millicredits_total, 0),
           coalesce(hi.request_count_total, 0) - coalesce(lo.request_count_total, 0)
      FROM (SELECT) AS one
      LEFT JOIN LATERAL (
          SELECT x.used_millicredits_total, x.request_count_total
            FROM org_usage_running AS x
           WHERE x.org_id = p_org_id AND x.day < p_to
           ORDER BY x.day DESC LIMIT 1) AS hi ON true
      LEFT JOIN LATERAL (
          SELECT x.used_millicredits_total, x.request_count_total
            FROM org_usage_running AS x
           WHERE x.org_id = p_org_id AND x.day < p_from
           ORDER BY x.day DESC LIMIT 1) AS lo ON true
$$;

-- Each user's usage in a range, for the users with any: whole days by
-- user_usage_over_days (two lookups per user of the organization, however
-- long the range), partial days from the raw rows at the edges. The users
-- are those with an allocation in the organization, live or revoked: every
-- attribution row references one (0001_baseline.sql) and none is deleted.
CREATE OR REPLACE FUNCTION user_usage_between(p_org_id text, p_start timestamptz, p_end timestamptz)
RETURNS TABLE (user_id text, used_millicredits bigint, request_count bigint, last_used_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT u.user_id, sum(u.used)::bigint, sum(u.requests)::bigint, max(u.last_used_at)
      FROM (SELECT a.user_id, d.used_millicredits AS used, d.request_count AS requests,
                   d.last_used_at
              FROM usage_range_parts(p_start, p_end) AS r
              JOIN user_credit_allocations AS a
                ON a.org_id = p_org_id AND r.days_from < r.days_to
             CROSS JOIN LATERAL user_usage_over_days(p_org_id, a.user_id, r.days_from, r.days_to) AS d
            UNION ALL
            SELECT e.user_id, e.amount_millicredits,
                   CASE WHEN e.refund_of IS NULL THEN 1 ELSE 0 END, e.created_at
              FROM usage_edge_rows(p_org_id, p_start, p_end) AS e) AS u
     GROUP BY u.user_id
    HAVING sum(u.requests) > 0
$$;

-- The (service type, service name) pairs each of p_user_ids used in a
-- range, each once: whole months, the whole days of partial months, the raw
-- rows of partial days, read for those users only.
CREATE OR REPLACE FUNCTION user_services_between(p_org_id text, p_user_ids text[],
                                                 p_start timestamptz, p_end timestamptz)
RETURNS TABLE (user_id text, service_type text, service_name text)
LANGUAGE sql STABLE AS $$
    SELECT m.user_id, m.service_type, m.service_name
      FROM usage_range_parts(p_start, p_end) AS r
      JOIN user_usage_monthly AS m
        ON m.org_id = p_org_id AND m.user_id = ANY (p_user_ids)
       AND m.month >= r.months_from AND m.month < r.months_to
    UNION
    -- Whole days before the first whole month (all of them, when there is none).
    SELECT d.user_id, d.service_type, d.service_name
      FROM usage_range_parts(p_start, p_end) AS r
      JOIN user_usage_daily AS d
        ON d.org_id = p_org_id AND d.user_id = ANY (p_user_ids)
       AND d.day >= r.days_from AND d.day < least(r.days_to, r.months_from)
    UNION
    -- Whole days after the last whole month.
    SELECT d.user_id, d.service_type, d.service_name
      FROM usage_range_parts(p_start, p_end) AS r
      JOIN user_usage_daily AS d
        ON d.org_id = p_org_id AND d.user_id = ANY (p_user_ids)
       AND d.day >= greatest(r.months_from, r.months_to) AND d.day < r.days_to
    UNION
    SELECT e.user_id, e.service_type, e.service_name
      FROM usage_edge_rows(p_org_id, p_start, p_end) AS e
     WHERE e.user_id = ANY (p_user_ids)
$$;

-- GetUsageSummary's organization figures in one pass: the total (grouped_by
-- 'total'), per service type, per service name and per UTC day (days with no
-- usage are absent: the caller adds their zeros). Most used first.
CREATE OR REPLACE FUNCTION usage_summary(p_org_id text, p_start timestamptz, p_end timestamptz)
RETURNS TABLE (grouped_by text, day date, service_type text, service_name text,
               used_millicredits bigint, request_count bigint)
LANGUAGE sql STABLE
SET enable_seqscan = off
AS $$
    SELECT CASE GROUPING(b.day, b.service_type, b.service_name)
               WHEN 7 THEN 'total' WHEN 5 THEN 'service_type' WHEN 4 THEN 'service_name'
               ELSE 'day' END,
           b.day, b.service_type, b.service_name,
           coalesce(sum(b.used_millicredits), 0)::bigint, coalesce(sum(b.request_count), 0)::bigint
      FROM org_usage_buckets(p_org_id, p_start, p_end) AS b
     GROUP BY GROUPING SETS ((), (b.service_type), (b.service_type, b.service_name), (b.day))
     ORDER BY 1, 5 DESC, 3, 4, 2
$$;

-- The users who used the most in a range, most first, ties by user id,
-- with the services each used; each row also carries how many users used
-- anything (active_users: counted before the limit).
CREATE OR REPLACE FUNCTION usage_top_users(p_org_id text, p_start timestamptz, p_end timestamptz,
                                           p_limit integer)
RETURNS TABLE (user_id text, used_millicredits bigint, request_count bigint,
               services_used bigint, last_used_at timestamptz, active_users bigint)
LANGUAGE sql STABLE
SET enable_seqscan = off
AS $$
    WITH users AS MATERIALIZED (SELECT * FROM user_usage_between(p_org_id, p_start, p_end)),
         top AS MATERIALIZED (SELECT * FROM users ORDER BY used_millicredits DESC, user_id LIMIT p_limit),
         services AS (
             SELECT s.user_id, count(*) AS services_used
               FROM user_services_between(p_org_id, ARRAY(SELECT t.user_id FROM top AS t),
                                          p_start, p_end) AS s
              GROUP BY s.user_id)
    SELECT t.user_id, t.used_millicredits, t.request_count, coalesce(s.services_used, 0),
           t.last_used_at, (SELECT count(*) FROM users)
      FROM top AS t
      LEFT JOIN services AS s ON s.user_id = t.user_id
     ORDER BY t.used_millicredits DESC, t.user_id
$$;

-- Used, deductions and active users of an organization in a range.
CREATE OR REPLACE FUNCTION usage_totals(p_org_id text, p_start timestamptz, p_end timestamptz)
RETURNS TABLE (used_millicredits bigint, request_count bigint, active_users bigint)
LANGUAGE sql STABLE
SET enable_seqscan = off
AS $$
    SELECT coalesce(sum(b.used_millicredits), 0)::bigint, coalesce(sum(b.request_count), 0)::bigint,
           (SELECT count(*) FROM user_usage_between(p_org_id, p_start, p_end))
      FROM org_usage_buckets(p_org_id, p_start, p_end) AS b
$$;

-- GetOrgBilling: the pool, the live subscription, live allocations and the
-- last 30 days. No row when the organization does not exist.
CREATE OR REPLACE FUNCTION org_billing(p_org_id text)
RETURNS TABLE (pool jsonb, subscription jsonb, allocation_count bigint,
               used_millicredits bigint, request_count bigint, active_users bigint)
LANGUAGE sql STABLE AS $$
    SELECT pool_json_now(p),
           (SELECT subscription_json(s) FROM organization_subscriptions AS s
             WHERE s.org_id = p.org_id AND s.status IN ('TRIALING', 'ACTIVE', 'PAST_DUE')),
           (SELECT count(*) FROM user_credit_allocations AS a
             WHERE a.org_id = p.org_id AND a.revoked_at IS NULL),
           t.used_millicredits, t.request_count, t.active_users
      FROM organization_credit_pools AS p
     CROSS JOIN last_30_days() AS w
     CROSS JOIN LATERAL usage_totals(p.org_id, w.start_at, w.end_at) AS t
     WHERE p.org_id = p_org_id
$$;

-- ListAllocationUsage: an organization's live allocations, most used this
-- period first (a period due for a reset counts as 0), ties by user id; a
-- page continues after (p_after_used, p_after_user_id), NULL for the first.
-- Unindexed order: an organization's allocations are sorted whole, which
-- for its thousands of users is a few milliseconds.
CREATE OR REPLACE FUNCTION allocations_by_use(p_org_id text, p_after_used bigint,
                                              p_after_user_id text, p_limit integer)
RETURNS TABLE (allocation jsonb, used_millicredits bigint)
LANGUAGE sql STABLE
SET enable_seqscan = off
AS $$
    SELECT allocation_json_now(a), n.used
      FROM user_credit_allocations AS a
     CROSS JOIN LATERAL (SELECT CASE WHEN a.next_reset_at <= ledger_now() THEN 0
                                     ELSE a.used_millicredits END AS used) AS n
     WHERE a.org_id = p_org_id AND a.revoked_at IS NULL
       AND (p_after_user_id IS NULL OR n.used < p_after_used
            OR (n.used = p_after_used AND a.user_id > p_after_user_id))
     ORDER BY n.used DESC, a.user_id
     LIMIT p_limit
$$;

-- GetUserBilling: a user's live allocations, in the organizations p_org_ids
-- (NULL: all), with each organization's live plan and price and the user's
-- last 30 days there (two lookups of its running totals).
CREATE OR REPLACE FUNCTION user_billing(p_user_id text, p_org_ids text[])
RETURNS TABLE (allocation jsonb, plan text, price_cents bigint, currency text,
               used_millicredits bigint, request_count bigint)
LANGUAGE sql STABLE
SET enable_seqscan = off
AS $$
    SELECT allocation_json_now(a), s.plan, s.price_cents, s.currency,
           u.used_millicredits, u.request_count
      FROM last_30_days() AS w
      JOIN user_credit_allocations AS a
        ON a.user_id = p_user_id AND a.revoked_at IS NULL
       AND (p_org_ids IS NULL OR a.org_id = ANY (p_org_ids))
      LEFT JOIN organization_subscriptions AS s
        ON s.org_id = a.org_id AND s.status IN ('TRIALING', 'ACTIVE', 'PAST_DUE')
     CROSS JOIN LATERAL user_usage_over_days(a.org_id, a.user_id, w.days_from, w.days_to) AS u
     ORDER BY a.org_id
$$;

-- GetSystemBilling: every subscription ever created, per plan, status and
-- currency, with its annual recurring revenue: 12 monthly prices, or one
-- yearly price (exact; the caller derives MRR from it, rounding once).
CREATE OR REPLACE FUNCTION subscriptions_by_plan()
RETURNS TABLE (plan text, status text, currency text, subscription_count bigint, arr_cents bigint)
LANGUAGE sql STABLE AS $$
    SELECT s.plan, s.status, s.currency, count(*),
           sum(CASE s.billing_cycle WHEN 'MONTHLY' THEN 12 * s.price_cents ELSE s.price_cents END)::bigint
      FROM organization_subscriptions AS s
     GROUP BY 1, 2, 3
     ORDER BY 1, 2, 3
$$;

-- GetSystemBilling: the organizations that used the most in the last 30
-- days, most first, ties by id: two lookups of each organization's running
-- totals, where summing usage_daily would read every day and service of
-- every organization in the window (measured on 10,000 organizations:
-- 540 ms of database CPU).
CREATE OR REPLACE FUNCTION top_orgs_last_30_days(p_limit integer)
RETURNS TABLE (org_id text, used_millicredits bigint, request_count bigint)
LANGUAGE sql STABLE
SET enable_seqscan = off
AS $$
    SELECT o.org_id, u.used_millicredits, u.request_count
      FROM last_30_days() AS w
     CROSS JOIN organizations AS o
     CROSS JOIN LATERAL org_usage_over_days(o.org_id, w.days_from, w.days_to) AS u
     WHERE u.request_count > 0
     ORDER BY 2 DESC, 1
     LIMIT p_limit
$$;

-- GetOrgBillingMetrics (and the view org_billing_metrics): each figure in a
-- subquery of its own, so that none multiplies another (the old view joined
-- history and attribution on the organization, multiplying each sum by the
-- other table's row count). No row when the organization does not exist.
--   invoice_count         invoices first recorded in the range;
--   revenue_paid          {currency: cents} of the INVOICE_PAID events in the
--                         range, the amount the event carries, else its invoice's;
--   failed_payment_count  INVOICE_PAYMENT_FAILED events in the range (one per
--                         invoice: the event is unique per invoice and status).
CREATE OR REPLACE FUNCTION org_metrics_between(p_org_id text, p_start timestamptz, p_end timestamptz)
RETURNS TABLE (invoice_count bigint, revenue_paid jsonb, failed_payment_count bigint,
               used_millicredits bigint, request_count bigint, active_users bigint)
LANGUAGE sql STABLE
SET enable_seqscan = off
AS $$
    SELECT (SELECT count(*) FROM invoices AS i
             WHERE i.org_id = o.org_id AND i.created_at >= p_start AND i.created_at < p_end),
           (SELECT coalesce(jsonb_object_agg(r.currency, r.cents), '{}')
              FROM (SELECT coalesce(h.currency, i.currency) AS currency,
                           sum(coalesce(h.amount_paid_cents, i.amount_cents))::bigint AS cents
                      FROM org_billing_history AS h
                      LEFT JOIN invoices AS i
                        ON i.org_id = h.org_id AND i.external_invoice_id = h.external_invoice_id
                     WHERE h.org_id = o.org_id AND h.event_type = 'INVOICE_PAID'
                       AND h.created_at >= p_start AND h.created_at < p_end
                     GROUP BY 1) AS r),
           (SELECT count(*) FROM org_billing_history AS h
             WHERE h.org_id = o.org_id AND h.event_type = 'INVOICE_PAYMENT_FAILED'
               AND h.created_at >= p_start AND h.created_at < p_end),
           t.used_millicredits, t.request_count, t.active_users
      FROM organizations AS o
     CROSS JOIN LATERAL usage_totals(o.org_id, p_start, p_end) AS t
     WHERE o.org_id = p_org_id
$$;
