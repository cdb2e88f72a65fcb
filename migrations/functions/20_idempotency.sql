-- Repeatable: this file holds the one current definition of each of its
-- functions, and the migration runner (server/migrate.py) re-applies it whole
-- whenever its checksum changes. To change a function, edit it here, never in
-- a versioned migration. Settings are written in the CREATE, as SET lines
-- before the body: CREATE OR REPLACE resets any set otherwise. CREATE OR
-- REPLACE cannot change a function's arguments or result type: to change
-- them, or to remove a function, this file drops the old signature itself
-- (DROP FUNCTION IF EXISTS name(old argument types)) before the new CREATE.

-- Idempotency keys other than successful deductions' (those are in their
-- attribution rows), in idempotency_records, one key space per organization
-- and operation family (see 0001_baseline.sql). The administrative functions
-- name their operation; the family is derived from it here.

-- The family of an operation. An operation not listed is a bug: fail loudly
-- rather than file its key in no family.
CREATE OR REPLACE FUNCTION idempotency_family(p_operation text) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    CASE p_operation
        -- Holds and refunds join the deductions: a caller's key names one
        -- charge (or its refund), however it is made (0001_baseline.sql).
        WHEN 'DeductCredits', 'ReserveCredits', 'CommitReservation', 'ReleaseReservation',
             'RefundCredits'
            THEN RETURN 'deductions';
        -- Overage is credit the org may spend before paying, and a refresh
        -- credits it grants: the same family (and the same scope,
        -- credits.grant) as adding credits.
        WHEN 'AddCredits', 'SetOverage', 'SetCreditRefresh' THEN RETURN 'credits';
        WHEN 'AllocateCredits', 'RevokeAllocation' THEN RETURN 'allocations';
        WHEN 'CreateSubscription', 'ChangePlan', 'CancelSubscription' THEN RETURN 'subscriptions';
        ELSE RAISE EXCEPTION 'operation % has no idempotency family', p_operation;
    END CASE;
END $$;

-- Returns NULL when the key is new in the operation's family, the stored
-- result (flagged as replayed) when it was used for this same request, or
-- IDEMPOTENCY_KEY_REUSED when it was used for anything else in the family.
-- Call it with the organization's pool locked. Deductions read their own
-- family themselves (30_deductions.sql).
CREATE OR REPLACE FUNCTION idempotency_lookup(p_org_id text, p_key text, p_operation text,
                                              p_request_hash bytea)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    key_family text := idempotency_family(p_operation);
    prior idempotency_records;
BEGIN
    SELECT * INTO prior FROM idempotency_records AS r
     WHERE r.org_id = p_org_id AND r.family = key_family AND r.idempotency_key = p_key;
    IF FOUND THEN
        IF prior.operation = p_operation AND prior.request_hash = p_request_hash THEN
            RETURN prior.result || '{"replayed": true}';
        END IF;
        RETURN '{"outcome": "IDEMPOTENCY_KEY_REUSED"}';
    END IF;
    RETURN NULL;
END $$;

-- Stores an administrative function's result, success or refusal, in the
-- same transaction as its effect; returns it as the caller's answer.
CREATE OR REPLACE FUNCTION idempotency_remember(p_org_id text, p_key text, p_operation text,
                                                p_request_hash bytea, p_result jsonb)
RETURNS jsonb LANGUAGE sql AS $$
    INSERT INTO idempotency_records (org_id, family, idempotency_key, operation, request_hash, result)
    VALUES (p_org_id, idempotency_family(p_operation), p_key, p_operation, p_request_hash, p_result)
    RETURNING result || '{"replayed": false}'
$$;

-- A refusal is an answer too: stored under its idempotency key like a
-- success, so the same key and request get the same refusal again. If only
-- successes were stored, an earlier attempt held up on its way to the
-- database (its caller timed out and retried, and the retry was refused)
-- could still be applied after the caller was told no: the bank test under
-- faults found it (tests/test_faults.py). A caller that wants to try again
-- after a refusal (say, after a top-up) sends a new key. Refusals found
-- before the pool is locked (unknown org, bad amount) change nothing and are
-- not stored.
--
-- Stores a deduction's refusal under its key; the result a replay returns.
CREATE OR REPLACE FUNCTION remember_deduction_refusal(
    p_org_id text, p_key text, p_request_hash bytea, p_outcome text,
    p_allocation_remaining bigint, p_pool_spendable bigint)
RETURNS void LANGUAGE sql AS $$
    INSERT INTO idempotency_records (org_id, family, idempotency_key, operation, request_hash, result)
    VALUES (p_org_id, 'deductions', p_key, 'DeductCredits', p_request_hash,
            jsonb_build_object('outcome', p_outcome,
                               'allocation_remaining', p_allocation_remaining,
                               'pool_spendable', p_pool_spendable))
$$;
