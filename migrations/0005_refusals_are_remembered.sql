-- A refusal is an answer too: it is now stored under its idempotency key,
-- like a success, so the same key and request get the same refusal again.
-- Before, only successes were stored, and an earlier attempt held up on its
-- way to the database (its caller timed out and retried, and the retry was
-- refused) could still be applied after the caller was told no: the bank
-- test under faults found it (tests/test_faults.py). A caller that wants to
-- try again after a refusal (say, after a top-up) sends a new key.
--
-- Refusals found before the pool is locked (unknown org, bad amount) change
-- nothing and are not stored.

-- Stores a deduction's refusal under its key; the result a replay returns.
CREATE FUNCTION remember_deduction_refusal(
    p_org_id text, p_key text, p_request_hash bytea, p_outcome text,
    p_allocation_remaining bigint, p_pool_spendable bigint)
RETURNS void LANGUAGE sql AS $$
    INSERT INTO idempotency_records (org_id, idempotency_key, operation, request_hash, result)
    VALUES (p_org_id, p_key, 'DeductCredits', p_request_hash,
            jsonb_build_object('outcome', p_outcome,
                               'allocation_remaining', p_allocation_remaining,
                               'pool_spendable', p_pool_spendable))
$$;

CREATE OR REPLACE FUNCTION deduct_credits_batch(
    p_org_ids text[], p_user_ids text[], p_amounts bigint[], p_service_types text[],
    p_service_names text[], p_idempotency_keys text[], p_request_hashes bytea[],
    p_request_ids text[], p_metadata jsonb[])
RETURNS TABLE (item integer, outcome text, deduction_id uuid, allocation_remaining bigint,
               pool_spendable bigint, replayed boolean)
LANGUAGE plpgsql AS $$
DECLARE
    -- One item per row. Items are read through unnest, never as p_x[i]:
    -- subscripting a flat array of variable-width elements walks it from the
    -- start, which would make a batch quadratic in its size.
    d record;
    current_org text;
    p organization_credit_pools;
    a user_credit_allocations;
    prior credit_usage_attribution;
    prior_refusal idempotency_records;
    pool_used_delta bigint := 0;
    -- The allocations charged in this org so far: a[u] of each array is one
    -- user. plpgsql has no map; array_position over a handful of users is fast.
    users text[];
    limits bigint[];
    used bigint[];
    reserved bigint[];
    periods integer[];
    u integer;
    remaining bigint;
    spendable bigint;
