-- Repeatable: this file holds the one current definition of each of its
-- functions, and the migration runner (server/migrate.py) re-applies it whole
-- whenever its checksum changes. To change a function, edit it here, never in
-- a versioned migration. Settings are written in the CREATE, as SET lines
-- before the body: CREATE OR REPLACE resets any set otherwise. CREATE OR
-- REPLACE cannot change a function's arguments or result type: to change
-- them, or to remove a function, this file drops the old signature itself
-- (DROP FUNCTION IF EXISTS name(old argument types)) before the new CREATE.

-- The ledger's operations, one file per concern: 20_idempotency.sql,
-- 30_deductions.sql, 40_pools_and_allocations.sql, 50_subscriptions.sql,
-- 55_invoices.sql; the reports' reads in 60_reporting.sql and the views for
-- people who query the database in 70_views.sql; this one holds what several
-- of them share. Each mutation is one function, called
-- as one statement, so it is one short transaction with no network call
-- inside. Rules every function follows:
--   * locks are taken in one order: the pool row, then the allocation row, so
--     two calls can never deadlock;
--   * amounts are checked to be positive (or non-zero) and at most 10^15, so
--     no sum can overflow bigint;
--   * the idempotency key is checked after the pool lock, so two calls with
--     the same key are serialized and the second sees the first's record;
--   * business refusals are returned as an outcome, never raised, so a batch
--     can carry on past an item that fails.
--
-- SQL-language functions are checked against what they call when created,
-- so a helper comes before its callers (files apply in name order).

CREATE OR REPLACE FUNCTION next_reset_after(p_period text, p_at timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE AS $$
    SELECT (CASE p_period
        WHEN 'DAILY'   THEN date_trunc('day',   p_at AT TIME ZONE 'UTC') + interval '1 day'
        WHEN 'WEEKLY'  THEN date_trunc('week',  p_at AT TIME ZONE 'UTC') + interval '7 days'
        WHEN 'MONTHLY' THEN date_trunc('month', p_at AT TIME ZONE 'UTC') + interval '1 month'
    END) AT TIME ZONE 'UTC'
$$;

-- The instant p_cycles billing cycles after p_anchor, in UTC calendar months
-- or years: from the 31st of January, one month is the 28th (or 29th) of
-- February and two are the 31st of March; from the 29th of February, one
-- year is the 28th of February and four are the 29th again.
CREATE OR REPLACE FUNCTION cycles_after(p_anchor timestamptz, p_cycle text, p_cycles integer)
RETURNS timestamptz
LANGUAGE sql IMMUTABLE AS $$
    SELECT ((p_anchor AT TIME ZONE 'UTC')
            + p_cycles * CASE p_cycle WHEN 'YEARLY' THEN interval '1 year' ELSE interval '1 month' END)
           AT TIME ZONE 'UTC'
$$;

CREATE OR REPLACE FUNCTION epoch_micros(p_at timestamptz) RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$
    SELECT floor(extract(epoch FROM p_at) * 1000000)::bigint
$$;

-- The JSON shapes store.py reads back: results of the administrative
-- functions, stored as is under their idempotency keys for replays.
-- The refresh is the org's own, or else its live subscription's plan's.
-- What is left of the refreshed credits: they are spent first, so what was
-- spent since the period's start comes off them first (0007).
CREATE OR REPLACE FUNCTION pool_json(p organization_credit_pools) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'org_id', p.org_id,
        'total', p.total_millicredits,
        'allocated', p.allocated_millicredits,
        'used', p.used_millicredits,
        'reserved', p.reserved_millicredits,
        'overage_limit', p.overage_limit_millicredits,
        'overage_rate', p.overage_rate_millicents_per_credit,
        'refresh', coalesce(p.refresh_override_millicredits,
                            (SELECT s.refresh_millicredits FROM organization_subscriptions AS s
                              WHERE s.org_id = p.org_id
                                AND s.status IN ('TRIALING', 'ACTIVE', 'PAST_DUE')), 0),
        'refresh_overridden', p.refresh_override_millicredits IS NOT NULL,
        'rollover_cap', p.rollover_cap_millicredits,
        'refresh_unspent', greatest(0, least(
            p.refresh_balance_millicredits
            - (p.used_millicredits - p.used_at_period_start_millicredits),
            p.total_millicredits - p.used_millicredits)),
        'next_refresh_at_us', epoch_micros(p.period_ends_at))
