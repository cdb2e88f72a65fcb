-- Repeatable: this file holds the one current definition of each of its
-- functions, and the migration runner (server/migrate.py) re-applies it whole
-- whenever its checksum changes. To change a function, edit it here, never in
-- a versioned migration. Settings are written in the CREATE, as SET lines
-- before the body: CREATE OR REPLACE resets any set otherwise. CREATE OR
-- REPLACE cannot change a function's arguments or result type: to change
-- them, or to remove a function, this file drops the old signature itself
-- (DROP FUNCTION IF EXISTS name(old argument types)) before the new CREATE.

-- Administrative changes to a pool and its allocations. Each returns a jsonb
-- outcome, and stores it (refusals too) under its idempotency key through
-- idempotency_remember. Settings: see 30_deductions.sql.

-- Adds credits to a pool (or, by ADJUSTMENT, removes them). On OK the result
-- also has event_id, added and pool.
CREATE OR REPLACE FUNCTION add_credits_to_pool(
    p_org_id text, p_source text, p_amount bigint, p_payment_reference text,
    p_amount_paid_cents bigint, p_currency text, p_reason text,
    p_idempotency_key text, p_request_hash bytea, p_request_id text)
RETURNS jsonb LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
DECLARE
    p organization_credit_pools;
    prior jsonb;
    removable bigint;
    event uuid;
BEGIN
    IF p_amount IS NULL OR p_amount = 0 OR abs(p_amount) > 1000000000000000
       OR (p_amount < 0 AND p_source <> 'ADJUSTMENT') THEN
        RETURN '{"outcome": "INVALID_AMOUNT"}';
    END IF;
    p := lock_pool(p_org_id);
    IF p.org_id IS NULL THEN
        RETURN '{"outcome": "ORG_NOT_FOUND"}';
    END IF;
    prior := idempotency_lookup(p_org_id, p_idempotency_key, 'AddCredits', p_request_hash);
    IF prior IS NOT NULL THEN
        RETURN prior;
    END IF;
    IF p_payment_reference IS NOT NULL THEN
        PERFORM 1 FROM org_billing_history
         WHERE org_id = p_org_id AND payment_reference = p_payment_reference;
        IF FOUND THEN
            RETURN idempotency_remember(p_org_id, p_idempotency_key, 'AddCredits', p_request_hash, '{"outcome": "PAYMENT_ALREADY_RECORDED"}');
        END IF;
    END IF;
    IF p.total_millicredits + p_amount > 1000000000000000000 THEN
        RETURN idempotency_remember(p_org_id, p_idempotency_key, 'AddCredits', p_request_hash, jsonb_build_object('outcome', 'POOL_TOTAL_LIMIT_EXCEEDED',
                                  'available', 1000000000000000000 - p.total_millicredits,
                                  'requested', p_amount));
    END IF;
    IF p_amount < 0 THEN
        -- A removal may take only what is neither allocated nor spent.
        removable := least(p.total_millicredits - p.allocated_millicredits,
                           p.total_millicredits + p.overage_limit_millicredits
                           - p.used_millicredits - p.reserved_millicredits);
        IF -p_amount > removable THEN
            RETURN idempotency_remember(p_org_id, p_idempotency_key, 'AddCredits', p_request_hash, jsonb_build_object('outcome', 'INSUFFICIENT_CREDITS',
                                      'available', greatest(0, removable), 'requested', -p_amount));
        END IF;
    END IF;

    UPDATE organization_credit_pools
       SET total_millicredits = total_millicredits + p_amount, updated_at = ledger_now()
     WHERE org_id = p_org_id
    RETURNING * INTO p;
    INSERT INTO org_billing_history (
        org_id, event_type, credits_delta_millicredits, credit_source, payment_reference,
        amount_paid_cents, currency, details, idempotency_key, request_id)
    VALUES (
        p_org_id, 'CREDITS_ADDED', p_amount, p_source, p_payment_reference,
        p_amount_paid_cents, p_currency, jsonb_build_object('reason', p_reason),
        p_idempotency_key, p_request_id)
    RETURNING event_id INTO event;
    RETURN idempotency_remember(p_org_id, p_idempotency_key, 'AddCredits', p_request_hash,
        jsonb_build_object('outcome', 'OK', 'event_id', event, 'added', p_amount,
                           'pool', pool_json(p)));
END $$;

-- Sets a user's limit: a first allocation, a raise, a cut (even below what is
-- used), or the renewal of a revoked one. The sum of limits may not exceed
-- the pool's total.
CREATE OR REPLACE FUNCTION allocate_credits_to_user(
    p_org_id text, p_user_id text, p_limit bigint, p_reset_period text,
    p_idempotency_key text, p_request_hash bytea, p_request_id text)
RETURNS jsonb LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
DECLARE
    p organization_credit_pools;
    a user_credit_allocations;
    prior jsonb;
    old_limit bigint := 0;