BEGIN
    FOR d IN
        SELECT * FROM unnest(p_org_ids, p_user_ids, p_amounts, p_service_types, p_service_names,
                             p_idempotency_keys, p_request_hashes, p_request_ids, p_metadata)
                      WITH ORDINALITY AS x(org_id, user_id, amount, service_type, service_name,
                                           idempotency_key, request_hash, request_id, metadata, n)
         ORDER BY x.org_id, x.n
    LOOP
        IF current_org IS DISTINCT FROM d.org_id THEN
            PERFORM flush_batch_balances(current_org, pool_used_delta, users, used);
            current_org := d.org_id;
            pool_used_delta := 0;
            users := '{}'; limits := '{}'; used := '{}'; reserved := '{}'; periods := '{}';
            SELECT * INTO p FROM organization_credit_pools WHERE org_id = d.org_id FOR UPDATE;
        END IF;

        item := d.n;
        outcome := 'OK';
        deduction_id := NULL;
        allocation_remaining := NULL;
        pool_spendable := NULL;
        replayed := false;

        IF d.amount IS NULL OR d.amount < 1 OR d.amount > 1000000000000000 THEN
            outcome := 'INVALID_AMOUNT'; RETURN NEXT; CONTINUE;
        END IF;
        IF p.org_id IS NULL THEN
            outcome := 'ORG_NOT_FOUND'; RETURN NEXT; CONTINUE;
        END IF;

        SELECT * INTO prior FROM credit_usage_attribution AS c
         WHERE c.org_id = d.org_id AND c.idempotency_key = d.idempotency_key;
        IF FOUND THEN
            IF prior.request_hash = d.request_hash THEN
                deduction_id := prior.deduction_id;
                allocation_remaining := prior.allocation_remaining_after;
                pool_spendable := prior.pool_spendable_after;
                replayed := true;
            ELSE
                outcome := 'IDEMPOTENCY_KEY_REUSED';
            END IF;
            RETURN NEXT; CONTINUE;
        END IF;
        SELECT * INTO prior_refusal FROM idempotency_records AS r
         WHERE r.org_id = d.org_id AND r.idempotency_key = d.idempotency_key;
        IF FOUND THEN
            IF prior_refusal.operation = 'DeductCredits'
               AND prior_refusal.request_hash = d.request_hash THEN
                outcome := prior_refusal.result ->> 'outcome';
                allocation_remaining := (prior_refusal.result ->> 'allocation_remaining')::bigint;
                pool_spendable := (prior_refusal.result ->> 'pool_spendable')::bigint;
                replayed := true;
            ELSE
                outcome := 'IDEMPOTENCY_KEY_REUSED';
            END IF;
            RETURN NEXT; CONTINUE;
        END IF;

        u := array_position(users, d.user_id);
        IF u IS NULL THEN
            SELECT * INTO a FROM user_credit_allocations AS x
             WHERE x.org_id = d.org_id AND x.user_id = d.user_id FOR UPDATE;
            IF NOT FOUND OR a.revoked_at IS NOT NULL THEN
                outcome := 'ALLOCATION_NOT_FOUND';
                PERFORM remember_deduction_refusal(d.org_id, d.idempotency_key, d.request_hash,
                                                   outcome, NULL, NULL);
                RETURN NEXT; CONTINUE;
            END IF;
            IF a.next_reset_at <= now() THEN
                a := reset_allocation_if_due(a);
            END IF;
            users := users || a.user_id;
            limits := limits || a.limit_millicredits;
            used := used || a.used_millicredits;
            reserved := reserved || a.reserved_millicredits;
            periods := periods || a.period_number;
            u := cardinality(users);
        END IF;

        remaining := limits[u] - used[u] - reserved[u];
        spendable := p.total_millicredits + p.overage_limit_millicredits
                     - p.used_millicredits - pool_used_delta - p.reserved_millicredits;
        IF d.amount > remaining OR d.amount > spendable THEN
            outcome := 'INSUFFICIENT_CREDITS';
            allocation_remaining := greatest(0, remaining);
            pool_spendable := greatest(0, spendable);
            PERFORM remember_deduction_refusal(d.org_id, d.idempotency_key, d.request_hash,
                                               outcome, allocation_remaining, pool_spendable);
            RETURN NEXT; CONTINUE;
        END IF;

        used[u] := used[u] + d.amount;
        pool_used_delta := pool_used_delta + d.amount;
        allocation_remaining := remaining - d.amount;
        pool_spendable := spendable - d.amount;
        INSERT INTO credit_usage_attribution (
            org_id, user_id, amount_millicredits, service_type, service_name, idempotency_key,
            request_hash, request_id, metadata, allocation_period,
            allocation_remaining_after, pool_spendable_after)
        VALUES (
            d.org_id, d.user_id, d.amount, d.service_type, d.service_name, d.idempotency_key,
            d.request_hash, d.request_id, d.metadata, periods[u],
            allocation_remaining, pool_spendable)
        RETURNING credit_usage_attribution.deduction_id INTO deduction_id;
        RETURN NEXT;
    END LOOP;
    PERFORM flush_batch_balances(current_org, pool_used_delta, users, used);
END $$;

CREATE OR REPLACE FUNCTION deduct_credits(
    p_org_id text, p_user_id text, p_amount bigint, p_service_type text, p_service_name text,
    p_idempotency_key text, p_request_hash bytea, p_request_id text, p_metadata jsonb)
RETURNS TABLE (outcome text, deduction_id uuid, allocation_remaining bigint,
               pool_spendable bigint, replayed boolean)
LANGUAGE plpgsql AS $$
DECLARE
    p organization_credit_pools;
    a user_credit_allocations;
    prior credit_usage_attribution;
    prior_refusal idempotency_records;
    remaining bigint;
    spendable bigint;
