-- Repeatable: this file holds the one current definition of each of its
-- functions, and the migration runner (server/migrate.py) re-applies it whole
-- whenever its checksum changes. To change a function, edit it here, never in
-- a versioned migration. Settings are written in the CREATE, as SET lines
-- before the body: CREATE OR REPLACE resets any set otherwise. CREATE OR
-- REPLACE cannot change a function's arguments or result type: to change
-- them, or to remove a function, this file drops the old signature itself
-- (DROP FUNCTION IF EXISTS name(old argument types)) before the new CREATE.

-- Subscriptions: create, change plan, cancel. Each returns a jsonb outcome,
-- and stores it (refusals too) under its idempotency key through
-- idempotency_remember. Settings: see 30_deductions.sql.

-- Subscribes an organization, creating it and its pool on first use. The
-- price and the refresh come from the server's catalog, never the caller.
-- The first period starts now, with its refresh (refresh_pool).
DROP FUNCTION IF EXISTS create_subscription(text, text, text, bigint, text, integer, text, text, text, bytea, text);
DROP FUNCTION IF EXISTS change_subscription_plan(text, text, text, bigint, text, text, bytea, text);

CREATE OR REPLACE FUNCTION create_subscription(
    p_org_id text, p_plan text, p_billing_cycle text, p_price_cents bigint, p_currency text,
    p_refresh bigint, p_trial_days integer, p_external_customer_id text,
    p_external_subscription_id text, p_idempotency_key text, p_request_hash bytea, p_request_id text)
RETURNS jsonb LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
DECLARE
    prior jsonb;
    p organization_credit_pools;
    s organization_subscriptions;
    at timestamptz := ledger_now();
BEGIN
    INSERT INTO organizations (org_id) VALUES (p_org_id) ON CONFLICT DO NOTHING;
    INSERT INTO organization_credit_pools (org_id) VALUES (p_org_id) ON CONFLICT DO NOTHING;
    p := lock_pool(p_org_id);
    prior := idempotency_lookup(p_org_id, p_idempotency_key, 'CreateSubscription', p_request_hash);
    IF prior IS NOT NULL THEN
        RETURN prior;
    END IF;
    PERFORM 1 FROM organization_subscriptions
     WHERE org_id = p_org_id AND status IN ('TRIALING', 'ACTIVE', 'PAST_DUE');
    IF FOUND THEN
        RETURN idempotency_remember(p_org_id, p_idempotency_key, 'CreateSubscription', p_request_hash, '{"outcome": "SUBSCRIPTION_EXISTS"}');
    END IF;
    INSERT INTO organization_subscriptions (
        org_id, plan, billing_cycle, status, price_cents, currency, refresh_millicredits,
        current_period_start, current_period_end, period_anchor, periods_from_anchor, trial_end,
        external_customer_id, external_subscription_id)
    VALUES (
        p_org_id, p_plan, p_billing_cycle,
        CASE WHEN p_trial_days > 0 THEN 'TRIALING' ELSE 'ACTIVE' END,
        p_price_cents, p_currency, p_refresh, at, cycles_after(at, p_billing_cycle, 1), at, 1,
        CASE WHEN p_trial_days > 0 THEN at + make_interval(days => p_trial_days) END,
        p_external_customer_id, p_external_subscription_id)
    RETURNING * INTO s;
    INSERT INTO org_billing_history (org_id, event_type, subscription_id, details, idempotency_key, request_id)
    VALUES (p_org_id, 'SUBSCRIPTION_CREATED', s.subscription_id,
            jsonb_build_object('plan', p_plan, 'billing_cycle', p_billing_cycle,
                               'price_cents', p_price_cents, 'trial_days', p_trial_days,
                               'refresh', p_refresh),
            p_idempotency_key, p_request_id);
    p := refresh_pool(p, s);
    UPDATE organization_credit_pools SET period_ends_at = s.current_period_end
     WHERE org_id = p_org_id;
    RETURN idempotency_remember(p_org_id, p_idempotency_key, 'CreateSubscription', p_request_hash,
        jsonb_build_object('outcome', 'OK', 'subscription', subscription_json(s)));
END $$;