BEGIN
    IF p_limit IS NULL OR p_limit < 0 OR p_limit > 1000000000000000 THEN
        RETURN '{"outcome": "INVALID_AMOUNT"}';
    END IF;
    p := lock_pool(p_org_id);
    IF p.org_id IS NULL THEN
        RETURN '{"outcome": "ORG_NOT_FOUND"}';
    END IF;
    prior := idempotency_lookup(p_org_id, p_idempotency_key, 'AllocateCredits', p_request_hash);
    IF prior IS NOT NULL THEN
        RETURN prior;
    END IF;

    SELECT * INTO a FROM user_credit_allocations
     WHERE org_id = p_org_id AND user_id = p_user_id FOR UPDATE;
    IF FOUND THEN
        old_limit := a.limit_millicredits;
        a := reset_allocation_if_due(a);
    END IF;
    IF p.allocated_millicredits - old_limit + p_limit > p.total_millicredits THEN
        RETURN idempotency_remember(p_org_id, p_idempotency_key, 'AllocateCredits', p_request_hash, jsonb_build_object('outcome', 'INSUFFICIENT_UNALLOCATED_CREDITS',
            'available', p.total_millicredits - p.allocated_millicredits + old_limit,
            'requested', p_limit));
    END IF;

    IF a.user_id IS NULL THEN
        INSERT INTO user_credit_allocations (org_id, user_id, limit_millicredits, reset_period, next_reset_at)
        VALUES (p_org_id, p_user_id, p_limit, p_reset_period, next_reset_after(p_reset_period, ledger_now()))
        RETURNING * INTO a;
    ELSE
        UPDATE user_credit_allocations
           SET limit_millicredits = p_limit,
               reset_period = p_reset_period,
               next_reset_at = CASE WHEN reset_period = p_reset_period THEN next_reset_at
                                    ELSE next_reset_after(p_reset_period, ledger_now()) END,
               revoked_at = NULL,
               updated_at = ledger_now()
         WHERE org_id = p_org_id AND user_id = p_user_id
        RETURNING * INTO a;
    END IF;
    UPDATE organization_credit_pools
       SET allocated_millicredits = allocated_millicredits - old_limit + p_limit, updated_at = ledger_now()
     WHERE org_id = p_org_id
    RETURNING * INTO p;
    INSERT INTO org_billing_history (org_id, event_type, user_id, details, idempotency_key, request_id)
    VALUES (p_org_id, 'ALLOCATION_CHANGED', p_user_id,
            jsonb_build_object('old_limit', old_limit, 'new_limit', p_limit, 'reset_period', p_reset_period),
            p_idempotency_key, p_request_id);
    RETURN idempotency_remember(p_org_id, p_idempotency_key, 'AllocateCredits', p_request_hash,
        jsonb_build_object('outcome', 'OK', 'allocation', allocation_json(a), 'pool', pool_json(p)));
END $$;

-- Revokes a user's allocation: its limit goes to 0 and back to the pool.
CREATE OR REPLACE FUNCTION revoke_allocation(
    p_org_id text, p_user_id text, p_idempotency_key text, p_request_hash bytea, p_request_id text)
RETURNS jsonb LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
DECLARE
    p organization_credit_pools;
    a user_credit_allocations;
    prior jsonb;
    old_limit bigint;
BEGIN
    p := lock_pool(p_org_id);
    IF p.org_id IS NULL THEN
        RETURN '{"outcome": "ORG_NOT_FOUND"}';
    END IF;
    prior := idempotency_lookup(p_org_id, p_idempotency_key, 'RevokeAllocation', p_request_hash);
    IF prior IS NOT NULL THEN
        RETURN prior;
    END IF;
    SELECT * INTO a FROM user_credit_allocations
     WHERE org_id = p_org_id AND user_id = p_user_id FOR UPDATE;
    IF NOT FOUND OR a.revoked_at IS NOT NULL THEN
        RETURN idempotency_remember(p_org_id, p_idempotency_key, 'RevokeAllocation', p_request_hash, '{"outcome": "ALLOCATION_NOT_FOUND"}');
    END IF;
    old_limit := a.limit_millicredits;
    UPDATE user_credit_allocations
       SET limit_millicredits = 0, revoked_at = ledger_now(), updated_at = ledger_now()
     WHERE org_id = p_org_id AND user_id = p_user_id
    RETURNING * INTO a;
    UPDATE organization_credit_pools
       SET allocated_millicredits = allocated_millicredits - old_limit, updated_at = ledger_now()
     WHERE org_id = p_org_id
    RETURNING * INTO p;
    INSERT INTO org_billing_history (org_id, event_type, user_id, details, idempotency_key, request_id)
    VALUES (p_org_id, 'ALLOCATION_REVOKED', p_user_id, jsonb_build_object('old_limit', old_limit),
            p_idempotency_key, p_request_id);
    RETURN idempotency_remember(p_org_id, p_idempotency_key, 'RevokeAllocation', p_request_hash,
        jsonb_build_object('outcome', 'OK', 'allocation', allocation_json(a), 'pool', pool_json(p)));
