-- Repeatable: this file holds the one current definition of each of its
-- functions, and the migration runner (server/migrate.py) re-applies it whole
-- whenever its checksum changes. To change a function, edit it here, never in
-- a versioned migration. Settings are written in the CREATE, as SET lines
-- before the body: CREATE OR REPLACE resets any set otherwise. CREATE OR
-- REPLACE cannot change a function's arguments or result type: to change
-- them, or to remove a function, this file drops the old signature itself
-- (DROP FUNCTION IF EXISTS name(old argument types)) before the new CREATE.

-- Reservations (holds, 0003_reservations.sql): Reserve, Commit, Release,
-- their reads, and expiry. Settings: see 30_deductions.sql.
--
-- Expiry is exact without a timer. A pool's and an allocation's
-- reserved_millicredits are the sums of their OPEN holds, expired or not;
-- so whoever locks a pool first persists the org's expired holds
-- (release_expired_holds), and only then reads a balance: from the instant
-- of its expires_at a hold counts for nothing in any charge. Readers, who
-- lock nothing, subtract them instead (expired_holds). A pool with no
-- reserved credits has no open hold, so the hot path pays nothing more than
-- reading a column it already has. Keys of these calls are in the
-- deductions family (0001_baseline.sql): a commit's in its attribution row,
-- the others' in idempotency_records.

-- Persists the org's expired holds: EXPIRED, resolved at their expiry, their
-- amounts taken off the allocations' and the pool's reserved. Call with the
-- pool locked: every writer of an allocation holds its pool's lock first, so
-- the allocations updated here in any order cannot deadlock. Returns how
-- many holds it expired.
CREATE OR REPLACE FUNCTION release_expired_holds(p_org_id text) RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
    expired_count integer;
    expired_amount bigint;
BEGIN
    -- The common case, a probe of the open holds' index, costs the hot path
    -- little; the writes below only when there is something to write.
    PERFORM 1 FROM credit_reservations
     WHERE org_id = p_org_id AND state = 'OPEN' AND expires_at <= ledger_now() LIMIT 1;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    WITH expired AS (
        UPDATE credit_reservations
           SET state = 'EXPIRED', resolved_at = expires_at
         WHERE org_id = p_org_id AND state = 'OPEN' AND expires_at <= ledger_now()
        RETURNING user_id, amount_millicredits),
    per_user AS (
        SELECT user_id, sum(amount_millicredits)::bigint AS amount, count(*)::integer AS holds
          FROM expired GROUP BY user_id),
    allocations AS (
        UPDATE user_credit_allocations AS a
           SET reserved_millicredits = a.reserved_millicredits - u.amount, updated_at = ledger_now()
          FROM per_user AS u
         WHERE a.org_id = p_org_id AND a.user_id = u.user_id
        RETURNING u.amount, u.holds)
    SELECT coalesce(sum(holds), 0), coalesce(sum(amount), 0)
      INTO expired_count, expired_amount FROM allocations;
    IF expired_count > 0 THEN
        UPDATE organization_credit_pools
           SET reserved_millicredits = reserved_millicredits - expired_amount, updated_at = ledger_now()
         WHERE org_id = p_org_id;
    END IF;
    RETURN expired_count;
END $$;

-- Locks an org's pool for a change, with what is due by now applied first:
-- its expired holds persisted (release_expired_holds), so that no balance
-- read after it counts them, then its ended subscription periods advanced
-- with their refreshes (advance_due_periods, 50_subscriptions.sql). A NULL
-- row when the org has no pool. Every writer but the deductions starts
-- here; they write the same steps inline (a call costs the hot path).
CREATE OR REPLACE FUNCTION lock_pool(p_org_id text) RETURNS organization_credit_pools
LANGUAGE plpgsql
AS $$
DECLARE
    p organization_credit_pools;
BEGIN
    SELECT * INTO p FROM organization_credit_pools WHERE org_id = p_org_id FOR UPDATE;
    IF FOUND AND p.reserved_millicredits > 0 AND release_expired_holds(p_org_id) > 0 THEN
        SELECT * INTO p FROM organization_credit_pools WHERE org_id = p_org_id;
    END IF;
    IF p.period_ends_at <= ledger_now() THEN
        p := advance_due_periods(p);
    END IF;
    RETURN p;
