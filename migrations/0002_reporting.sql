-- Reporting: summary tables of usage, the indexes the reports read through,
-- and invoices from the external billing system.
--
-- Summary tables. A year of the largest organization is over a million
-- attribution rows, too many to add up within a report's budget, so usage is
-- also kept summed. Each summary is written in the same transaction as the
-- attribution rows it sums (add_usage_to_summaries,
-- functions/30_deductions.sql), once per batch and user, under the pool lock
-- the deduction already holds, so it can never disagree with them;
-- `orgbilling verify` checks that it does not.
--
--   usage_daily          per organization, UTC day and service: an org's
--                        totals, breakdowns and daily series, whole days;
--   org_usage_running    per organization and UTC day, the running totals
--                        up to that day: any org's usage over any whole days
--                        in two lookups (top organizations);
--   user_usage_running   the same per user: a user's usage over any whole
--                        days in two lookups, so the users of a range cost
--                        two lookups per user of the org, however long the
--                        range. Per-bucket sums could not do that: users
--                        spend a little on most days, so a year of the
--                        largest org holds about as many user-day buckets
--                        as deductions (measured: 9.1M for 10M);
--   user_usage_daily,    per user, service and UTC day or month: which
--   user_usage_monthly   services a user used (services_used of the top
--                        users), read for those users only.
--
-- A report over [start, end) adds whole days from these and the raw rows of
-- the partial days at its edges (functions/60_reporting.sql).
CREATE TABLE usage_daily (
    org_id             text NOT NULL,
    day                date NOT NULL,
    service_type       text NOT NULL,
    service_name       text NOT NULL,
    used_millicredits  bigint NOT NULL,
    request_count      bigint NOT NULL,
    PRIMARY KEY (org_id, day, service_type, service_name)
);

-- One row per organization and UTC day with usage: everything up to the end
-- of that day.
CREATE TABLE org_usage_running (
    org_id                   text NOT NULL,
    day                      date NOT NULL,
    used_millicredits_total  bigint NOT NULL,
    request_count_total      bigint NOT NULL,
    PRIMARY KEY (org_id, day)
);

-- One row per user and UTC day with usage: everything up to the end of that
-- day, and the last use on that day.
CREATE TABLE user_usage_running (
    org_id                   text NOT NULL,
    user_id                  text NOT NULL,
    day                      date NOT NULL,
    used_millicredits_total  bigint NOT NULL,
    request_count_total      bigint NOT NULL,
    last_used_at             timestamptz NOT NULL,
    PRIMARY KEY (org_id, user_id, day)
);

CREATE TABLE user_usage_daily (
    org_id             text NOT NULL,
    user_id            text NOT NULL,
    day                date NOT NULL,
    service_type       text NOT NULL,
    service_name       text NOT NULL,
    used_millicredits  bigint NOT NULL,
    request_count      bigint NOT NULL,
    last_used_at       timestamptz NOT NULL,
    PRIMARY KEY (org_id, user_id, day, service_type, service_name)
);

CREATE TABLE user_usage_monthly (
    org_id             text NOT NULL,
    user_id            text NOT NULL,
    -- The first day of the UTC month.
    month              date NOT NULL CHECK (extract(day FROM month) = 1),
    service_type       text NOT NULL,
    service_name       text NOT NULL,
    used_millicredits  bigint NOT NULL,
    request_count      bigint NOT NULL,
    last_used_at       timestamptz NOT NULL,
    PRIMARY KEY (org_id, user_id, month, service_type, service_name)
);

-- Keyset pages and exports, newest or oldest first, over an organization's
-- deductions, all of them or one user's. These are the first indexes besides
-- the primary key to lead with org_id, and the ledger's key lookup must not
-- use them (see the top of 0001_baseline.sql): planned on an empty table, its
-- generic plan chose one of them (measured: tests/test_reporting_plans.py),
-- and would keep it until the next ANALYZE. Hence the predicate: always true
-- (the column is NOT NULL), but the planner uses a partial index only for a
-- query that implies it, and only a query that constrains created_at does.
-- Every report query does; the ledger's lookups never do.
CREATE INDEX credit_usage_attribution_by_time
    ON credit_usage_attribution (org_id, created_at, deduction_id)
    WHERE created_at IS NOT NULL;
CREATE INDEX credit_usage_attribution_by_user_time
    ON credit_usage_attribution (org_id, user_id, created_at, deduction_id)
    WHERE created_at IS NOT NULL;

-- GetUserBilling: a user's allocations across organizations. Not unique and
-- not led by org_id, which a distributed table allows.
CREATE INDEX user_credit_allocations_by_user ON user_credit_allocations (user_id);

-- Billing history, newest first.
CREATE INDEX org_billing_history_by_time ON org_billing_history (org_id, created_at, event_id);

-- Invoices of the external billing system (Lago, Stripe), one row per
-- invoice with its latest status; each status change is also an event in
-- billing history.
CREATE TABLE invoices (
    org_id               text NOT NULL REFERENCES organizations,
    external_invoice_id  text NOT NULL CHECK (external_invoice_id ~ '^[\x21-\x7e]{1,128}$'),
    status               text NOT NULL CHECK (status IN ('CREATED', 'PAID', 'FAILED', 'VOIDED')),
    amount_cents         bigint NOT NULL CHECK (amount_cents BETWEEN 0 AND 10000000000000),
    currency             text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    period_start         timestamptz NOT NULL,
    period_end           timestamptz NOT NULL,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, external_invoice_id),
    CHECK (period_end > period_start)
);

ALTER TABLE org_billing_history ADD COLUMN external_invoice_id text;
ALTER TABLE org_billing_history DROP CONSTRAINT org_billing_history_event_type_check;
ALTER TABLE org_billing_history ADD CONSTRAINT org_billing_history_event_type_check
    CHECK (event_type IN (
        'SUBSCRIPTION_CREATED', 'SUBSCRIPTION_UPGRADED', 'SUBSCRIPTION_DOWNGRADED',
        'SUBSCRIPTION_CHANGED', 'SUBSCRIPTION_CANCELED', 'CREDITS_ADDED',
        'ALLOCATION_CHANGED', 'ALLOCATION_REVOKED', 'PERIOD_RESET',
        'INVOICE_CREATED', 'INVOICE_PAID', 'INVOICE_PAYMENT_FAILED', 'INVOICE_VOIDED'));
ALTER TABLE org_billing_history ADD CONSTRAINT org_billing_history_invoice_events
    CHECK ((event_type LIKE 'INVOICE\_%') = (external_invoice_id IS NOT NULL));

-- One event per invoice and status: what makes RecordInvoice idempotent,
-- kept forever (idempotency records expire).
CREATE UNIQUE INDEX org_billing_history_one_invoice_event
    ON org_billing_history (org_id, external_invoice_id, event_type)
    WHERE external_invoice_id IS NOT NULL;