$$;

CREATE OR REPLACE FUNCTION allocation_json(a user_credit_allocations) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object(
        'org_id', a.org_id,
        'user_id', a.user_id,
        'limit', a.limit_millicredits,
        'used', a.used_millicredits,
        'reserved', a.reserved_millicredits,
        'reset_period', a.reset_period,
        'next_reset_at_us', epoch_micros(a.next_reset_at),
        'revoked', a.revoked_at IS NOT NULL)
$$;

-- An allocation as allocation_json shows it, as of now: a period whose
-- reset time has passed shows as reset (used 0, the next reset time), since
-- periods reset lazily, on the allocation's next charge (reset_allocation_if_due);
-- and holds past their expiry are not reserved any more, persisted or not
-- (35_reservations.sql).
CREATE OR REPLACE FUNCTION allocation_json_now(a user_credit_allocations) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT allocation_json(a) || CASE WHEN a.next_reset_at <= ledger_now()
        THEN jsonb_build_object('used', 0, 'next_reset_at_us',
                                epoch_micros(next_reset_after(a.reset_period, ledger_now())))
        ELSE '{}'::jsonb END
        || CASE WHEN a.reserved_millicredits > 0
        THEN jsonb_build_object('reserved', a.reserved_millicredits - (
            SELECT coalesce(sum(r.amount_millicredits), 0) FROM credit_reservations AS r
             WHERE r.org_id = a.org_id AND r.user_id = a.user_id AND r.state = 'OPEN'
               AND r.expires_at <= ledger_now()))
        ELSE '{}'::jsonb END
$$;

-- A pool as pool_json shows it, as of now: holds past their expiry are not
-- reserved any more, persisted or not (35_reservations.sql).
CREATE OR REPLACE FUNCTION pool_json_now(p organization_credit_pools) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT pool_json(p) || CASE WHEN p.reserved_millicredits > 0
        THEN jsonb_build_object('reserved', p.reserved_millicredits - (
            SELECT coalesce(sum(r.amount_millicredits), 0) FROM credit_reservations AS r
             WHERE r.org_id = p.org_id AND r.state = 'OPEN' AND r.expires_at <= ledger_now()))
        ELSE '{}'::jsonb END
$$;

CREATE OR REPLACE FUNCTION subscription_json(s organization_subscriptions) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object(
        'org_id', s.org_id,
        'subscription_id', s.subscription_id,
        'plan', s.plan,
        'billing_cycle', s.billing_cycle,
        'status', s.status,
        'price_cents', s.price_cents,
        'currency', s.currency,
        'current_period_start_us', epoch_micros(s.current_period_start),
        'current_period_end_us', epoch_micros(s.current_period_end),
        'trial_end_us', epoch_micros(s.trial_end),
        'external_customer_id', s.external_customer_id,
        'external_subscription_id', s.external_subscription_id,
        'created_at_us', epoch_micros(s.created_at),
        'canceled_at_us', epoch_micros(s.canceled_at))
$$;

-- Starts a new period for an allocation whose reset time has passed. Periods
-- are reset lazily, by the first operation that locks the allocation after
-- its reset time, so no background job is needed for correctness. Called by
-- the deductions and by allocate_credits_to_user, with the allocation locked.
CREATE OR REPLACE FUNCTION reset_allocation_if_due(a user_credit_allocations) RETURNS user_credit_allocations
LANGUAGE plpgsql AS $$
DECLARE
    used_before bigint := a.used_millicredits;
BEGIN
    IF a.next_reset_at IS NULL OR a.next_reset_at > ledger_now() THEN
        RETURN a;
    END IF;
    UPDATE user_credit_allocations
       SET used_millicredits = 0,
           period_number = period_number + 1,
           next_reset_at = next_reset_after(reset_period, ledger_now()),
           updated_at = ledger_now()
     WHERE org_id = a.org_id AND user_id = a.user_id
    RETURNING * INTO a;
    INSERT INTO org_billing_history (org_id, event_type, user_id, details)
    VALUES (a.org_id, 'PERIOD_RESET', a.user_id,
            jsonb_build_object('used_before', used_before, 'period_number', a.period_number));
    RETURN a;
END $$;