-- Moves the live subscription to another plan or cycle, recorded as an
-- upgrade or downgrade by the monthly equivalent of the catalog prices. The
-- current period keeps its end and its refresh; the new plan's price,
-- refresh and cycle count from the next period on (a new cycle from an
-- anchor at the current period's end).
CREATE OR REPLACE FUNCTION change_subscription_plan(
    p_org_id text, p_plan text, p_billing_cycle text, p_price_cents bigint, p_currency text,
    p_refresh bigint, p_idempotency_key text, p_request_hash bytea, p_request_id text)
RETURNS jsonb LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
DECLARE
    prior jsonb;
    s organization_subscriptions;
    old organization_subscriptions;
    old_monthly numeric;
    new_monthly numeric;
    change text;
BEGIN
    IF (lock_pool(p_org_id)).org_id IS NULL THEN
        RETURN '{"outcome": "ORG_NOT_FOUND"}';
    END IF;
    prior := idempotency_lookup(p_org_id, p_idempotency_key, 'ChangePlan', p_request_hash);
    IF prior IS NOT NULL THEN
        RETURN prior;
    END IF;
    SELECT * INTO old FROM organization_subscriptions
     WHERE org_id = p_org_id AND status IN ('TRIALING', 'ACTIVE', 'PAST_DUE') FOR UPDATE;
    IF NOT FOUND THEN
        RETURN idempotency_remember(p_org_id, p_idempotency_key, 'ChangePlan', p_request_hash, '{"outcome": "SUBSCRIPTION_NOT_FOUND"}');
    END IF;
    IF old.plan = p_plan AND old.billing_cycle = p_billing_cycle THEN
        RETURN idempotency_remember(p_org_id, p_idempotency_key, 'ChangePlan', p_request_hash, '{"outcome": "PLAN_UNCHANGED"}');
    END IF;
    old_monthly := old.price_cents / CASE old.billing_cycle WHEN 'YEARLY' THEN 12.0 ELSE 1.0 END;
    new_monthly := p_price_cents / CASE p_billing_cycle WHEN 'YEARLY' THEN 12.0 ELSE 1.0 END;
    change := CASE WHEN new_monthly > old_monthly THEN 'UPGRADE'
                   WHEN new_monthly < old_monthly THEN 'DOWNGRADE'
                   ELSE 'LATERAL' END;
    UPDATE organization_subscriptions
       SET plan = p_plan, billing_cycle = p_billing_cycle, price_cents = p_price_cents,
           currency = p_currency, refresh_millicredits = p_refresh,
           period_anchor = CASE WHEN billing_cycle = p_billing_cycle THEN period_anchor
                                ELSE current_period_end END,
           periods_from_anchor = CASE WHEN billing_cycle = p_billing_cycle THEN periods_from_anchor
                                      ELSE 0 END,
           updated_at = ledger_now()
     WHERE org_id = p_org_id AND subscription_id = old.subscription_id
    RETURNING * INTO s;
    INSERT INTO org_billing_history (org_id, event_type, subscription_id, details, idempotency_key, request_id)
    VALUES (p_org_id,
            CASE change WHEN 'UPGRADE' THEN 'SUBSCRIPTION_UPGRADED'
                        WHEN 'DOWNGRADE' THEN 'SUBSCRIPTION_DOWNGRADED'
                        ELSE 'SUBSCRIPTION_CHANGED' END,
            s.subscription_id,
            jsonb_build_object('old_plan', old.plan, 'old_billing_cycle', old.billing_cycle,
                               'old_price_cents', old.price_cents, 'new_plan', p_plan,
                               'new_billing_cycle', p_billing_cycle, 'new_price_cents', p_price_cents,
                               'old_refresh', old.refresh_millicredits, 'new_refresh', p_refresh),
            p_idempotency_key, p_request_id);
    RETURN idempotency_remember(p_org_id, p_idempotency_key, 'ChangePlan', p_request_hash,
        jsonb_build_object('outcome', 'OK', 'change', change, 'subscription', subscription_json(s)));
END $$;

-- Cancels the live subscription: no period follows the current one, so no
-- more refreshes. Its pool (refreshed credits included) and allocations
-- stay as they are.
CREATE OR REPLACE FUNCTION cancel_subscription(
    p_org_id text, p_reason text, p_idempotency_key text, p_request_hash bytea, p_request_id text)
RETURNS jsonb LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
DECLARE
    prior jsonb;
    s organization_subscriptions;
BEGIN
    IF (lock_pool(p_org_id)).org_id IS NULL THEN
        RETURN '{"outcome": "ORG_NOT_FOUND"}';
    END IF;
    prior := idempotency_lookup(p_org_id, p_idempotency_key, 'CancelSubscription', p_request_hash);
    IF prior IS NOT NULL THEN
        RETURN prior;
    END IF;
    UPDATE organization_subscriptions
       SET status = 'CANCELED', canceled_at = ledger_now(), updated_at = ledger_now()
     WHERE org_id = p_org_id AND status IN ('TRIALING', 'ACTIVE', 'PAST_DUE')
    RETURNING * INTO s;
    IF NOT FOUND THEN
        RETURN idempotency_remember(p_org_id, p_idempotency_key, 'CancelSubscription', p_request_hash, '{"outcome": "SUBSCRIPTION_NOT_FOUND"}');
    END IF;
    UPDATE organization_credit_pools SET period_ends_at = NULL, updated_at = ledger_now()
     WHERE org_id = p_org_id;
    INSERT INTO org_billing_history (org_id, event_type, subscription_id, details, idempotency_key, request_id)
    VALUES (p_org_id, 'SUBSCRIPTION_CANCELED', s.subscription_id,
            jsonb_build_object('reason', p_reason), p_idempotency_key, p_request_id);
    RETURN idempotency_remember(p_org_id, p_idempotency_key, 'CancelSubscription', p_request_hash,
        jsonb_build_object('outcome', 'OK', 'subscription', subscription_json(s)));
END $$;

-- Periods: a live subscription's period ends at current_period_end, and the
-- next starts there, by itself: applied by whoever locks the pool first
-- after the end (lock_pool, the deductions, a check or a read through
-- settle_due_periods), else by the sweeper (sweep_due_periods). Exactly
-- once: the pool lock serializes them, the first moves period_ends_at on,
-- and the history's unique indexes (0007) refuse a second record of a
-- period.

-- Grants the refresh of the period s starts now, lapsing what the cap does
-- not carry of the refreshed credits left unspent from the period before
-- (refreshed credits are spent first: 0007). A lapse never takes credits
-- that are allocated or held (allocations are carved out of the total, a
-- hold stays covered); what it could not take stays refreshed credit. Call
-- with the pool locked; returns the pool as it leaves it.
CREATE OR REPLACE FUNCTION refresh_pool(p organization_credit_pools, s organization_subscriptions)
RETURNS organization_credit_pools
LANGUAGE plpgsql AS $$
DECLARE
    unspent bigint := greatest(0, least(
        p.refresh_balance_millicredits - (p.used_millicredits - p.used_at_period_start_millicredits),
        p.total_millicredits - p.used_millicredits));
    granted bigint := coalesce(p.refresh_override_millicredits, s.refresh_millicredits);
    lapsed bigint;
    period jsonb := jsonb_build_object('period_start_us', epoch_micros(s.current_period_start),
                                       'period_end_us', epoch_micros(s.current_period_end));
BEGIN
    lapsed := greatest(0, least(
        unspent - p.rollover_cap_millicredits,
        p.total_millicredits + granted - p.allocated_millicredits,
        p.total_millicredits + granted + p.overage_limit_millicredits
        - p.used_millicredits - p.reserved_millicredits));
    -- The pool's total is bounded (0001); a refresh past it is cut short.
    granted := least(granted, 1000000000000000000 - (p.total_millicredits - lapsed));
    IF lapsed > 0 THEN
        INSERT INTO org_billing_history (org_id, event_type, credits_delta_millicredits,
                                         credit_source, subscription_id, details)
        VALUES (p.org_id, 'CREDITS_ADDED', -lapsed, 'LAPSE', s.subscription_id,
                period || jsonb_build_object('unspent', unspent,
                                             'rollover_cap', p.rollover_cap_millicredits));
    END IF;
    IF granted > 0 THEN
        INSERT INTO org_billing_history (org_id, event_type, credits_delta_millicredits,
                                         credit_source, subscription_id, details)
        VALUES (p.org_id, 'CREDITS_ADDED', granted, 'REFRESH', s.subscription_id,
                period || jsonb_build_object('rolled_over', unspent - lapsed));
    END IF;
    UPDATE organization_credit_pools
       SET total_millicredits = total_millicredits - lapsed + granted,
           refresh_balance_millicredits = unspent - lapsed + granted,
           used_at_period_start_millicredits = used_millicredits,
           updated_at = ledger_now()
     WHERE org_id = p.org_id
    RETURNING * INTO p;
    RETURN p;
END $$;

-- Advances the org's live subscription past every period that has ended,
-- one at a time (a sweeper that ran late, an org idle for months): each is
-- SUBSCRIPTION_RENEWED, recording the ended period's overage (credits spent
-- past the total; holds are not spent) and its price at the pool's rate,
-- then the new period starts with its refresh. Call with the pool locked
-- and its expired holds persisted (lock_pool); returns the pool.
CREATE OR REPLACE FUNCTION advance_due_periods(p organization_credit_pools)
RETURNS organization_credit_pools
LANGUAGE plpgsql AS $$
DECLARE
    at timestamptz := ledger_now();
    s organization_subscriptions;
    overage bigint;
