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

-- Reserve, Commit and Release calls in one transaction, each with its own
-- answer, with the semantics of running them one at a time in the order
-- given (and exactly those of reserve_credits, commit_reservation and
-- release_reservation below, which are this function for one call).
-- Returns one row per call (item is its 1-based position), in no
-- particular order. Answers are jsonb: outcome, and
--   ReserveCredits, OK: reservation_id, expires_at_us, allocation_remaining,
--     pool_spendable, replayed; refused exactly as deduct_credits refuses a
--     charge of the same amount; INVALID_TTL for a TTL out of range;
--   CommitReservation, OK: deduction_id, allocation_remaining,
--     pool_spendable, replayed. It charges the amount for an open hold and
--     ends the hold, writing one attribution row linked to it: up to the held
--     amount it always fits (the credits were set aside); beyond it, only if
--     the allocation and the pool have the difference free, else
--     INSUFFICIENT_CREDITS (with held) and the hold kept;
--   ReleaseReservation, OK: allocation_remaining, pool_spendable, replayed.
--     It ends an open hold whole, charging nothing;
--   RESERVATION_NOT_OPEN carries the hold's state.
--
-- The balances are kept in memory and written once per pool and allocation,
-- after the org's last call, as deduct_credits_batch does, and the charges
-- are added to the summaries once per bucket: one function call a hold,
-- each rewriting the hot pool and allocation rows, cost about 210 us of
-- database CPU a hold in batches of 16, this about 115
-- (benchmarks/micro/hold_batch_statements.py; benchmarks/README.md,
-- "Performance, round two"). Holds, keys and attribution rows are written
-- call by call, so a key or a hold used twice in one batch reads what the
-- call before it wrote.
--
-- Locks: each org's pool (lock_pool, in org_id order), then its allocations
-- as calls reach them: every writer of an allocation holds its pool's lock
-- first, so that order cannot deadlock.
CREATE OR REPLACE FUNCTION reservations_batch(
    p_operations text[], p_org_ids text[], p_user_ids text[], p_reservation_ids uuid[],
    p_amounts bigint[], p_ttls_us bigint[], p_service_types text[], p_service_names text[],
    p_idempotency_keys text[], p_request_hashes bytea[], p_request_ids text[], p_metadata jsonb[])
RETURNS TABLE (item integer, result jsonb)
LANGUAGE plpgsql
SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    item_count integer := coalesce(cardinality(p_operations), 0);
    answers jsonb[] := array_fill(NULL::jsonb, ARRAY[item_count]);
    d record;
    current_org text;
    -- The current org's pool and the allocations its calls reached so far,
    -- as the calls before left them (plpgsql has no map; an org's users in
    -- one batch are few).
    p organization_credit_pools;
    users text[];
    allocations user_credit_allocations[];
    u integer;
    a user_credit_allocations;
    r credit_reservations;
    prior credit_usage_attribution;
    prior_answer jsonb;
    holder text;
    reserved bigint;
    remaining bigint;
    spendable bigint;
    charged uuid;
    -- The commits' charges, for the summaries.
    s_org text[] := '{}';
    s_user text[] := '{}';
    s_type text[] := '{}';
    s_name text[] := '{}';
    s_amount bigint[] := '{}';