BEGIN
    replayed := false;
    IF p_amount IS NULL OR p_amount < 1 OR p_amount > 1000000000000000 THEN
        outcome := 'INVALID_AMOUNT'; RETURN NEXT; RETURN;
    END IF;

    SELECT * INTO p FROM organization_credit_pools WHERE org_id = p_org_id FOR UPDATE;
    IF NOT FOUND THEN
        outcome := 'ORG_NOT_FOUND'; RETURN NEXT; RETURN;
    END IF;

    SELECT * INTO prior FROM credit_usage_attribution
     WHERE org_id = p_org_id AND idempotency_key = p_idempotency_key;
    IF FOUND THEN
        IF prior.request_hash = p_request_hash THEN
            outcome := 'OK';
            deduction_id := prior.deduction_id;
            allocation_remaining := prior.allocation_remaining_after;
            pool_spendable := prior.pool_spendable_after;
            replayed := true;
        ELSE
            outcome := 'IDEMPOTENCY_KEY_REUSED';
        END IF;
        RETURN NEXT; RETURN;
    END IF;
    SELECT * INTO prior_refusal FROM idempotency_records
     WHERE org_id = p_org_id AND idempotency_key = p_idempotency_key;
    IF FOUND THEN
        IF prior_refusal.operation = 'DeductCredits' AND prior_refusal.request_hash = p_request_hash THEN
            outcome := prior_refusal.result ->> 'outcome';
            allocation_remaining := (prior_refusal.result ->> 'allocation_remaining')::bigint;
            pool_spendable := (prior_refusal.result ->> 'pool_spendable')::bigint;
            replayed := true;
        ELSE
            outcome := 'IDEMPOTENCY_KEY_REUSED';
        END IF;
        RETURN NEXT; RETURN;
    END IF;

    SELECT * INTO a FROM user_credit_allocations
     WHERE org_id = p_org_id AND user_id = p_user_id FOR UPDATE;
    IF NOT FOUND OR a.revoked_at IS NOT NULL THEN
        outcome := 'ALLOCATION_NOT_FOUND';
        PERFORM remember_deduction_refusal(p_org_id, p_idempotency_key, p_request_hash,
                                           outcome, NULL, NULL);
        RETURN NEXT; RETURN;
    END IF;
    IF a.next_reset_at <= now() THEN
        a := reset_allocation_if_due(a);
    END IF;

    remaining := a.limit_millicredits - a.used_millicredits - a.reserved_millicredits;
    spendable := p.total_millicredits + p.overage_limit_millicredits
                 - p.used_millicredits - p.reserved_millicredits;
    IF p_amount > remaining OR p_amount > spendable THEN
        outcome := 'INSUFFICIENT_CREDITS';
        allocation_remaining := greatest(0, remaining);
        pool_spendable := greatest(0, spendable);
        PERFORM remember_deduction_refusal(p_org_id, p_idempotency_key, p_request_hash,
                                           outcome, allocation_remaining, pool_spendable);
        RETURN NEXT; RETURN;
    END IF;

    UPDATE user_credit_allocations
       SET used_millicredits = used_millicredits + p_amount, updated_at = now()
     WHERE org_id = p_org_id AND user_id = p_user_id;
    UPDATE organization_credit_pools
       SET used_millicredits = used_millicredits + p_amount, updated_at = now()
     WHERE org_id = p_org_id;
    allocation_remaining := remaining - p_amount;
    pool_spendable := spendable - p_amount;
    INSERT INTO credit_usage_attribution (
        org_id, user_id, amount_millicredits, service_type, service_name, idempotency_key,
        request_hash, request_id, metadata, allocation_period,
        allocation_remaining_after, pool_spendable_after)
    VALUES (
        p_org_id, p_user_id, p_amount, p_service_type, p_service_name, p_idempotency_key,
        p_request_hash, p_request_id, p_metadata, a.period_number,
        allocation_remaining, pool_spendable)
    RETURNING credit_usage_attribution.deduction_id INTO deduction_id;
    outcome := 'OK';
    RETURN NEXT;
END $$;

CREATE OR REPLACE FUNCTION add_credits_to_pool(
    p_org_id text, p_source text, p_amount bigint, p_payment_reference text,
    p_amount_paid_cents bigint, p_currency text, p_reason text,
    p_idempotency_key text, p_request_hash bytea, p_request_id text)
RETURNS jsonb LANGUAGE plpgsql AS $$
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
    SELECT * INTO p FROM organization_credit_pools WHERE org_id = p_org_id FOR UPDATE;
    IF NOT FOUND THEN
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
       SET total_millicredits = total_millicredits + p_amount, updated_at = now()
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

CREATE OR REPLACE FUNCTION allocate_credits_to_user(
    p_org_id text, p_user_id text, p_limit bigint, p_reset_period text,
    p_idempotency_key text, p_request_hash bytea, p_request_id text)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    p organization_credit_pools;
    a user_credit_allocations;
    prior jsonb;
    old_limit bigint := 0;
BEGIN
    IF p_limit IS NULL OR p_limit < 0 OR p_limit > 1000000000000000 THEN
        RETURN '{"outcome": "INVALID_AMOUNT"}';
    END IF;
    SELECT * INTO p FROM organization_credit_pools WHERE org_id = p_org_id FOR UPDATE;
    IF NOT FOUND THEN
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
        VALUES (p_org_id, p_user_id, p_limit, p_reset_period, next_reset_after(p_reset_period, now()))
        RETURNING * INTO a;
    ELSE
        UPDATE user_credit_allocations
           SET limit_millicredits = p_limit,
               reset_period = p_reset_period,
               next_reset_at = CASE WHEN reset_period = p_reset_period THEN next_reset_at
                                    ELSE next_reset_after(p_reset_period, now()) END,
               revoked_at = NULL,
               updated_at = now()
         WHERE org_id = p_org_id AND user_id = p_user_id
        RETURNING * INTO a;
    END IF;
    UPDATE organization_credit_pools
       SET allocated_millicredits = allocated_millicredits - old_limit + p_limit, updated_at = now()
     WHERE org_id = p_org_id
    RETURNING * INTO p;
    INSERT INTO org_billing_history (org_id, event_type, user_id, details, idempotency_key, request_id)
    VALUES (p_org_id, 'ALLOCATION_CHANGED', p_user_id,
            jsonb_build_object('old_limit', old_limit, 'new_limit', p_limit, 'reset_period', p_reset_period),
            p_idempotency_key, p_request_id);
    RETURN idempotency_remember(p_org_id, p_idempotency_key, 'AllocateCredits', p_request_hash,
        jsonb_build_object('outcome', 'OK', 'allocation', allocation_json(a), 'pool', pool_json(p)));
