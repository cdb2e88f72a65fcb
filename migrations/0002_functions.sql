-- The ledger's operations. Each mutation is one function, called as one
-- statement, so it is one short transaction with no network call inside.
-- Rules every function follows:
--   * locks are taken in one order: the pool row, then the allocation row;
--   * amounts are checked to be positive (or non-zero) and at most 10^15;
--   * the idempotency key is checked after the pool lock, so two calls with
--     the same key are serialized and the second sees the first's record;
--   * business refusals are returned as an outcome, never raised, so a batch
--     can carry on past an item that fails.

CREATE FUNCTION next_reset_after(p_period text, p_at timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE AS $$
    SELECT (CASE p_period
        WHEN 'DAILY'   THEN date_trunc('day',   p_at AT TIME ZONE 'UTC') + interval '1 day'
        WHEN 'WEEKLY'  THEN date_trunc('week',  p_at AT TIME ZONE 'UTC') + interval '7 days'
        WHEN 'MONTHLY' THEN date_trunc('month', p_at AT TIME ZONE 'UTC') + interval '1 month'
    END) AT TIME ZONE 'UTC'
$$;

CREATE FUNCTION epoch_micros(p_at timestamptz) RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$
    SELECT floor(extract(epoch FROM p_at) * 1000000)::bigint
$$;

CREATE FUNCTION pool_json(p organization_credit_pools) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object(
        'org_id', p.org_id,
        'total', p.total_millicredits,
        'allocated', p.allocated_millicredits,
        'used', p.used_millicredits,
        'reserved', p.reserved_millicredits,
        'overage_limit', p.overage_limit_millicredits)
$$;

CREATE FUNCTION allocation_json(a user_credit_allocations) RETURNS jsonb
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

CREATE FUNCTION subscription_json(s organization_subscriptions) RETURNS jsonb
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

-- Returns NULL when the key is new, the stored result (flagged as replayed)
-- when it was used for this same request, or IDEMPOTENCY_KEY_REUSED when it
-- was used for anything else. Call it with the organization's pool locked.
CREATE FUNCTION idempotency_lookup(p_org_id text, p_key text, p_operation text, p_request_hash bytea)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    prior idempotency_records;
BEGIN
    SELECT * INTO prior FROM idempotency_records
     WHERE org_id = p_org_id AND idempotency_key = p_key;
    IF FOUND THEN
        IF prior.operation = p_operation AND prior.request_hash = p_request_hash THEN
            RETURN prior.result || '{"replayed": true}';
        END IF;
        RETURN '{"outcome": "IDEMPOTENCY_KEY_REUSED"}';
    END IF;
    PERFORM 1 FROM credit_usage_attribution
     WHERE org_id = p_org_id AND idempotency_key = p_key;
    IF FOUND THEN
        RETURN '{"outcome": "IDEMPOTENCY_KEY_REUSED"}';
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION idempotency_remember(p_org_id text, p_key text, p_operation text,
                                     p_request_hash bytea, p_result jsonb)
RETURNS jsonb LANGUAGE sql AS $$
    INSERT INTO idempotency_records (org_id, idempotency_key, operation, request_hash, result)
    VALUES (p_org_id, p_key, p_operation, p_request_hash, p_result)
    RETURNING result || '{"replayed": false}'
$$;

-- Starts a new period for an allocation whose reset time has passed. Periods
-- are reset lazily, by the first operation that locks the allocation after
-- its reset time, so no background job is needed for correctness.
CREATE FUNCTION reset_allocation_if_due(a user_credit_allocations) RETURNS user_credit_allocations
LANGUAGE plpgsql AS $$
DECLARE
    used_before bigint := a.used_millicredits;
BEGIN
    IF a.next_reset_at IS NULL OR a.next_reset_at > now() THEN
        RETURN a;
    END IF;
    UPDATE user_credit_allocations
       SET used_millicredits = 0,
           period_number = period_number + 1,
           next_reset_at = next_reset_after(reset_period, now()),
           updated_at = now()
     WHERE org_id = a.org_id AND user_id = a.user_id
    RETURNING * INTO a;
    INSERT INTO org_billing_history (org_id, event_type, user_id, details)
    VALUES (a.org_id, 'PERIOD_RESET', a.user_id,
            jsonb_build_object('used_before', used_before, 'period_number', a.period_number));
    RETURN a;
END $$;

-- Whether an amount fits the allocation and the pool. Reads only.
CREATE FUNCTION has_sufficient_credits(p_org_id text, p_user_id text, p_amount bigint)
RETURNS TABLE (outcome text, sufficient boolean, allocation_remaining bigint, pool_spendable bigint)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    p organization_credit_pools;
    a user_credit_allocations;
    used_this_period bigint;
BEGIN
    IF p_amount IS NULL OR p_amount < 1 OR p_amount > 1000000000000000 THEN
        outcome := 'INVALID_AMOUNT'; RETURN NEXT; RETURN;
    END IF;
    SELECT * INTO p FROM organization_credit_pools WHERE org_id = p_org_id;
    IF NOT FOUND THEN
        outcome := 'ORG_NOT_FOUND'; RETURN NEXT; RETURN;
    END IF;
    SELECT * INTO a FROM user_credit_allocations
     WHERE org_id = p_org_id AND user_id = p_user_id AND revoked_at IS NULL;
    IF NOT FOUND THEN
        outcome := 'ALLOCATION_NOT_FOUND'; RETURN NEXT; RETURN;
    END IF;
    used_this_period := CASE WHEN a.next_reset_at <= now() THEN 0 ELSE a.used_millicredits END;
    allocation_remaining := greatest(0, a.limit_millicredits - used_this_period - a.reserved_millicredits);
    pool_spendable := greatest(0, p.total_millicredits + p.overage_limit_millicredits
                                  - p.used_millicredits - p.reserved_millicredits);
    sufficient := p_amount <= least(allocation_remaining, pool_spendable);
    outcome := 'OK';
    RETURN NEXT;
END $$;

-- Charges one deduction. Outcomes: OK (replayed or not), INVALID_AMOUNT,
-- ORG_NOT_FOUND, ALLOCATION_NOT_FOUND, IDEMPOTENCY_KEY_REUSED,
-- INSUFFICIENT_CREDITS (with what is available in allocation_remaining and
-- pool_spendable).
CREATE FUNCTION deduct_credits(
    p_org_id text, p_user_id text, p_amount bigint, p_service_type text, p_service_name text,
    p_idempotency_key text, p_request_hash bytea, p_request_id text, p_metadata jsonb)
RETURNS TABLE (outcome text, deduction_id uuid, allocation_remaining bigint,
               pool_spendable bigint, replayed boolean)
LANGUAGE plpgsql AS $$
DECLARE
    p organization_credit_pools;
    a user_credit_allocations;
    prior credit_usage_attribution;
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
    PERFORM 1 FROM idempotency_records
     WHERE org_id = p_org_id AND idempotency_key = p_idempotency_key;
    IF FOUND THEN
        outcome := 'IDEMPOTENCY_KEY_REUSED'; RETURN NEXT; RETURN;
    END IF;

    SELECT * INTO a FROM user_credit_allocations
     WHERE org_id = p_org_id AND user_id = p_user_id FOR UPDATE;
    IF NOT FOUND OR a.revoked_at IS NOT NULL THEN
        outcome := 'ALLOCATION_NOT_FOUND'; RETURN NEXT; RETURN;
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

-- Writes what a batch charged in one org: each allocation's new used, and the
-- pool's used, once each. Does nothing when the batch charged nothing there.
CREATE FUNCTION flush_batch_balances(p_org_id text, p_pool_used_delta bigint,
                                     p_users text[], p_used bigint[])
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF p_org_id IS NULL OR p_pool_used_delta = 0 THEN
        RETURN;
    END IF;
    UPDATE user_credit_allocations AS a
       SET used_millicredits = x.used, updated_at = now()
      FROM unnest(p_users, p_used) AS x(user_id, used)
     WHERE a.org_id = p_org_id AND a.user_id = x.user_id AND a.used_millicredits <> x.used;
    UPDATE organization_credit_pools
       SET used_millicredits = used_millicredits + p_pool_used_delta, updated_at = now()
     WHERE org_id = p_org_id;
END $$;

-- Many deductions in one transaction, each with its own outcome, with the
-- semantics of running them one at a time in the order given: each is checked
-- against the balances the ones before it left, and a refusal fails only its
-- own item. Each pool is locked once and updated once, however many items
-- charge it, and pools are locked in org_id order, the same in every
-- transaction, so batches from several replicas cannot deadlock. Returns one
-- row per item (item is its 1-based position), in no particular order.
CREATE FUNCTION deduct_credits_batch(
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
        PERFORM 1 FROM idempotency_records AS r
         WHERE r.org_id = d.org_id AND r.idempotency_key = d.idempotency_key;
        IF FOUND THEN
            outcome := 'IDEMPOTENCY_KEY_REUSED'; RETURN NEXT; CONTINUE;
        END IF;

        u := array_position(users, d.user_id);
        IF u IS NULL THEN
            SELECT * INTO a FROM user_credit_allocations AS x
             WHERE x.org_id = d.org_id AND x.user_id = d.user_id FOR UPDATE;
            IF NOT FOUND OR a.revoked_at IS NOT NULL THEN
                outcome := 'ALLOCATION_NOT_FOUND'; RETURN NEXT; CONTINUE;
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

-- Adds credits to a pool (or, by ADJUSTMENT, removes them). Returns a jsonb
-- outcome; on OK also event_id, added and pool.
CREATE FUNCTION add_credits_to_pool(
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
            RETURN '{"outcome": "PAYMENT_ALREADY_RECORDED"}';
        END IF;
    END IF;
    IF p.total_millicredits + p_amount > 1000000000000000000 THEN
        RETURN jsonb_build_object('outcome', 'POOL_TOTAL_LIMIT_EXCEEDED',
                                  'available', 1000000000000000000 - p.total_millicredits,
                                  'requested', p_amount);
    END IF;
    IF p_amount < 0 THEN
        -- A removal may take only what is neither allocated nor spent.
        removable := least(p.total_millicredits - p.allocated_millicredits,
                           p.total_millicredits + p.overage_limit_millicredits
                           - p.used_millicredits - p.reserved_millicredits);
        IF -p_amount > removable THEN
            RETURN jsonb_build_object('outcome', 'INSUFFICIENT_CREDITS',
                                      'available', greatest(0, removable), 'requested', -p_amount);
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

-- Sets a user's limit: a first allocation, a raise, a cut (even below what is
-- used), or the renewal of a revoked one. The sum of limits may not exceed
-- the pool's total.
CREATE FUNCTION allocate_credits_to_user(
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
        RETURN jsonb_build_object('outcome', 'INSUFFICIENT_UNALLOCATED_CREDITS',
            'available', p.total_millicredits - p.allocated_millicredits + old_limit,
            'requested', p_limit);
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

-- Revokes a user's allocation: its limit goes to 0 and back to the pool.
CREATE FUNCTION revoke_allocation(
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
        RETURN '{"outcome": "ALLOCATION_NOT_FOUND"}';
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

-- Subscribes an organization, creating it and its pool on first use. The
-- price comes from the server's catalog (p_price_cents), never the caller.
CREATE FUNCTION create_subscription(
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
        RETURN '{"outcome": "SUBSCRIPTION_EXISTS"}';
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

-- Moves the live subscription to another plan or cycle, recorded as an
-- upgrade or downgrade by the monthly equivalent of the catalog prices.
CREATE FUNCTION change_subscription_plan(
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
        RETURN '{"outcome": "SUBSCRIPTION_NOT_FOUND"}';
    END IF;
    IF old.plan = p_plan AND old.billing_cycle = p_billing_cycle THEN
        RETURN '{"outcome": "PLAN_UNCHANGED"}';
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

CREATE FUNCTION cancel_subscription(
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
        RETURN '{"outcome": "SUBSCRIPTION_NOT_FOUND"}';
    END IF;
    INSERT INTO org_billing_history (org_id, event_type, subscription_id, details, idempotency_key, request_id)
    VALUES (p_org_id, 'SUBSCRIPTION_CANCELED', s.subscription_id,
            jsonb_build_object('reason', p_reason), p_idempotency_key, p_request_id);
    RETURN idempotency_remember(p_org_id, p_idempotency_key, 'CancelSubscription', p_request_hash,
        jsonb_build_object('outcome', 'OK', 'subscription', subscription_json(s)));
END $$;
