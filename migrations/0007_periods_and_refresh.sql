-- Subscription periods that advance themselves, and the refresh: credits
-- granted to the pool at each billing period start (functions in
-- functions/50_subscriptions.sql; semantics in the README, "Refresh and
-- billing periods").

-- A period's end is its anchor plus a whole number of cycles, counted in
-- UTC calendar months or years, never one period's end plus a month: a
-- subscription started on the 31st then ends on the 28th (or 29th) of
-- February and on the 31st of March again, not the 28th ever after. The
-- anchor moves only when the cycle changes (to the end of the period in
-- which it changed). The refresh is the plan's, from the server's catalog
-- at subscription or plan change, like the price.
ALTER TABLE organization_subscriptions
    ADD COLUMN refresh_millicredits bigint NOT NULL DEFAULT 0
        CHECK (refresh_millicredits BETWEEN 0 AND 1000000000000000),
    ADD COLUMN period_anchor timestamptz,
    ADD COLUMN periods_from_anchor integer NOT NULL DEFAULT 0 CHECK (periods_from_anchor >= 0);
UPDATE organization_subscriptions SET period_anchor = current_period_end;
ALTER TABLE organization_subscriptions ALTER COLUMN period_anchor SET NOT NULL;

ALTER TABLE organization_credit_pools
    -- Set per org: replaces the plan's refresh; NULL follows the plan.
    ADD COLUMN refresh_override_millicredits bigint
        CHECK (refresh_override_millicredits BETWEEN 0 AND 1000000000000000),
    -- How much of the refreshed credits left unspent at a period's end
    -- carries into the next; the rest lapses. 0 (the default): all lapses.
    ADD COLUMN rollover_cap_millicredits bigint NOT NULL DEFAULT 0
        CHECK (rollover_cap_millicredits BETWEEN 0 AND 1000000000000000000),
    -- The refreshed credits (granted and rolled over) at the current
    -- period's start, and the pool's used then: refreshed credits are spent
    -- first, so what of them is left is the first less what was spent since.
    ADD COLUMN refresh_balance_millicredits bigint NOT NULL DEFAULT 0
        CHECK (refresh_balance_millicredits >= 0),
    ADD COLUMN used_at_period_start_millicredits bigint NOT NULL DEFAULT 0,
    -- The live subscription's current_period_end (NULL without one), here so
    -- that whoever locks the pool sees a due period without another read.
    ADD COLUMN period_ends_at timestamptz;
UPDATE organization_credit_pools AS p
   SET period_ends_at = s.current_period_end, used_at_period_start_millicredits = p.used_millicredits
  FROM organization_subscriptions AS s
 WHERE s.org_id = p.org_id AND s.status IN ('TRIALING', 'ACTIVE', 'PAST_DUE');

-- The sweeper's: pools whose period is due. Does not lead with org_id, so no
-- ledger lookup by org can choose it (0001_baseline.sql).
CREATE INDEX organization_credit_pools_by_period_end
    ON organization_credit_pools (period_ends_at) WHERE period_ends_at IS NOT NULL;

-- History: SUBSCRIPTION_RENEWED when a period ends and the next starts
-- (details: the ended period's overage), REFRESH_CHANGED when an operator
-- sets the refresh or rollover; refreshed credits are CREDITS_ADDED with
-- source REFRESH, lapsed ones with source LAPSE (negative), so the pool's
-- total stays the sum of CREDITS_ADDED.
ALTER TABLE org_billing_history DROP CONSTRAINT org_billing_history_event_type_check;
ALTER TABLE org_billing_history ADD CONSTRAINT org_billing_history_event_type_check
    CHECK (event_type IN (
        'SUBSCRIPTION_CREATED', 'SUBSCRIPTION_UPGRADED', 'SUBSCRIPTION_DOWNGRADED',
        'SUBSCRIPTION_CHANGED', 'SUBSCRIPTION_CANCELED', 'CREDITS_ADDED',
        'ALLOCATION_CHANGED', 'ALLOCATION_REVOKED', 'PERIOD_RESET',
        'INVOICE_CREATED', 'INVOICE_PAID', 'INVOICE_PAYMENT_FAILED', 'INVOICE_VOIDED',
        'REFUND', 'OVERAGE_CHANGED', 'SUBSCRIPTION_RENEWED', 'REFRESH_CHANGED'));
ALTER TABLE org_billing_history DROP CONSTRAINT org_billing_history_credit_source_check;
ALTER TABLE org_billing_history ADD CONSTRAINT org_billing_history_credit_source_check
    CHECK (credit_source IN ('PURCHASE', 'GRANT', 'ADJUSTMENT', 'REFRESH', 'LAPSE'));

-- Exactly once per period, whatever runs it (a charge, a read, the sweeper
-- of any replica): one refresh, one lapse and one renewal per subscription
-- and period start.
CREATE UNIQUE INDEX org_billing_history_one_refresh_per_period
    ON org_billing_history (org_id, subscription_id, credit_source, (details ->> 'period_start_us'))
    WHERE credit_source IN ('REFRESH', 'LAPSE');
CREATE UNIQUE INDEX org_billing_history_one_renewal_per_period
    ON org_billing_history (org_id, subscription_id, (details ->> 'period_start_us'))
    WHERE event_type = 'SUBSCRIPTION_RENEWED';
