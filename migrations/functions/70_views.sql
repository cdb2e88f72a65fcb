-- Repeatable: this file holds the one current definition of each of its
-- views, and the migration runner (server/migrate.py) re-applies it whole
-- whenever its checksum changes. Each view is dropped and created anew
-- (CREATE OR REPLACE VIEW cannot remove or retype a column); nothing in the
-- schema depends on a view, so dropping one never cascades.

-- The four views of the old billing module, under their old names, for the
-- people and dashboards that query the database directly; corrected:
--   * amounts in bigint millicredits, never float dollars;
--   * "the last 30 days" as the reports mean it (last_30_days(), in
--     60_reporting.sql), read from the summary tables;
--   * every figure computed on its own (the old org_billing_metrics joined
--     billing history and attribution rows on the organization, so each sum
--     was multiplied by the other table's row count);
--   * a period due for a reset shows as reset (allocation_json_now), as the
--     API shows it.

-- Per organization: its live plan and status (NULL when it has none), its
-- pool, the users it allocates to and its lifetime spend (the pool's used:
-- every deduction, net of refunds). ListOrgSummaries pages through it by
-- org_id: the per-organization figures are lookups by key, so a page costs
-- its own rows only.
DROP VIEW IF EXISTS org_billing_summary;
CREATE VIEW org_billing_summary AS
SELECT o.org_id,
       s.plan,
       s.status,
       s.billing_cycle,
       s.price_cents,
       s.currency,
       p.total_millicredits,
       p.allocated_millicredits,
       p.used_millicredits,
       p.reserved_millicredits,
       p.overage_limit_millicredits,
       p.overage_rate_millicents_per_credit,
       -- The overage in use now: used and reserved beyond total.
       greatest(0, p.used_millicredits + p.reserved_millicredits
                   - p.total_millicredits) AS overage_used_millicredits,
       greatest(0, p.total_millicredits + p.overage_limit_millicredits
                   - p.used_millicredits - p.reserved_millicredits) AS spendable_millicredits,
       greatest(0, p.total_millicredits - p.allocated_millicredits) AS unallocated_millicredits,
       (SELECT count(*) FROM user_credit_allocations AS a
         WHERE a.org_id = o.org_id AND a.revoked_at IS NULL) AS users_allocated,
       p.used_millicredits AS lifetime_used_millicredits
  FROM organizations AS o
  JOIN organization_credit_pools AS p ON p.org_id = o.org_id
  LEFT JOIN organization_subscriptions AS s
         ON s.org_id = o.org_id AND s.status IN ('TRIALING', 'ACTIVE', 'PAST_DUE');

-- Per user and organization (live allocations): the limit, what is used this
-- period and what remains (never below 0, even when a limit was lowered
-- below what is used), with the organization's live plan and price.
DROP VIEW IF EXISTS user_multi_org_credits;
CREATE VIEW user_multi_org_credits AS
SELECT a.user_id,
       a.org_id,
       a.limit_millicredits,
       n.used AS used_millicredits,
       a.reserved_millicredits,
       greatest(0, a.limit_millicredits - n.used - a.reserved_millicredits) AS remaining_millicredits,
       a.reset_period,
       s.plan,
       s.billing_cycle,
       s.price_cents,
       s.currency
  FROM user_credit_allocations AS a
 CROSS JOIN LATERAL (SELECT CASE WHEN a.next_reset_at <= ledger_now() THEN 0
                                 ELSE a.used_millicredits END AS used) AS n
  LEFT JOIN organization_subscriptions AS s
         ON s.org_id = a.org_id AND s.status IN ('TRIALING', 'ACTIVE', 'PAST_DUE')
 WHERE a.revoked_at IS NULL;

-- Per organization and user with usage in the last 30 days: what the user
-- used, and the user's rank in the organization (1: the most; ties share a
-- rank).
DROP VIEW IF EXISTS top_credit_users_by_org;
CREATE VIEW top_credit_users_by_org AS
SELECT u.org_id,
       u.user_id,
       u.used_millicredits,
       u.request_count,
       rank() OVER (PARTITION BY u.org_id ORDER BY u.used_millicredits DESC) AS usage_rank
  FROM (SELECT d.org_id, d.user_id, sum(d.used_millicredits)::bigint AS used_millicredits,
               sum(d.request_count)::bigint AS request_count
          FROM last_30_days() AS w
          JOIN user_usage_daily AS d ON d.day >= w.days_from AND d.day < w.days_to
         GROUP BY d.org_id, d.user_id) AS u;

-- Per organization, over the last 30 days: invoices, revenue paid (per
-- currency), failed payments, credits used, deductions and active users,
-- each computed on its own (org_metrics_between, as GetOrgBillingMetrics).
DROP VIEW IF EXISTS org_billing_metrics;
CREATE VIEW org_billing_metrics AS
SELECT o.org_id, m.invoice_count, m.revenue_paid, m.failed_payment_count,
       m.used_millicredits, m.request_count, m.active_users
  FROM organizations AS o
 CROSS JOIN last_30_days() AS w
 CROSS JOIN LATERAL org_metrics_between(o.org_id, w.start_at, w.end_at) AS m;
