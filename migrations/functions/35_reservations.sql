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
--
-- Planned on every call (force_custom_plan), with the org and the tables'
-- sizes as they are: three indexes can answer the probe below, and a plan
-- kept for the session from the statistics of a small table chose the
-- primary key, then read every hold the org ever had on each call
-- (tests/test_ledger_plans.py), or, after an ANALYZE, the sweeper's index
-- of every org's open holds. Planning costs about 15 us more a call (17.5
-- against 2.2-2.7 us with the kept plan, 20,000 calls), paid only where
-- holds are open.
CREATE OR REPLACE FUNCTION release_expired_holds(p_org_id text) RETURNS integer
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
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
-- given; the server sends a lone call as a batch of one.
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
-- "Performance, round two"). So are the rows the calls write: new holds,
-- the commits' attribution rows, the ended holds and the stored answers are
-- gathered as columns and written after the last call, one statement a
-- table, as deduct_credits_batch writes its items. Written call by call, a
-- reserve and its commit cost 213-219 us of database CPU in batches of 16,
-- written at once 175 (benchmarks/micro/hold_batch_statements.py), and
-- under load 266-276 against 214-220; a lone call pays 65-110 us more,
-- mostly for this function's bookkeeping (benchmarks/README.md, "Reserve
-- and commit, written at once"). A key or a hold used again later in the
-- batch is read from what the calls before left in memory (key_owner,
-- hold_ended), since the tables do not have it yet: a key's stored answer,
-- a hold's end. A hold reserved in the batch cannot be named by a later
-- call of it: its ID is made here (uuidv7) and told to no one before the
-- transaction commits.
--
-- Locks: each org's pool (lock_pool, in org_id order), then its holds and
-- allocations as calls reach them: every writer of an allocation holds its
-- pool's lock first, so that order cannot deadlock. The writes at the end
-- touch only rows this transaction has locked, and new ones.
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
    -- By call (1-based position), as of after it: the call whose answer its
    -- key has stored in this batch (key_owner), with that call's operation,
    -- request hash and, for a commit that charged, its hold; and how this
    -- batch ended the call's hold (hold_ended). Each call starts from the
    -- last call before it with the same key, or hold.
    key_owner integer[] := array_fill(NULL::integer, ARRAY[item_count]);
    owner_operation text[] := array_fill(NULL::text, ARRAY[item_count]);
    owner_hash bytea[] := array_fill(NULL::bytea, ARRAY[item_count]);
    owner_hold uuid[] := array_fill(NULL::uuid, ARRAY[item_count]);
    hold_ended text[] := array_fill(NULL::text, ARRAY[item_count]);
    owner integer;
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
    stored idempotency_records;
    holder text;
    reserved bigint;
    remaining bigint;
    spendable bigint;
    held_at timestamptz;
    expires timestamptz;
    created uuid;
    charged uuid;
    answer jsonb;
    -- The rows to write after the last call, as columns. New holds:
    h_n integer[] := '{}';
    h_id uuid[] := '{}';
    h_created timestamptz[] := '{}';
    h_expires timestamptz[] := '{}';
    -- The commits' attribution rows (and, summed, their summaries):
    c_n integer[] := '{}';
    c_id uuid[] := '{}';
    c_org text[] := '{}';
    c_user text[] := '{}';
    c_type text[] := '{}';
    c_name text[] := '{}';
    c_amount bigint[] := '{}';
    c_metadata jsonb[] := '{}';
    c_period integer[] := '{}';
    c_remaining bigint[] := '{}';
    c_spendable bigint[] := '{}';
    -- The holds ended:
    e_org text[] := '{}';
    e_id uuid[] := '{}';
    e_state text[] := '{}';
    e_committed bigint[] := '{}';
    e_deduction uuid[] := '{}';
    -- The answers stored in idempotency_records:
    k_n integer[] := '{}';
    k_result jsonb[] := '{}';