BEGIN
    IF p.period_ends_at IS NULL OR p.period_ends_at > at THEN
        RETURN p;
    END IF;
    SELECT * INTO s FROM organization_subscriptions
     WHERE org_id = p.org_id AND status IN ('TRIALING', 'ACTIVE', 'PAST_DUE') FOR UPDATE;
    WHILE s.current_period_end <= at LOOP
        overage := greatest(0, p.used_millicredits - p.total_millicredits);
        INSERT INTO org_billing_history (org_id, event_type, subscription_id, details)
        VALUES (p.org_id, 'SUBSCRIPTION_RENEWED', s.subscription_id, jsonb_build_object(
            'period_start_us', epoch_micros(s.current_period_end),
            'ended_period_start_us', epoch_micros(s.current_period_start),
            'overage_used', overage,
            'overage_rate', p.overage_rate_millicents_per_credit,
            -- Millicents, rounded up: a millicredit is a thousandth of a credit.
            'overage_charge_millicents',
            ceil(overage::numeric * p.overage_rate_millicents_per_credit / 1000)));
        UPDATE organization_subscriptions
           SET current_period_start = current_period_end,
               current_period_end = cycles_after(period_anchor, billing_cycle, periods_from_anchor + 1),
               periods_from_anchor = periods_from_anchor + 1,
               updated_at = at
         WHERE org_id = s.org_id AND subscription_id = s.subscription_id
        RETURNING * INTO s;
        p := refresh_pool(p, s);
    END LOOP;
    UPDATE organization_credit_pools SET period_ends_at = s.current_period_end
     WHERE org_id = p.org_id
    RETURNING * INTO p;
    RETURN p;