END $$;

-- Sets a pool's overage: how far past its total it may be spent (the limit,
-- 0 for none) and at what rate (millicents per credit, 0005_overage.sql).
-- The limit may not go below the overage in use now, used plus reserved
-- beyond total (the pool's CHECK would refuse it anyway; this names the
-- amount): the org must first add credits, or wait for its holds to end.
-- On OK the result also has event_id and pool.
CREATE OR REPLACE FUNCTION set_pool_overage(
    p_org_id text, p_limit bigint, p_rate bigint,
    p_idempotency_key text, p_request_hash bytea, p_request_id text)
RETURNS jsonb LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
DECLARE
    p organization_credit_pools;
    prior jsonb;
    in_use bigint;
    event uuid;
BEGIN
    IF p_limit IS NULL OR p_limit < 0 OR p_limit > 1000000000000000
       OR p_rate IS NULL OR p_rate < 0 OR p_rate > 1000000000 THEN
        RETURN '{"outcome": "INVALID_AMOUNT"}';
    END IF;
    p := lock_pool(p_org_id);
    IF p.org_id IS NULL THEN
        RETURN '{"outcome": "ORG_NOT_FOUND"}';
    END IF;
    prior := idempotency_lookup(p_org_id, p_idempotency_key, 'SetOverage', p_request_hash);
    IF prior IS NOT NULL THEN
        RETURN prior;
    END IF;
    in_use := greatest(0, p.used_millicredits + p.reserved_millicredits - p.total_millicredits);
    IF p_limit < in_use THEN
        RETURN idempotency_remember(p_org_id, p_idempotency_key, 'SetOverage', p_request_hash,
            jsonb_build_object('outcome', 'OVERAGE_IN_USE', 'in_use', in_use, 'requested', p_limit));
    END IF;
    INSERT INTO org_billing_history (org_id, event_type, details, idempotency_key, request_id)
    VALUES (p_org_id, 'OVERAGE_CHANGED',
            jsonb_build_object('old_limit', p.overage_limit_millicredits, 'new_limit', p_limit,
                               'old_rate', p.overage_rate_millicents_per_credit, 'new_rate', p_rate,
                               'in_use', in_use),
            p_idempotency_key, p_request_id)
    RETURNING event_id INTO event;
    UPDATE organization_credit_pools
       SET overage_limit_millicredits = p_limit,
           overage_rate_millicents_per_credit = p_rate,
           updated_at = ledger_now()
     WHERE org_id = p_org_id
    RETURNING * INTO p;
    RETURN idempotency_remember(p_org_id, p_idempotency_key, 'SetOverage', p_request_hash,
        jsonb_build_object('outcome', 'OK', 'event_id', event, 'pool', pool_json(p)));
END $$;

-- Sets a pool's refresh (p_refresh; NULL: the plan's) and rollover cap
-- (0007_periods_and_refresh.sql). Both apply from the next period start: a
-- refresh granted is not taken back, nor one not yet due granted early. On
-- OK the result also has event_id and pool.
CREATE OR REPLACE FUNCTION set_pool_refresh(
    p_org_id text, p_refresh bigint, p_rollover_cap bigint,
    p_idempotency_key text, p_request_hash bytea, p_request_id text)
RETURNS jsonb LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
DECLARE
    p organization_credit_pools;
    prior jsonb;
    event uuid;
BEGIN
    IF p_refresh < 0 OR p_refresh > 1000000000000000
       OR p_rollover_cap IS NULL OR p_rollover_cap < 0 OR p_rollover_cap > 1000000000000000000 THEN
        RETURN '{"outcome": "INVALID_AMOUNT"}';
    END IF;
    p := lock_pool(p_org_id);
    IF p.org_id IS NULL THEN
        RETURN '{"outcome": "ORG_NOT_FOUND"}';
    END IF;
    prior := idempotency_lookup(p_org_id, p_idempotency_key, 'SetCreditRefresh', p_request_hash);
    IF prior IS NOT NULL THEN
        RETURN prior;
    END IF;
    INSERT INTO org_billing_history (org_id, event_type, details, idempotency_key, request_id)
    VALUES (p_org_id, 'REFRESH_CHANGED',
            jsonb_build_object('old_refresh', p.refresh_override_millicredits, 'new_refresh', p_refresh,
                               'old_rollover_cap', p.rollover_cap_millicredits,
                               'new_rollover_cap', p_rollover_cap),
            p_idempotency_key, p_request_id)
    RETURNING event_id INTO event;
    UPDATE organization_credit_pools
       SET refresh_override_millicredits = p_refresh,
           rollover_cap_millicredits = p_rollover_cap,
           updated_at = ledger_now()
     WHERE org_id = p_org_id
    RETURNING * INTO p;
    RETURN idempotency_remember(p_org_id, p_idempotency_key, 'SetCreditRefresh', p_request_hash,
        jsonb_build_object('outcome', 'OK', 'event_id', event, 'pool', pool_json(p)));
END $$;