BEGIN
    FOR d IN
        SELECT x.*,
               lag(x.n) OVER (PARTITION BY x.org_id, x.idempotency_key ORDER BY x.n) AS key_before,
               lag(x.n) OVER (PARTITION BY x.org_id, x.reservation_id ORDER BY x.n) AS hold_before
          FROM unnest(p_operations, p_org_ids, p_user_ids, p_reservation_ids, p_amounts,
                      p_ttls_us, p_service_types, p_service_names, p_idempotency_keys,
                      p_request_hashes, p_request_ids, p_metadata)
               WITH ORDINALITY AS x(operation, org_id, user_id, reservation_id, amount, ttl_us,
                                    service_type, service_name, idempotency_key, request_hash,
                                    request_id, metadata, n)
         ORDER BY x.org_id, x.n
    LOOP
        -- Any other operation is a bug: fail loudly, as idempotency_family does.
        IF d.operation NOT IN ('ReserveCredits', 'CommitReservation', 'ReleaseReservation')
           OR d.operation IS NULL THEN
            RAISE EXCEPTION 'reservations_batch cannot run %', d.operation;
        END IF;
        IF d.key_before IS NOT NULL THEN
            key_owner[d.n] := key_owner[d.key_before];
        END IF;
        IF d.hold_before IS NOT NULL THEN
            hold_ended[d.n] := hold_ended[d.hold_before];
        END IF;
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
        -- Any other answer of the family, as idempotency_lookup reads it.
        SELECT * INTO stored FROM idempotency_records
         WHERE org_id = d.org_id AND family = 'deductions' AND idempotency_key = d.idempotency_key;
        IF FOUND THEN
            IF stored.operation = d.operation AND stored.request_hash = d.request_hash THEN
                answers[d.n] := stored.result || '{"replayed": true}';
            ELSE
                answers[d.n] := '{"outcome": "IDEMPOTENCY_KEY_REUSED"}';
            END IF;
            CONTINUE;
        END IF;
        -- Used by a call before in this batch, the same two ways.
        owner := key_owner[d.n];
        IF owner IS NOT NULL THEN
            IF owner_operation[owner] = d.operation AND owner_hash[owner] = d.request_hash
               AND (owner_hold[owner] IS NULL OR owner_hold[owner] = d.reservation_id) THEN
                answers[d.n] := answers[owner] || '{"replayed": true}';
            ELSE
                answers[d.n] := '{"outcome": "IDEMPOTENCY_KEY_REUSED"}';
            END IF;
            CONTINUE;
        END IF;

        charged := NULL;
        <<decide>>
        BEGIN
            IF d.operation = 'ReserveCredits' THEN
                holder := d.user_id;
            ELSE
                SELECT * INTO r FROM credit_reservations
                 WHERE org_id = d.org_id AND reservation_id = d.reservation_id FOR UPDATE;
                IF NOT FOUND THEN
                    answer := '{"outcome": "RESERVATION_NOT_FOUND"}'; EXIT decide;
                END IF;
                r.state := coalesce(hold_ended[d.n], r.state);
                IF r.state <> 'OPEN' THEN
                    answer := jsonb_build_object('outcome', 'RESERVATION_NOT_OPEN', 'state', r.state);
                    EXIT decide;
                END IF;
                holder := r.user_id;
            END IF;

            -- The allocation, as the calls before left it: a is the last call's
            -- (users[u]), kept back in allocations only when another is needed
            -- (write_balances takes it as it is), since copying rows in and out
            -- of an array cost a lone call 30 us.
            IF u IS NULL OR users[u] IS DISTINCT FROM holder THEN
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
                answer := '{"outcome": "ALLOCATION_NOT_FOUND"}'; EXIT decide;
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
                    answer := jsonb_build_object(
                        'outcome', 'INSUFFICIENT_CREDITS',
                        'allocation_remaining', greatest(0, remaining),
                        'pool_spendable', greatest(0, spendable));
                    EXIT decide;
                END IF;
                a.reserved_millicredits := a.reserved_millicredits + d.amount;
                p.reserved_millicredits := p.reserved_millicredits + d.amount;
                created := uuidv7();
                -- Both ends from one reading of the clock, as the row's
                -- CHECK (expires_at > created_at) needs.
                held_at := ledger_now();
                expires := held_at + d.ttl_us * interval '1 microsecond';
                h_n := h_n || d.n::integer;
                h_id := h_id || created;
                h_created := h_created || held_at;
                h_expires := h_expires || expires;
                answer := jsonb_build_object(
                    'outcome', 'OK', 'reservation_id', created, 'expires_at_us', epoch_micros(expires),
                    'allocation_remaining', remaining - d.amount, 'pool_spendable', spendable - d.amount);
            WHEN 'CommitReservation' THEN
                -- The most this commit may charge: its own hold, and what is free besides.
                remaining := remaining + r.amount_millicredits;
                spendable := spendable + r.amount_millicredits;
                IF d.amount > r.amount_millicredits AND (d.amount > remaining OR d.amount > spendable) THEN
                    answer := jsonb_build_object(
                        'outcome', 'INSUFFICIENT_CREDITS',
                        'allocation_remaining', greatest(0, remaining),
                        'pool_spendable', greatest(0, spendable),
                        'held', r.amount_millicredits);
                    EXIT decide;
                END IF;
                a.used_millicredits := a.used_millicredits + d.amount;
                a.reserved_millicredits := a.reserved_millicredits - r.amount_millicredits;
                p.used_millicredits := p.used_millicredits + d.amount;
                p.reserved_millicredits := p.reserved_millicredits - r.amount_millicredits;
                -- Below zero only when the limit was cut under a hold committed in full.
                remaining := greatest(0, remaining - d.amount);
                spendable := greatest(0, spendable - d.amount);
                charged := uuidv7();
                c_n := c_n || d.n::integer;
                c_id := c_id || charged;
                c_org := c_org || d.org_id;
                c_user := c_user || r.user_id;
                c_type := c_type || r.service_type;
                c_name := c_name || r.service_name;
                c_amount := c_amount || d.amount;
                c_metadata := c_metadata || (r.metadata || d.metadata);
                c_period := c_period || a.period_number;
                c_remaining := c_remaining || remaining;
                c_spendable := c_spendable || spendable;
                e_org := e_org || d.org_id;
                e_id := e_id || d.reservation_id;
                e_state := e_state || 'COMMITTED'::text;
                e_committed := e_committed || d.amount;
                e_deduction := e_deduction || charged;
                hold_ended[d.n] := 'COMMITTED';
                answer := jsonb_build_object(
                    'outcome', 'OK', 'deduction_id', charged,
                    'allocation_remaining', remaining, 'pool_spendable', spendable);
            ELSE
                a.reserved_millicredits := a.reserved_millicredits - r.amount_millicredits;
                p.reserved_millicredits := p.reserved_millicredits - r.amount_millicredits;
                e_org := e_org || d.org_id;
                e_id := e_id || d.reservation_id;
                e_state := e_state || 'RELEASED'::text;
                e_committed := e_committed || NULL::bigint;
                e_deduction := e_deduction || NULL::uuid;
                hold_ended[d.n] := 'RELEASED';
                answer := jsonb_build_object(
                    'outcome', 'OK',
                    'allocation_remaining', greatest(0, a.limit_millicredits
                        - CASE WHEN a.next_reset_at <= ledger_now() THEN 0 ELSE a.used_millicredits END
                        - a.reserved_millicredits),
                    'pool_spendable', greatest(0, p.total_millicredits + p.overage_limit_millicredits
                                                  - p.used_millicredits - p.reserved_millicredits));
            END CASE;
        END decide;

        -- The answer is stored under the key, as a call alone stores it: a
        -- commit's charge in its attribution row, any other answer in
        -- idempotency_records (idempotency_remember); a later call of this
        -- batch with the key finds it through key_owner.
        key_owner[d.n] := d.n;
        owner_operation[d.n] := d.operation;
        owner_hash[d.n] := d.request_hash;
        IF charged IS NOT NULL THEN
            owner_hold[d.n] := d.reservation_id;
        ELSE
            k_n := k_n || d.n::integer;
            k_result := k_result || answer;
        END IF;
        answers[d.n] := answer || '{"replayed": false}';
    END LOOP;
    IF current_org IS NOT NULL THEN
        PERFORM write_balances(p, allocations, a);
    END IF;

    -- The rows, one statement a table, each only when there is something to
    -- write (a statement costs its executor's start and end even with no
    -- rows). The calls' own columns are joined back by position from one
    -- unnest, never read as p_x[i] (subscripting a flat array walks it).
    IF cardinality(h_n) > 0 THEN
        INSERT INTO credit_reservations (
            org_id, reservation_id, user_id, amount_millicredits, service_type, service_name,
            idempotency_key, request_id, metadata, created_at, expires_at)
        SELECT i.org_id, h.id, i.user_id, i.amount, i.service_type, i.service_name,
               i.idempotency_key, i.request_id, i.metadata, h.created_at, h.expires_at
          FROM unnest(p_org_ids, p_user_ids, p_amounts, p_service_types, p_service_names,
                      p_idempotency_keys, p_request_ids, p_metadata)
               WITH ORDINALITY AS i(org_id, user_id, amount, service_type, service_name,
                                    idempotency_key, request_id, metadata, n)
          JOIN unnest(h_n, h_id, h_created, h_expires) AS h(n, id, created_at, expires_at)
            ON h.n = i.n;
    END IF;
    IF cardinality(c_n) > 0 THEN
        INSERT INTO credit_usage_attribution (
            org_id, deduction_id, user_id, amount_millicredits, service_type, service_name,
            idempotency_key, request_hash, request_id, metadata, allocation_period,
            allocation_remaining_after, pool_spendable_after, reservation_id)
        SELECT c.org_id, c.id, c.user_id, c.amount, c.service_type, c.service_name,
               i.idempotency_key, i.request_hash, i.request_id, c.metadata, c.period,
               c.remaining, c.spendable, i.reservation_id
          FROM unnest(p_idempotency_keys, p_request_hashes, p_request_ids, p_reservation_ids)
               WITH ORDINALITY AS i(idempotency_key, request_hash, request_id, reservation_id, n)
          JOIN unnest(c_n, c_id, c_org, c_user, c_type, c_name, c_amount, c_metadata, c_period,
                      c_remaining, c_spendable)
               AS c(n, id, org_id, user_id, service_type, service_name, amount, metadata, period,
                    remaining, spendable) ON c.n = i.n;
        PERFORM add_usage_to_summaries(s.org_id, s.user_id, s.service_type, s.service_name,
                                       sum(s.amount)::bigint, count(*))
           FROM unnest(c_org, c_user, c_type, c_name, c_amount)
                AS s(org_id, user_id, service_type, service_name, amount)
          GROUP BY s.org_id, s.user_id, s.service_type, s.service_name;
    END IF;
    -- Each hold ends once in a batch (a later call finds it ended).
    IF cardinality(e_id) > 0 THEN
        UPDATE credit_reservations AS h
           SET state = e.state, resolved_at = ledger_now(),
               committed_millicredits = e.committed, deduction_id = e.deduction_id
          FROM unnest(e_org, e_id, e_state, e_committed, e_deduction)
               AS e(org_id, reservation_id, state, committed, deduction_id)
         WHERE h.org_id = e.org_id AND h.reservation_id = e.reservation_id
           AND h.org_id = ANY (e_org) AND h.reservation_id = ANY (e_id);
    END IF;
    IF cardinality(k_n) > 0 THEN
        INSERT INTO idempotency_records (org_id, family, idempotency_key, operation, request_hash, result)
        SELECT i.org_id, 'deductions', i.idempotency_key, i.operation, i.request_hash, k.result
          FROM unnest(p_org_ids, p_idempotency_keys, p_operations, p_request_hashes)
               WITH ORDINALITY AS i(org_id, idempotency_key, operation, request_hash, n)
          JOIN unnest(k_n, k_result) AS k(n, result) ON k.n = i.n;
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