END $$;

-- What the org's expired but not yet persisted holds still count in its
-- reserved balances: for the pool, and for one user's allocation. For
-- readers, who lock nothing and so persist nothing.
CREATE OR REPLACE FUNCTION expired_holds(p_org_id text, p_user_id text,
                                         OUT pool_expired bigint, OUT user_expired bigint)
LANGUAGE sql STABLE AS $$
    SELECT coalesce(sum(amount_millicredits), 0)::bigint,
           coalesce(sum(amount_millicredits) FILTER (WHERE user_id = p_user_id), 0)::bigint
      FROM credit_reservations
     WHERE org_id = p_org_id AND state = 'OPEN' AND expires_at <= ledger_now()
$$;

-- A reservation as the API shows it, as of now: an OPEN hold past its
-- expiry shows as EXPIRED, resolved at its expiry, swept or not.
CREATE OR REPLACE FUNCTION reservation_json_now(r credit_reservations) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'org_id', r.org_id,
        'reservation_id', r.reservation_id,
        'user_id', r.user_id,
        'amount', r.amount_millicredits,
        'state', CASE WHEN r.state = 'OPEN' AND r.expires_at <= ledger_now() THEN 'EXPIRED' ELSE r.state END,
        'service_type', r.service_type,
        'service_name', r.service_name,
        'metadata', r.metadata,
        'created_at_us', epoch_micros(r.created_at),
        'expires_at_us', epoch_micros(r.expires_at),
        'resolved_at_us', epoch_micros(CASE WHEN r.state = 'OPEN' AND r.expires_at <= ledger_now()
                                            THEN r.expires_at ELSE r.resolved_at END),
        'committed', r.committed_millicredits,
        'deduction_id', r.deduction_id)
$$;

-- Holds an amount against the user's allocation and the pool for p_ttl_us
-- microseconds. Refused exactly as deduct_credits refuses a charge of the
-- same amount. Returns jsonb: outcome, and on OK reservation_id,
-- expires_at_us, allocation_remaining, pool_spendable, replayed.
CREATE OR REPLACE FUNCTION reserve_credits(
    p_org_id text, p_user_id text, p_amount bigint, p_ttl_us bigint, p_service_type text,
    p_service_name text, p_idempotency_key text, p_request_hash bytea, p_request_id text,
    p_metadata jsonb)
RETURNS jsonb
LANGUAGE plpgsql
SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    p organization_credit_pools;
    a user_credit_allocations;
    prior jsonb;
    remaining bigint;
    spendable bigint;
    r credit_reservations;