BEGIN
    FOR d IN
        SELECT * FROM unnest(p_operations, p_org_ids, p_user_ids, p_reservation_ids, p_amounts,
                             p_ttls_us, p_service_types, p_service_names, p_idempotency_keys,
                             p_request_hashes, p_request_ids, p_metadata)
               WITH ORDINALITY AS x(operation, org_id, user_id, reservation_id, amount, ttl_us,
                                    service_type, service_name, idempotency_key, request_hash,
                                    request_id, metadata, n)
         ORDER BY x.org_id, x.n
    LOOP
        IF current_org IS DISTINCT FROM d.org_id THEN
            IF current_org IS NOT NULL THEN
                PERFORM write_balances(p, allocations, a);
            END IF;
            current_org := d.org_id;
            p := lock_pool(d.org_id);
            users := '{}';
            allocations := '{}';
            u := NULL;
        END IF;

        IF d.operation <> 'ReleaseReservation'
           AND (d.amount IS NULL OR d.amount < 1 OR d.amount > 1000000000000000) THEN
            answers[d.n] := '{"outcome": "INVALID_AMOUNT"}'; CONTINUE;
        END IF;
        -- The server bounds the TTL by its settings; this only keeps the row sane.
        IF d.operation = 'ReserveCredits'
           AND (d.ttl_us IS NULL OR d.ttl_us < 1 OR d.ttl_us > 31622400000000) THEN
            answers[d.n] := '{"outcome": "INVALID_TTL"}'; CONTINUE;
        END IF;
        IF p.org_id IS NULL THEN
            answers[d.n] := '{"outcome": "ORG_NOT_FOUND"}'; CONTINUE;
        END IF;

        -- A key of the deductions family used by a deduction or a commit. A
        -- successful commit's key is in its attribution row, like a
        -- deduction's; the reservation must match too, so no deduction's row
        -- can pass for it.
        SELECT * INTO prior FROM credit_usage_attribution
         WHERE org_id = d.org_id AND idempotency_key = d.idempotency_key;
        IF FOUND THEN
            IF d.operation = 'CommitReservation' AND prior.request_hash = d.request_hash
               AND prior.reservation_id = d.reservation_id THEN
                answers[d.n] := jsonb_build_object(
                    'outcome', 'OK', 'deduction_id', prior.deduction_id,
                    'allocation_remaining', prior.allocation_remaining_after,
                    'pool_spendable', prior.pool_spendable_after, 'replayed', true);
            ELSE
                answers[d.n] := '{"outcome": "IDEMPOTENCY_KEY_REUSED"}';
            END IF;
            CONTINUE;
        END IF;
        prior_answer := idempotency_lookup(d.org_id, d.idempotency_key, d.operation, d.request_hash);
        IF prior_answer IS NOT NULL THEN
            answers[d.n] := prior_answer; CONTINUE;
        END IF;

        IF d.operation = 'ReserveCredits' THEN
            holder := d.user_id;
        ELSE
            SELECT * INTO r FROM credit_reservations
             WHERE org_id = d.org_id AND reservation_id = d.reservation_id FOR UPDATE;
            IF NOT FOUND THEN
                answers[d.n] := idempotency_remember(d.org_id, d.idempotency_key, d.operation,
                    d.request_hash, '{"outcome": "RESERVATION_NOT_FOUND"}');
                CONTINUE;
            END IF;
            IF r.state <> 'OPEN' THEN
                answers[d.n] := idempotency_remember(d.org_id, d.idempotency_key, d.operation,
                    d.request_hash, jsonb_build_object('outcome', 'RESERVATION_NOT_OPEN', 'state', r.state));
                CONTINUE;
            END IF;
            holder := r.user_id;
        END IF;

        -- The allocation, as the calls before left it: a is the last call's
        -- (users[u]), kept back in allocations only when another is needed
        -- (write_balances takes it as it is), since copying rows in and out
        -- of an array cost a lone call 30 us.
        IF u IS NULL OR users[u] <> holder THEN
            IF u IS NOT NULL THEN
                allocations[u] := a;
            END IF;
            u := array_position(users, holder);
            IF u IS NULL THEN
                SELECT * INTO a FROM user_credit_allocations
                 WHERE org_id = d.org_id AND user_id = holder FOR UPDATE;
                IF FOUND THEN
                    users := users || holder;
                    allocations := allocations || a;
                    u := cardinality(users);
                END IF;
            ELSE
                a := allocations[u];
            END IF;
        END IF;
        IF d.operation = 'ReserveCredits' AND (u IS NULL OR a.revoked_at IS NOT NULL) THEN
            answers[d.n] := idempotency_remember(d.org_id, d.idempotency_key, d.operation,
                d.request_hash, '{"outcome": "ALLOCATION_NOT_FOUND"}');
            CONTINUE;
        END IF;
        -- A charge starts the allocation's new period first; a release only
        -- answers as if it had (below). The reset writes the row's period and
        -- used; reserved stays as this batch left it.
        IF d.operation <> 'ReleaseReservation' AND a.next_reset_at <= ledger_now() THEN
            reserved := a.reserved_millicredits;
            a := reset_allocation_if_due(a);
            a.reserved_millicredits := reserved;
        END IF;

        remaining := a.limit_millicredits - a.used_millicredits - a.reserved_millicredits;
        spendable := p.total_millicredits + p.overage_limit_millicredits
                     - p.used_millicredits - p.reserved_millicredits;
        CASE d.operation
        WHEN 'ReserveCredits' THEN
            IF d.amount > remaining OR d.amount > spendable THEN
                answers[d.n] := idempotency_remember(d.org_id, d.idempotency_key, d.operation,
                    d.request_hash, jsonb_build_object(
                        'outcome', 'INSUFFICIENT_CREDITS',
                        'allocation_remaining', greatest(0, remaining),
                        'pool_spendable', greatest(0, spendable)));
                CONTINUE;
            END IF;
            a.reserved_millicredits := a.reserved_millicredits + d.amount;
            p.reserved_millicredits := p.reserved_millicredits + d.amount;
            INSERT INTO credit_reservations (
                org_id, user_id, amount_millicredits, service_type, service_name,
                idempotency_key, request_id, metadata, expires_at)
            VALUES (
                d.org_id, d.user_id, d.amount, d.service_type, d.service_name,
                d.idempotency_key, d.request_id, d.metadata,
                ledger_now() + d.ttl_us * interval '1 microsecond')
            RETURNING * INTO r;
            answers[d.n] := idempotency_remember(d.org_id, d.idempotency_key, d.operation,
                d.request_hash, jsonb_build_object(
                    'outcome', 'OK', 'reservation_id', r.reservation_id,
                    'expires_at_us', epoch_micros(r.expires_at),
                    'allocation_remaining', remaining - d.amount,
                    'pool_spendable', spendable - d.amount));
        WHEN 'CommitReservation' THEN
            -- The most this commit may charge: its own hold, and what is free besides.
            remaining := remaining + r.amount_millicredits;
            spendable := spendable + r.amount_millicredits;
            IF d.amount > r.amount_millicredits AND (d.amount > remaining OR d.amount > spendable) THEN
                answers[d.n] := idempotency_remember(d.org_id, d.idempotency_key, d.operation,
                    d.request_hash, jsonb_build_object(
                        'outcome', 'INSUFFICIENT_CREDITS',
                        'allocation_remaining', greatest(0, remaining),
                        'pool_spendable', greatest(0, spendable),
                        'held', r.amount_millicredits));
                CONTINUE;
            END IF;
            a.used_millicredits := a.used_millicredits + d.amount;
            a.reserved_millicredits := a.reserved_millicredits - r.amount_millicredits;
            p.used_millicredits := p.used_millicredits + d.amount;
            p.reserved_millicredits := p.reserved_millicredits - r.amount_millicredits;
            -- Below zero only when the limit was cut under a hold committed in full.
            remaining := greatest(0, remaining - d.amount);
            spendable := greatest(0, spendable - d.amount);
            INSERT INTO credit_usage_attribution (
                org_id, user_id, amount_millicredits, service_type, service_name, idempotency_key,
                request_hash, request_id, metadata, allocation_period,
                allocation_remaining_after, pool_spendable_after, reservation_id)
            VALUES (
                d.org_id, r.user_id, d.amount, r.service_type, r.service_name, d.idempotency_key,
                d.request_hash, d.request_id, r.metadata || d.metadata, a.period_number,
                remaining, spendable, r.reservation_id)
            RETURNING deduction_id INTO charged;
            UPDATE credit_reservations
               SET state = 'COMMITTED', resolved_at = ledger_now(),
                   committed_millicredits = d.amount, deduction_id = charged
             WHERE org_id = d.org_id AND reservation_id = d.reservation_id;
            s_org := s_org || d.org_id;
            s_user := s_user || r.user_id;
            s_type := s_type || r.service_type;
            s_name := s_name || r.service_name;
            s_amount := s_amount || d.amount;
            answers[d.n] := jsonb_build_object(
                'outcome', 'OK', 'deduction_id', charged,
                'allocation_remaining', remaining, 'pool_spendable', spendable, 'replayed', false);
        ELSE
            a.reserved_millicredits := a.reserved_millicredits - r.amount_millicredits;
            p.reserved_millicredits := p.reserved_millicredits - r.amount_millicredits;
            UPDATE credit_reservations
               SET state = 'RELEASED', resolved_at = ledger_now()
             WHERE org_id = d.org_id AND reservation_id = d.reservation_id;
            answers[d.n] := idempotency_remember(d.org_id, d.idempotency_key, d.operation,
                d.request_hash, jsonb_build_object(
                    'outcome', 'OK',
                    'allocation_remaining', greatest(0, a.limit_millicredits
                        - CASE WHEN a.next_reset_at <= ledger_now() THEN 0 ELSE a.used_millicredits END
                        - a.reserved_millicredits),
                    'pool_spendable', greatest(0, p.total_millicredits + p.overage_limit_millicredits
                                                  - p.used_millicredits - p.reserved_millicredits)));
        END CASE;
    END LOOP;
    IF current_org IS NOT NULL THEN
        PERFORM write_balances(p, allocations, a);
    END IF;

    IF cardinality(s_org) > 0 THEN
        PERFORM add_usage_to_summaries(s.org_id, s.user_id, s.service_type, s.service_name,
                                       sum(s.amount)::bigint, count(*))
           FROM unnest(s_org, s_user, s_type, s_name, s_amount)
                AS s(org_id, user_id, service_type, service_name, amount)
          GROUP BY s.org_id, s.user_id, s.service_type, s.service_name;
    END IF;

    RETURN QUERY SELECT x.n::integer, x.answer FROM unnest(answers) WITH ORDINALITY AS x(answer, n);
