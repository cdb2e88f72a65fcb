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
-- price comes from the server's catalog (p_price_cents), never the caller.
CREATE OR REPLACE FUNCTION create_subscription(
    p_org_id text, p_plan text, p_billing_cycle text, p_price_cents bigint, p_currency text,
    p_trial_days integer, p_external_customer_id text, p_external_subscription_id text,
    p_idempotency_key text, p_request_hash bytea, p_request_id text)
RETURNS jsonb LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
DECLARE
    prior jsonb;
    s organization_subscriptions;
    period interval := CASE p_billing_cycle WHEN 'YEARLY' THEN interval '1 year' ELSE interval '1 month' END;
BEGIN
    INSERT INTO organizations (org_id) VALUES (p_org_id) ON CONFLICT DO NOTHING;
    INSERT INTO organization_credit_pools (org_id) VALUES (p_org_id) ON CONFLICT DO NOTHING;
    PERFORM 1 FROM organization_credit_pools WHERE org_id = p_org_id FOR UPDATE;
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
        org_id, plan, billing_cycle, status, price_cents, currency,
        current_period_start, current_period_end, trial_end,
        external_customer_id, external_subscription_id)
    VALUES (
        p_org_id, p_plan, p_billing_cycle,
        CASE WHEN p_trial_days > 0 THEN 'TRIALING' ELSE 'ACTIVE' END,
        p_price_cents, p_currency, ledger_now(), ledger_now() + period,
        CASE WHEN p_trial_days > 0 THEN ledger_now() + make_interval(days => p_trial_days) END,
        p_external_customer_id, p_external_subscription_id)
    RETURNING * INTO s;
    INSERT INTO org_billing_history (org_id, event_type, subscription_id, details, idempotency_key, request_id)
    VALUES (p_org_id, 'SUBSCRIPTION_CREATED', s.subscription_id,
            jsonb_build_object('plan', p_plan, 'billing_cycle', p_billing_cycle,
                               'price_cents', p_price_cents, 'trial_days', p_trial_days),
            p_idempotency_key, p_request_id);
    RETURN idempotency_remember(p_org_id, p_idempotency_key, 'CreateSubscription', p_request_hash,
        jsonb_build_object('outcome', 'OK', 'subscription', subscription_json(s)));
END $$;

-- Moves the live subscription to another plan or cycle, recorded as an
-- upgrade or downgrade by the monthly equivalent of the catalog prices.
CREATE OR REPLACE FUNCTION change_subscription_plan(
    p_org_id text, p_plan text, p_billing_cycle text, p_price_cents bigint, p_currency text,
    p_idempotency_key text, p_request_hash bytea, p_request_id text)
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
    PERFORM 1 FROM organization_credit_pools WHERE org_id = p_org_id FOR UPDATE;
    IF NOT FOUND THEN
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
           currency = p_currency, updated_at = ledger_now()
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
                               'new_billing_cycle', p_billing_cycle, 'new_price_cents', p_price_cents),
            p_idempotency_key, p_request_id);
    RETURN idempotency_remember(p_org_id, p_idempotency_key, 'ChangePlan', p_request_hash,
        jsonb_build_object('outcome', 'OK', 'change', change, 'subscription', subscription_json(s)));
END $$;

-- Cancels the live subscription. Its pool and allocations stay as they are.
CREATE OR REPLACE FUNCTION cancel_subscription(
    p_org_id text, p_reason text, p_idempotency_key text, p_request_hash bytea, p_request_id text)
RETURNS jsonb LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
DECLARE
    prior jsonb;
    s organization_subscriptions;
BEGIN
    PERFORM 1 FROM organization_credit_pools WHERE org_id = p_org_id FOR UPDATE;
    IF NOT FOUND THEN
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
    INSERT INTO org_billing_history (org_id, event_type, subscription_id, details, idempotency_key, request_id)
    VALUES (p_org_id, 'SUBSCRIPTION_CANCELED', s.subscription_id,
            jsonb_build_object('reason', p_reason), p_idempotency_key, p_request_id);
    RETURN idempotency_remember(p_org_id, p_idempotency_key, 'CancelSubscription', p_request_hash,
        jsonb_build_object('outcome', 'OK', 'subscription', subscription_json(s)));
END $$;