BEGIN
    IF p_amount IS NULL OR p_amount < 1 OR p_amount > 1000000000000000 THEN
        RETURN '{"outcome": "INVALID_AMOUNT"}';
    END IF;
    -- The server bounds the TTL by its settings; this only keeps the row sane.
    IF p_ttl_us IS NULL OR p_ttl_us < 1 OR p_ttl_us > 31622400000000 THEN
        RETURN '{"outcome": "INVALID_TTL"}';
    END IF;
    p := lock_pool(p_org_id);
    IF p.org_id IS NULL THEN
        RETURN '{"outcome": "ORG_NOT_FOUND"}';
    END IF;

    -- A key of the deductions family used by a deduction or a commit.
    PERFORM 1 FROM credit_usage_attribution
     WHERE org_id = p_org_id AND idempotency_key = p_idempotency_key;
    IF FOUND THEN
        RETURN '{"outcome": "IDEMPOTENCY_KEY_REUSED"}';
    END IF;
    prior := idempotency_lookup(p_org_id, p_idempotency_key, 'ReserveCredits', p_request_hash);
    IF prior IS NOT NULL THEN
        RETURN prior;
    END IF;

    SELECT * INTO a FROM user_credit_allocations
     WHERE org_id = p_org_id AND user_id = p_user_id AND revoked_at IS NULL FOR UPDATE;
    IF NOT FOUND THEN
        RETURN idempotency_remember(p_org_id, p_idempotency_key, 'ReserveCredits', p_request_hash,
                                    '{"outcome": "ALLOCATION_NOT_FOUND"}');
    END IF;
    IF a.next_reset_at <= ledger_now() THEN
        a := reset_allocation_if_due(a);
    END IF;

    remaining := a.limit_millicredits - a.used_millicredits - a.reserved_millicredits;
    spendable := p.total_millicredits + p.overage_limit_millicredits
                 - p.used_millicredits - p.reserved_millicredits;
    IF p_amount > remaining OR p_amount > spendable THEN
        RETURN idempotency_remember(p_org_id, p_idempotency_key, 'ReserveCredits', p_request_hash,
            jsonb_build_object('outcome', 'INSUFFICIENT_CREDITS',
                               'allocation_remaining', greatest(0, remaining),
                               'pool_spendable', greatest(0, spendable)));
    END IF;

    UPDATE user_credit_allocations
       SET reserved_millicredits = reserved_millicredits + p_amount, updated_at = ledger_now()
     WHERE org_id = p_org_id AND user_id = p_user_id;
    UPDATE organization_credit_pools
       SET reserved_millicredits = reserved_millicredits + p_amount, updated_at = ledger_now()
     WHERE org_id = p_org_id;
    INSERT INTO credit_reservations (
        org_id, user_id, amount_millicredits, service_type, service_name, idempotency_key,
        request_id, metadata, expires_at)
    VALUES (
        p_org_id, p_user_id, p_amount, p_service_type, p_service_name, p_idempotency_key,
        p_request_id, p_metadata, ledger_now() + p_ttl_us * interval '1 microsecond')
    RETURNING * INTO r;
    RETURN idempotency_remember(p_org_id, p_idempotency_key, 'ReserveCredits', p_request_hash,
        jsonb_build_object('outcome', 'OK', 'reservation_id', r.reservation_id,
                           'expires_at_us', epoch_micros(r.expires_at),
                           'allocation_remaining', remaining - p_amount,
                           'pool_spendable', spendable - p_amount));
END $$;

-- Charges p_amount for an open hold and releases the hold, in one
-- transaction, writing one attribution row linked to it. Up to the held
-- amount it always fits (the credits were set aside); beyond it, only if the
-- allocation and the pool have the difference free, else
-- INSUFFICIENT_CREDITS with the hold kept. Returns jsonb: outcome, and on
-- OK deduction_id, allocation_remaining, pool_spendable, replayed;
-- RESERVATION_NOT_OPEN carries the hold's state.
CREATE OR REPLACE FUNCTION commit_reservation(
    p_org_id text, p_reservation_id uuid, p_amount bigint, p_idempotency_key text,
    p_request_hash bytea, p_request_id text, p_metadata jsonb)
RETURNS jsonb
LANGUAGE plpgsql
SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    p organization_credit_pools;
    a user_credit_allocations;
    r credit_reservations;
    prior credit_usage_attribution;
    prior_record jsonb;
    remaining bigint;
    spendable bigint;
    charged uuid;