END $$;

-- The org's pool as of now, for readers: when a period is due, they lock
-- the pool and apply it (lock_pool), once a period at most; otherwise they
-- read without a lock. A NULL row when the org has no pool.
CREATE OR REPLACE FUNCTION settle_due_periods(p_org_id text) RETURNS organization_credit_pools
LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
DECLARE
    p organization_credit_pools;
BEGIN
    SELECT * INTO p FROM organization_credit_pools WHERE org_id = p_org_id;
    IF p.period_ends_at <= ledger_now() THEN
        p := lock_pool(p_org_id);
    END IF;
    RETURN p;
END $$;

-- The live subscription as of now (its due periods applied), or NULL.
CREATE OR REPLACE FUNCTION live_subscription_json(p_org_id text) RETURNS jsonb
LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
BEGIN
    PERFORM settle_due_periods(p_org_id);
    RETURN (SELECT subscription_json(s) FROM organization_subscriptions AS s
             WHERE org_id = p_org_id AND status IN ('TRIALING', 'ACTIVE', 'PAST_DUE'));
END $$;

-- The sweeper's batch: applies the due periods of up to p_pools_max pools,
-- the longest due first, locking them in org_id order as every batch does.
-- Returns how many pools it advanced. Correctness never waits for it; it
-- keeps reports and the subscriptions on disk current for idle orgs.
CREATE OR REPLACE FUNCTION sweep_due_periods(p_pools_max integer) RETURNS integer
LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
DECLARE
    orgs text[];
    org text;
BEGIN
    SELECT array_agg(d.org_id) INTO orgs
      FROM (SELECT org_id FROM organization_credit_pools
             WHERE period_ends_at <= ledger_now()
             ORDER BY period_ends_at LIMIT p_pools_max) AS d;
    IF orgs IS NULL THEN
        RETURN 0;
    END IF;
    FOR org IN SELECT org_id FROM organization_credit_pools
                WHERE org_id = ANY (orgs) ORDER BY org_id FOR UPDATE
    LOOP
        PERFORM lock_pool(org);
    END LOOP;
    RETURN cardinality(orgs);
END $$;
