-- Repeatable: this file holds the one current definition of each of its
-- functions, and the migration runner (server/migrate.py) re-applies it whole
-- whenever its checksum changes. To change a function, edit it here, never in
-- a versioned migration. Settings are written in the CREATE, as SET lines
-- before the body: CREATE OR REPLACE resets any set otherwise. CREATE OR
-- REPLACE cannot change a function's arguments or result type: to change
-- them, or to remove a function, this file drops the old signature itself
-- (DROP FUNCTION IF EXISTS name(old argument types)) before the new CREATE.

-- Refunds: a refund is an attribution row with a negative amount linked to
-- its deduction (0004_refunds.sql says why). Rare, so one call is one
-- transaction of its own, not group commit's.

-- Gives p_amount of deduction p_deduction_id back to the pool and to the
-- allocation, recording the refund as negative usage and as a REFUND event.
-- The refunds of one deduction never add up to more than it charged: they
-- are summed under the pool lock, which every refund of the org takes first.
-- The allocation gets it back in its current period: all of it for a
-- deduction of this period (whose charge is still in used); for one charged
-- before the last reset, as far as used allows (used never goes below 0),
-- while the pool always gets the whole amount.
-- Returns jsonb: outcome, and on OK refund_id, allocation_remaining,
-- pool_spendable, replayed; REFUND_EXCEEDS_DEDUCTION carries refundable.
-- Refusals after the pool is locked are stored under the key, as a
-- deduction's are (20_idempotency.sql).
CREATE OR REPLACE FUNCTION refund_credits(
    p_org_id text, p_deduction_id uuid, p_amount bigint, p_reason text,
    p_idempotency_key text, p_request_hash bytea, p_request_id text)
RETURNS jsonb
LANGUAGE plpgsql
SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    p organization_credit_pools;
    a user_credit_allocations;
    d credit_usage_attribution;
    prior credit_usage_attribution;
    prior_record jsonb;
    refundable bigint;
    allocation_part bigint;
    remaining bigint;
    spendable bigint;
    refund uuid;
BEGIN
    IF p_amount IS NULL OR p_amount < 1 OR p_amount > 1000000000000000 THEN
        RETURN '{"outcome": "INVALID_AMOUNT"}';
    END IF;
    p := lock_pool(p_org_id);
    IF p.org_id IS NULL THEN
        RETURN '{"outcome": "ORG_NOT_FOUND"}';
    END IF;

    -- A refund's key is in its row, like a deduction's; the deduction must
    -- match too, so no other row's key can pass for it.
    SELECT * INTO prior FROM credit_usage_attribution
     WHERE org_id = p_org_id AND idempotency_key = p_idempotency_key;
    IF FOUND THEN
        IF prior.request_hash = p_request_hash AND prior.refund_of = p_deduction_id THEN
            RETURN jsonb_build_object('outcome', 'OK', 'refund_id', prior.deduction_id,
                                      'allocation_remaining', prior.allocation_remaining_after,
                                      'pool_spendable', prior.pool_spendable_after,
                                      'replayed', true);
        END IF;
        RETURN '{"outcome": "IDEMPOTENCY_KEY_REUSED"}';
    END IF;
    prior_record := idempotency_lookup(p_org_id, p_idempotency_key, 'RefundCredits', p_request_hash);
    IF prior_record IS NOT NULL THEN
        RETURN prior_record;
    END IF;

    -- Only a deduction (or a commit) can be refunded, not a refund.
    SELECT * INTO d FROM credit_usage_attribution
     WHERE deduction_id = p_deduction_id AND org_id = p_org_id AND refund_of IS NULL;
    IF NOT FOUND THEN
        RETURN idempotency_remember(p_org_id, p_idempotency_key, 'RefundCredits', p_request_hash,
                                    '{"outcome": "DEDUCTION_NOT_FOUND"}');
    END IF;
    SELECT d.amount_millicredits + coalesce(sum(r.amount_millicredits), 0) INTO refundable
      FROM credit_usage_attribution AS r
     WHERE r.refund_of = p_deduction_id AND r.org_id = p_org_id;
    IF p_amount > refundable THEN
        RETURN idempotency_remember(p_org_id, p_idempotency_key, 'RefundCredits', p_request_hash,
            jsonb_build_object('outcome', 'REFUND_EXCEEDS_DEDUCTION', 'refundable', refundable,
                               'charged', d.amount_millicredits));
    END IF;

    SELECT * INTO a FROM user_credit_allocations
     WHERE org_id = p_org_id AND user_id = d.user_id FOR UPDATE;
    IF a.next_reset_at <= ledger_now() THEN
        a := reset_allocation_if_due(a);
    END IF;
    -- The whole amount when the deduction is of this period (its charge is
    -- in used); otherwise what this period has used, at most.
    allocation_part := least(p_amount, a.used_millicredits);

    UPDATE user_credit_allocations
       SET used_millicredits = used_millicredits - allocation_part, updated_at = ledger_now()
     WHERE org_id = p_org_id AND user_id = d.user_id
    RETURNING * INTO a;
    UPDATE organization_credit_pools
       SET used_millicredits = used_millicredits - p_amount, updated_at = ledger_now()
     WHERE org_id = p_org_id
    RETURNING * INTO p;
    -- A limit lowered under what is used leaves nothing to spend, not less.
    remaining := greatest(0, a.limit_millicredits - a.used_millicredits - a.reserved_millicredits);
    spendable := greatest(0, p.total_millicredits + p.overage_limit_millicredits
                             - p.used_millicredits - p.reserved_millicredits);
    INSERT INTO credit_usage_attribution (
        org_id, user_id, amount_millicredits, service_type, service_name, idempotency_key,
        request_hash, request_id, metadata, allocation_period,
        allocation_remaining_after, pool_spendable_after,
        refund_of, refund_reason, allocation_refund_millicredits)
    VALUES (
        p_org_id, d.user_id, -p_amount, d.service_type, d.service_name, p_idempotency_key,
        p_request_hash, p_request_id, '{}', a.period_number,
        remaining, spendable, p_deduction_id, p_reason, allocation_part)
    RETURNING deduction_id INTO refund;
    -- Negative usage of the deduction's user and service, today; no request.
    PERFORM add_usage_to_summaries(p_org_id, d.user_id, d.service_type, d.service_name,
                                   -p_amount, 0);
    INSERT INTO org_billing_history (org_id, event_type, user_id, details, idempotency_key, request_id)
    VALUES (p_org_id, 'REFUND', d.user_id,
            jsonb_build_object('refund_id', refund, 'deduction_id', p_deduction_id,
                               'amount_millicredits', p_amount, 'reason', p_reason,
                               'allocation_refund_millicredits', allocation_part),
            p_idempotency_key, p_request_id);
    RETURN jsonb_build_object('outcome', 'OK', 'refund_id', refund,
                              'allocation_remaining', remaining, 'pool_spendable', spendable,
                              'replayed', false);
END $$;