END $$;

CREATE OR REPLACE FUNCTION revoke_allocation(
    p_org_id text, p_user_id text, p_idempotency_key text, p_request_hash bytea, p_request_id text)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    p organization_credit_pools;
    a user_credit_allocations;
    prior jsonb;
    old_limit bigint;
BEGIN
    SELECT * INTO p FROM organization_credit_pools WHERE org_id = p_org_id FOR UPDATE;
    IF NOT FOUND THEN
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
       SET limit_millicredits = 0, revoked_at = now(), updated_at = now()
     WHERE org_id = p_org_id AND user_id = p_user_id
    RETURNING * INTO a;
    UPDATE organization_credit_pools
       SET allocated_millicredits = allocated_millicredits - old_limit, updated_at = now()
     WHERE org_id = p_org_id
    RETURNING * INTO p;
    INSERT INTO org_billing_history (org_id, event_type, user_id, details, idempotency_key, request_id)
    VALUES (p_org_id, 'ALLOCATION_REVOKED', p_user_id, jsonb_build_object('old_limit', old_limit),
            p_idempotency_key, p_request_id);
    RETURN idempotency_remember(p_org_id, p_idempotency_key, 'RevokeAllocation', p_request_hash,
        jsonb_build_object('outcome', 'OK', 'allocation', allocation_json(a), 'pool', pool_json(p)));
END $$;

CREATE OR REPLACE FUNCTION create_subscription(
    p_org_id text, p_plan text, p_billing_cycle text, p_price_cents bigint, p_currency text,
    p_trial_days integer, p_external_customer_id text, p_external_subscription_id text,
    p_idempotency_key text, p_request_hash bytea, p_request_id text)
RETURNS jsonb LANGUAGE plpgsql AS $$
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
        p_price_cents, p_currency, now(), now() + period,
        CASE WHEN p_trial_days > 0 THEN now() + make_interval(days => p_trial_days) END,
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

CREATE OR REPLACE FUNCTION change_subscription_plan(
    p_org_id text, p_plan text, p_billing_cycle text, p_price_cents bigint, p_currency text,
    p_idempotency_key text, p_request_hash bytea, p_request_id text)
RETURNS jsonb LANGUAGE plpgsql AS $$
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
           currency = p_currency, updated_at = now()
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

CREATE OR REPLACE FUNCTION cancel_subscription(
    p_org_id text, p_reason text, p_idempotency_key text, p_request_hash bytea, p_request_id text)
RETURNS jsonb LANGUAGE plpgsql AS $$
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
       SET status = 'CANCELED', canceled_at = now(), updated_at = now()
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

-- CREATE OR REPLACE resets a function's settings: forbid sequential scans
-- again (see 0004_hot_path_plans.sql).
ALTER FUNCTION deduct_credits(text, text, bigint, text, text, text, bytea, text, jsonb)
    SET enable_seqscan = off;
ALTER FUNCTION deduct_credits_batch(text[], text[], bigint[], text[], text[], text[], bytea[], text[], jsonb[])
    SET enable_seqscan = off;
ALTER FUNCTION add_credits_to_pool(text, text, bigint, text, bigint, text, text, text, bytea, text)
    SET enable_seqscan = off;
ALTER FUNCTION allocate_credits_to_user(text, text, bigint, text, text, bytea, text)
    SET enable_seqscan = off;
ALTER FUNCTION revoke_allocation(text, text, text, bytea, text) SET enable_seqscan = off;
ALTER FUNCTION create_subscription(text, text, text, bigint, text, integer, text, text, text, bytea, text)
    SET enable_seqscan = off;
ALTER FUNCTION change_subscription_plan(text, text, text, bigint, text, text, bytea, text)
    SET enable_seqscan = off;
ALTER FUNCTION cancel_subscription(text, text, text, bytea, text) SET enable_seqscan = off;