END $$;

-- Writes the balances a batch kept in memory: a pool's used and reserved,
-- and those of its allocations, where they changed; latest, the allocation
-- the batch's last call used, stands for its older copy in allocations.
DROP FUNCTION IF EXISTS write_balances(organization_credit_pools, user_credit_allocations[]);
CREATE OR REPLACE FUNCTION write_balances(p organization_credit_pools,
                                          allocations user_credit_allocations[],
                                          latest user_credit_allocations)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    a user_credit_allocations;
BEGIN
    UPDATE organization_credit_pools AS x
       SET used_millicredits = p.used_millicredits,
           reserved_millicredits = p.reserved_millicredits, updated_at = ledger_now()
     WHERE x.org_id = p.org_id
       AND (x.used_millicredits, x.reserved_millicredits)
           IS DISTINCT FROM (p.used_millicredits, p.reserved_millicredits);
    -- One statement per allocation: an org's users in a batch are few, and
    -- joining unnest() cost a lone call more than the loop.
    FOREACH a IN ARRAY allocations LOOP
        IF a.org_id = latest.org_id AND a.user_id = latest.user_id THEN
            a := latest;
        END IF;
        UPDATE user_credit_allocations AS x
           SET used_millicredits = a.used_millicredits,
               reserved_millicredits = a.reserved_millicredits, updated_at = ledger_now()
         WHERE x.org_id = a.org_id AND x.user_id = a.user_id
           AND (x.used_millicredits, x.reserved_millicredits)
               IS DISTINCT FROM (a.used_millicredits, a.reserved_millicredits);
    END LOOP;
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