BEGIN
    IF p_amount IS NULL OR p_amount < 1 OR p_amount > 1000000000000000 THEN
        RETURN '{"outcome": "INVALID_AMOUNT"}';
    END IF;
    p := lock_pool(p_org_id);
    IF p.org_id IS NULL THEN
        RETURN '{"outcome": "ORG_NOT_FOUND"}';
    END IF;

    -- A successful commit's key is in its attribution row, like a deduction's;
    -- the reservation must match too, so no deduction's row can pass for it.
    SELECT * INTO prior FROM credit_usage_attribution
     WHERE org_id = p_org_id AND idempotency_key = p_idempotency_key;
    IF FOUND THEN
        IF prior.request_hash = p_request_hash AND prior.reservation_id = p_reservation_id THEN
            RETURN jsonb_build_object('outcome', 'OK', 'deduction_id', prior.deduction_id,
                                      'allocation_remaining', prior.allocation_remaining_after,
                                      'pool_spendable', prior.pool_spendable_after,
                                      'replayed', true);
        END IF;
        RETURN '{"outcome": "IDEMPOTENCY_KEY_REUSED"}';
    END IF;
    prior_record := idempotency_lookup(p_org_id, p_idempotency_key, 'CommitReservation', p_request_hash);
    IF prior_record IS NOT NULL THEN
        RETURN prior_record;
    END IF;

    SELECT * INTO r FROM credit_reservations
     WHERE org_id = p_org_id AND reservation_id = p_reservation_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN idempotency_remember(p_org_id, p_idempotency_key, 'CommitReservation', p_request_hash,
                                    '{"outcome": "RESERVATION_NOT_FOUND"}');
    END IF;
    IF r.state <> 'OPEN' THEN
        RETURN idempotency_remember(p_org_id, p_idempotency_key, 'CommitReservation', p_request_hash,
                                    jsonb_build_object('outcome', 'RESERVATION_NOT_OPEN', 'state', r.state));
    END IF;
    SELECT * INTO a FROM user_credit_allocations
     WHERE org_id = p_org_id AND user_id = r.user_id FOR UPDATE;
    IF a.next_reset_at <= ledger_now() THEN
        a := reset_allocation_if_due(a);
    END IF;

    -- The most this commit may charge: its own hold, and what is free besides.
    remaining := a.limit_millicredits - a.used_millicredits - a.reserved_millicredits + r.amount_millicredits;
    spendable := p.total_millicredits + p.overage_limit_millicredits
                 - p.used_millicredits - p.reserved_millicredits + r.amount_millicredits;
    IF p_amount > r.amount_millicredits AND (p_amount > remaining OR p_amount > spendable) THEN
        RETURN idempotency_remember(p_org_id, p_idempotency_key, 'CommitReservation', p_request_hash,
            jsonb_build_object('outcome', 'INSUFFICIENT_CREDITS',
                               'allocation_remaining', greatest(0, remaining),
                               'pool_spendable', greatest(0, spendable),
                               'held', r.amount_millicredits));
    END IF;

    UPDATE user_credit_allocations
       SET used_millicredits = used_millicredits + p_amount,
           reserved_millicredits = reserved_millicredits - r.amount_millicredits,
           updated_at = ledger_now()
     WHERE org_id = p_org_id AND user_id = r.user_id;
    UPDATE organization_credit_pools
       SET used_millicredits = used_millicredits + p_amount,
           reserved_millicredits = reserved_millicredits - r.amount_millicredits,
           updated_at = ledger_now()
     WHERE org_id = p_org_id;
    -- Below zero only when the limit was cut under a hold committed in full.
    remaining := greatest(0, remaining - p_amount);
    spendable := greatest(0, spendable - p_amount);
    INSERT INTO credit_usage_attribution (
        org_id, user_id, amount_millicredits, service_type, service_name, idempotency_key,
        request_hash, request_id, metadata, allocation_period,
        allocation_remaining_after, pool_spendable_after, reservation_id)
    VALUES (
        p_org_id, r.user_id, p_amount, r.service_type, r.service_name, p_idempotency_key,
        p_request_hash, p_request_id, r.metadata || p_metadata, a.period_number,
        remaining, spendable, r.reservation_id)
    RETURNING deduction_id INTO charged;
    PERFORM add_usage_to_summaries(p_org_id, r.user_id, r.service_type, r.service_name, p_amount, 1);
    UPDATE credit_reservations
       SET state = 'COMMITTED', resolved_at = ledger_now(), committed_millicredits = p_amount,
           deduction_id = charged
     WHERE org_id = p_org_id AND reservation_id = p_reservation_id;
    RETURN jsonb_build_object('outcome', 'OK', 'deduction_id', charged,
                              'allocation_remaining', remaining, 'pool_spendable', spendable,
                              'replayed', false);
END $$;

-- Releases an open hold whole: nothing is charged. Returns jsonb: outcome,
-- and on OK allocation_remaining, pool_spendable, replayed;
-- RESERVATION_NOT_OPEN carries the hold's state.
CREATE OR REPLACE FUNCTION release_reservation(
    p_org_id text, p_reservation_id uuid, p_idempotency_key text, p_request_hash bytea,
    p_request_id text)
RETURNS jsonb
LANGUAGE plpgsql
SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    p organization_credit_pools;
    a user_credit_allocations;
    r credit_reservations;
    prior jsonb;
BEGIN
    p := lock_pool(p_org_id);
    IF p.org_id IS NULL THEN
        RETURN '{"outcome": "ORG_NOT_FOUND"}';
    END IF;
    PERFORM 1 FROM credit_usage_attribution
     WHERE org_id = p_org_id AND idempotency_key = p_idempotency_key;
    IF FOUND THEN
        RETURN '{"outcome": "IDEMPOTENCY_KEY_REUSED"}';
    END IF;
    prior := idempotency_lookup(p_org_id, p_idempotency_key, 'ReleaseReservation', p_request_hash);
    IF prior IS NOT NULL THEN
        RETURN prior;
    END IF;

    SELECT * INTO r FROM credit_reservations
     WHERE org_id = p_org_id AND reservation_id = p_reservation_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN idempotency_remember(p_org_id, p_idempotency_key, 'ReleaseReservation', p_request_hash,
                                    '{"outcome": "RESERVATION_NOT_FOUND"}');
    END IF;
    IF r.state <> 'OPEN' THEN
        RETURN idempotency_remember(p_org_id, p_idempotency_key, 'ReleaseReservation', p_request_hash,
                                    jsonb_build_object('outcome', 'RESERVATION_NOT_OPEN', 'state', r.state));
    END IF;
    UPDATE user_credit_allocations
       SET reserved_millicredits = reserved_millicredits - r.amount_millicredits, updated_at = ledger_now()
     WHERE org_id = p_org_id AND user_id = r.user_id
    RETURNING * INTO a;
    UPDATE organization_credit_pools
       SET reserved_millicredits = reserved_millicredits - r.amount_millicredits, updated_at = ledger_now()
     WHERE org_id = p_org_id
    RETURNING * INTO p;
    UPDATE credit_reservations
       SET state = 'RELEASED', resolved_at = ledger_now()
     WHERE org_id = p_org_id AND reservation_id = p_reservation_id;
    RETURN idempotency_remember(p_org_id, p_idempotency_key, 'ReleaseReservation', p_request_hash,
        jsonb_build_object(
            'outcome', 'OK',
            'allocation_remaining', greatest(0, a.limit_millicredits
                - CASE WHEN a.next_reset_at <= ledger_now() THEN 0 ELSE a.used_millicredits END
                - a.reserved_millicredits),
            'pool_spendable', greatest(0, p.total_millicredits + p.overage_limit_millicredits
                                          - p.used_millicredits - p.reserved_millicredits)));
END $$;

-- The sweeper's batch: persists the expired holds of the orgs of the (up to)
-- p_holds_max oldest expired holds, locking their pools in org_id order as
-- every batch does. Returns how many holds it expired. Correctness never
-- waits for it (see the top of this file): it keeps the open holds few and
-- the states on disk true for reports.
CREATE OR REPLACE FUNCTION sweep_expired_reservations(p_holds_max integer) RETURNS integer
LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
DECLARE
    orgs text[];
    org text;
    expired_count integer := 0;
BEGIN
    SELECT array_agg(DISTINCT e.org_id) INTO orgs
      FROM (SELECT org_id FROM credit_reservations
             WHERE state = 'OPEN' AND expires_at <= ledger_now()
             ORDER BY expires_at LIMIT p_holds_max) AS e;
    IF orgs IS NULL THEN
        RETURN 0;
    END IF;
    FOR org IN SELECT org_id FROM organization_credit_pools
                WHERE org_id = ANY (orgs) ORDER BY org_id FOR UPDATE
    LOOP
        expired_count := expired_count + release_expired_holds(org);
    END LOOP;
    RETURN expired_count;
END $$;
