-- Repeatable: this file holds the one current definition of each of its
-- functions, and the migration runner (server/migrate.py) re-applies it whole
-- whenever its checksum changes. To change a function, edit it here, never in
-- a versioned migration. Settings are written in the CREATE, as SET lines
-- before the body: CREATE OR REPLACE resets any set otherwise. CREATE OR
-- REPLACE cannot change a function's arguments or result type: to change
-- them, or to remove a function, this file drops the old signature itself
-- (DROP FUNCTION IF EXISTS name(old argument types)) before the new CREATE.

-- The hot path: Check, Deduct and DeductBatch.
--
-- Settings, the same on every ledger function that touches the tables:
--   * enable_seqscan = off. plpgsql caches a generic plan per statement, and
--     one first planned while a table was tiny (a new database, just
--     analyzed) stays as the table grows. Measured: the idempotency lookup of
--     deduct_credits_batch settled on a sequential scan, or on an index that
--     matched only org_id and read every attribution row of the org for each
--     deduction. Every row is found through a primary key, whatever the
--     statistics say.
--   * Sequential scans off is not enough for a join: with a table of a
--     few thousand rows (allocations), or of a few rows when the plan was
--     made (a new deployment's first deductions), the planner would rather
--     hash or merge the whole table, through any index, than probe it once
--     per item, and that plan stays as the table grows. So the batch probes
--     each row it needs by its key, in a LATERAL subquery that the planner
--     cannot flatten into a join (OFFSET 0; or FOR UPDATE), and its
--     UPDATE ... FROM statements name the keys with = ANY, so that only the
--     batch's rows are read. One case is left, for deduct_credits too:
--     statistics taken while credit_usage_attribution was empty (an ANALYZE
--     by hand on a new database) make any index holding org_id look as good
--     as the key for a probe (PostgreSQL 18 skip-scans them), until the
--     next ANALYZE, autovacuum's after the first 50 rows, makes the plans
--     again (benchmarks/README.md, "Plans that read whole tables").
--   * plan_cache_mode = force_generic_plan, on the deductions. The batch's
--     statements take arrays whose length the planner cannot see, so
--     plpgsql's plan cache judged every custom plan cheaper than the generic
--     one and planned each statement anew on every call: a batch of one cost
--     2.2-2.4 ms of database CPU (measured), a single deduct_credits 0.5 ms.
--     With sequential scans off, the generic plans are index lookups that
--     suit one item and a thousand alike.

-- Adds charges to the usage summary tables (0002_reporting.sql): p_count
-- charges of one user and service, p_amount in all. Called in the
-- transaction that writes their attribution rows, which already holds the
-- lock of the pool: two transactions never update the same bucket at once,
-- so the writes neither wait nor deadlock. The bucket is the transaction's
-- start, ledger_now(), which is the rows' created_at. A transaction that started
-- earlier may take the lock later, even after midnight: hence greatest() for
-- the last use, and running totals that add to the bucket's day and to every
-- later day already written.
-- Scalar, with plans cached by plpgsql: the same upserts over unnest() of
-- one-element arrays cost a lone deduction 50 us more of database CPU
-- (measured: 345 against 295 us). Nor does one statement a table for all of
-- a batch's buckets: a first version, whose UPDATEs joined the batch to the
-- running totals' tables, spent about 355 us of database time per item of
-- a spread batch, against 186 with this function per bucket; a second,
-- probing each row by its key, 138 against 150 in
-- benchmarks.micro.deduct_batch_spread's batches over 8 orgs, and no
-- difference under load (benchmarks/README.md, "Performance, round two"
-- and "The summaries set-based, again"). No SET lines: it runs with its
-- callers' settings, and a SET would cost each call.
CREATE OR REPLACE FUNCTION add_usage_to_summaries(
    p_org_id text, p_user_id text, p_service_type text, p_service_name text,
    p_amount bigint, p_count bigint)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    today date := (ledger_now() AT TIME ZONE 'UTC')::date;
    has_today boolean;
BEGIN
    INSERT INTO usage_daily AS s (org_id, day, service_type, service_name,
                                  used_millicredits, request_count)
    VALUES (p_org_id, today, p_service_type, p_service_name, p_amount, p_count)
    ON CONFLICT (org_id, day, service_type, service_name) DO UPDATE
       SET used_millicredits = s.used_millicredits + p_amount,
           request_count = s.request_count + p_count;
    INSERT INTO user_usage_daily AS s (org_id, user_id, day, service_type, service_name,
                                       used_millicredits, request_count, last_used_at)
    VALUES (p_org_id, p_user_id, today, p_service_type, p_service_name, p_amount, p_count, ledger_now())
    ON CONFLICT (org_id, user_id, day, service_type, service_name) DO UPDATE
       SET used_millicredits = s.used_millicredits + p_amount,
           request_count = s.request_count + p_count,
           last_used_at = greatest(s.last_used_at, ledger_now());
    INSERT INTO user_usage_monthly AS s (org_id, user_id, month, service_type, service_name,
                                         used_millicredits, request_count, last_used_at)
    VALUES (p_org_id, p_user_id, date_trunc('month', today::timestamp)::date, p_service_type,
            p_service_name, p_amount, p_count, ledger_now())
    ON CONFLICT (org_id, user_id, month, service_type, service_name) DO UPDATE
       SET used_millicredits = s.used_millicredits + p_amount,
           request_count = s.request_count + p_count,
           last_used_at = greatest(s.last_used_at, ledger_now());

    -- Running totals: add to today's row and any later one; a first charge
    -- of the day starts today's row from the latest before it.
    WITH updated AS (
        UPDATE org_usage_running
           SET used_millicredits_total = used_millicredits_total + p_amount,
               request_count_total = request_count_total + p_count
         WHERE org_id = p_org_id AND day >= today
        RETURNING day)
    SELECT coalesce(bool_or(day = today), false) INTO has_today FROM updated;
    IF NOT has_today THEN
        INSERT INTO org_usage_running (org_id, day, used_millicredits_total, request_count_total)
        SELECT p_org_id, today, coalesce(max(r.used_millicredits_total), 0) + p_amount,
               coalesce(max(r.request_count_total), 0) + p_count
          FROM (SELECT used_millicredits_total, request_count_total FROM org_usage_running
                 WHERE org_id = p_org_id AND day < today ORDER BY day DESC LIMIT 1) AS r;
    END IF;

    WITH updated AS (
        UPDATE user_usage_running
           SET used_millicredits_total = used_millicredits_total + p_amount,
               request_count_total = request_count_total + p_count,
               last_used_at = CASE WHEN day = today THEN greatest(last_used_at, ledger_now())
                                   ELSE last_used_at END
         WHERE org_id = p_org_id AND user_id = p_user_id AND day >= today
        RETURNING day)
    SELECT coalesce(bool_or(day = today), false) INTO has_today FROM updated;
    IF NOT has_today THEN
        INSERT INTO user_usage_running (org_id, user_id, day, used_millicredits_total,
                                        request_count_total, last_used_at)
        SELECT p_org_id, p_user_id, today, coalesce(max(r.used_millicredits_total), 0) + p_amount,
               coalesce(max(r.request_count_total), 0) + p_count, ledger_now()
          FROM (SELECT used_millicredits_total, request_count_total FROM user_usage_running
                 WHERE org_id = p_org_id AND user_id = p_user_id AND day < today
                 ORDER BY day DESC LIMIT 1) AS r;
    END IF;
END $$;

-- Whether an amount fits the allocation and the pool. Reads only, but for
-- applying an ended subscription period (which any first access does).
CREATE OR REPLACE FUNCTION has_sufficient_credits(p_org_id text, p_user_id text, p_amount bigint)
RETURNS TABLE (outcome text, sufficient boolean, allocation_remaining bigint, pool_spendable bigint)
LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
DECLARE
    p organization_credit_pools;
    a user_credit_allocations;
    used_this_period bigint;
    expired_pool bigint := 0;
    expired_user bigint := 0;
BEGIN
    IF p_amount IS NULL OR p_amount < 1 OR p_amount > 1000000000000000 THEN
        outcome := 'INVALID_AMOUNT'; RETURN NEXT; RETURN;
    END IF;
    SELECT * INTO p FROM organization_credit_pools WHERE org_id = p_org_id;
    IF NOT FOUND THEN
        outcome := 'ORG_NOT_FOUND'; RETURN NEXT; RETURN;
    END IF;
    -- An ended subscription period is applied (once) before anything is
    -- read: settle_due_periods inline, as a call costs the hot path.
    IF p.period_ends_at <= ledger_now() THEN
        p := lock_pool(p_org_id);
    END IF;
    SELECT * INTO a FROM user_credit_allocations
     WHERE org_id = p_org_id AND user_id = p_user_id AND revoked_at IS NULL;
    IF NOT FOUND THEN
        outcome := 'ALLOCATION_NOT_FOUND'; RETURN NEXT; RETURN;
    END IF;
    used_this_period := CASE WHEN a.next_reset_at <= ledger_now() THEN 0 ELSE a.used_millicredits END;
    -- Holds past their expiry count for nothing, persisted or not
    -- (35_reservations.sql); none can be open where nothing is reserved.
    IF p.reserved_millicredits > 0 THEN
        SELECT e.pool_expired, e.user_expired INTO expired_pool, expired_user
          FROM expired_holds(p_org_id, p_user_id) AS e;
    END IF;
    allocation_remaining := greatest(0, a.limit_millicredits - used_this_period
                                        - (a.reserved_millicredits - expired_user));
    pool_spendable := greatest(0, p.total_millicredits + p.overage_limit_millicredits
                                  - p.used_millicredits - (p.reserved_millicredits - expired_pool));
    sufficient := p_amount <= least(allocation_remaining, pool_spendable);
    outcome := 'OK';
    RETURN NEXT;
END $$;

-- Charges one deduction. Outcomes: OK (replayed or not), INVALID_AMOUNT,
-- ORG_NOT_FOUND, ALLOCATION_NOT_FOUND, IDEMPOTENCY_KEY_REUSED,
-- INSUFFICIENT_CREDITS (with what is available in allocation_remaining and
-- pool_spendable). A refusal after the pool is locked is stored under the
-- key (remember_deduction_refusal, 20_idempotency.sql).
CREATE OR REPLACE FUNCTION deduct_credits(
    p_org_id text, p_user_id text, p_amount bigint, p_service_type text, p_service_name text,
    p_idempotency_key text, p_request_hash bytea, p_request_id text, p_metadata jsonb)
RETURNS TABLE (outcome text, deduction_id uuid, allocation_remaining bigint,
               pool_spendable bigint, replayed boolean)
LANGUAGE plpgsql
SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan
AS $$
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
    -- Expired holds give their credits back before anything is read
    -- (35_reservations.sql); a pool with nothing reserved has none.
    IF p.reserved_millicredits > 0 AND release_expired_holds(p_org_id) > 0 THEN
        SELECT * INTO p FROM organization_credit_pools WHERE org_id = p_org_id;
    END IF;
    -- So does an ended subscription period, with its refresh (50_subscriptions.sql).
    IF p.period_ends_at <= ledger_now() THEN
        p := advance_due_periods(p);
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
     WHERE org_id = p_org_id AND family = 'deductions' AND idempotency_key = p_idempotency_key;
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
    IF a.next_reset_at <= ledger_now() THEN
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
       SET used_millicredits = used_millicredits + p_amount, updated_at = ledger_now()
     WHERE org_id = p_org_id AND user_id = p_user_id;
    UPDATE organization_credit_pools
       SET used_millicredits = used_millicredits + p_amount, updated_at = ledger_now()
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
    PERFORM add_usage_to_summaries(p_org_id, p_user_id, p_service_type, p_service_name,
                                   p_amount, 1);
    outcome := 'OK';
    RETURN NEXT;
END $$;

-- Many deductions in one transaction, each with its own outcome, with the
-- semantics of running them one at a time in the order given: each is
-- checked against the balances the ones before it left; a refusal fails only
-- its own item and is stored under its key; a key seen before (in the
-- ledger, or earlier in the same batch) replays its first answer, or is
-- IDEMPOTENCY_KEY_REUSED for another request. Returns one row per item (item
-- is its 1-based position), in no particular order.
--
-- With p_all_or_nothing, one item not OK and none is charged: the items
-- that would have been charged answer NOT_APPLIED (and nothing of them is
-- written), while the refusals are stored under their keys all the same,
-- as a call alone stores its own. So the same batch sent again, a retry or
-- a first attempt reaching the database late, is refused again by its
-- stored refusals, never charged once credits are freed meanwhile (a
-- rollback of the whole batch once lost them: tests/test_faults.py). A
-- stored refusal's balances are those its item saw, after the items before
-- it in the batch.
--
-- Set-based, because per-item statements (two key lookups and an insert per
-- deduction) cost about 140 us per item, measured on batches of 1,000: lock
-- the pools, lock the allocations, read every item with what the ledger
-- already holds for its key in one query, decide each item in memory in
-- arrival order, then write all attributions, refusals and balances at once.
--
-- Locks: every pool of the batch in org_id order, then every allocation in
-- (org_id, user_id) order: always pools before allocations, as everywhere
-- else, and in the same order in every transaction, so batches from several
-- replicas cannot deadlock.
DROP FUNCTION IF EXISTS deduct_credits_batch(text[], text[], bigint[], text[], text[], text[],
                                              bytea[], text[], jsonb[]);
CREATE OR REPLACE FUNCTION deduct_credits_batch(
    p_org_ids text[], p_user_ids text[], p_amounts bigint[], p_service_types text[],
    p_service_names text[], p_idempotency_keys text[], p_request_hashes bytea[],
    p_request_ids text[], p_metadata jsonb[], p_all_or_nothing boolean DEFAULT false)
RETURNS TABLE (item integer, outcome text, deduction_id uuid, allocation_remaining bigint,
               pool_spendable bigint, replayed boolean)
LANGUAGE plpgsql
SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    item_count integer := coalesce(cardinality(p_org_ids), 0);
    d record;
    -- Each item's answer, by position (1-based).
    r_outcome text[] := array_fill(NULL::text, ARRAY[item_count]);
    r_id uuid[] := array_fill(NULL::uuid, ARRAY[item_count]);
    r_remaining bigint[] := array_fill(NULL::bigint, ARRAY[item_count]);
    r_spendable bigint[] := array_fill(NULL::bigint, ARRAY[item_count]);
    r_replayed boolean[] := array_fill(false, ARRAY[item_count]);
    -- The rows to write, gathered as columns.
    w_n integer[] := '{}';
    w_id uuid[] := '{}';
    w_period integer[] := '{}';
    w_remaining bigint[] := '{}';
    w_spendable bigint[] := '{}';
    refused_n integer[] := '{}';
    refused_result jsonb[] := '{}';
    -- Balances as the items so far left them: the current org's pool, and
    -- its users charged so far (plpgsql has no map; an org's users are few).
    current_org text;
    pool_used bigint;
    users text[];
    limits bigint[];
    used bigint[];
    reserved bigint[];
    periods integer[];
    u integer;
    remaining bigint;
    spendable bigint;
    -- What to write back: each org's pool used, each allocation's used.
    f_org text[] := '{}';
    f_pool_used bigint[] := '{}';
    f_alloc_org text[] := '{}';
    f_alloc_user text[] := '{}';
    f_alloc_used bigint[] := '{}';
    any_reserved boolean;
    any_period_ended boolean;
    any_reset_due boolean;
    i integer;
BEGIN
    IF item_count = 0 THEN
        RETURN;
    END IF;

    -- The pools, locked; with whether any has holds or an ended period, so
    -- that the statements for those run only when there is work for them.
    SELECT coalesce(bool_or(locked.reserved_millicredits > 0), false),
           coalesce(bool_or(locked.period_ends_at <= ledger_now()), false)
      INTO any_reserved, any_period_ended
      FROM (SELECT reserved_millicredits, period_ends_at FROM organization_credit_pools
             WHERE org_id = ANY (p_org_ids) ORDER BY org_id FOR UPDATE) AS locked;
    -- Expired holds give their credits back before anything is read
    -- (35_reservations.sql), under the pool locks just taken.
    IF any_reserved THEN
        PERFORM release_expired_holds(org_id) FROM organization_credit_pools
         WHERE org_id = ANY (p_org_ids) AND reserved_millicredits > 0;
    END IF;
    -- So do ended subscription periods, with their refreshes.
    IF any_period_ended THEN
        PERFORM advance_due_periods(p) FROM organization_credit_pools AS p
         WHERE org_id = ANY (p_org_ids) AND period_ends_at <= ledger_now();
    END IF;
    -- The allocations, each probed by its key and locked, in key order.
    SELECT coalesce(bool_or(locked.next_reset_at <= ledger_now()), false) INTO any_reset_due
      FROM (SELECT DISTINCT k.org_id, k.user_id FROM unnest(p_org_ids, p_user_ids) AS k(org_id, user_id)
             ORDER BY k.org_id, k.user_id) AS k
     CROSS JOIN LATERAL (SELECT a.next_reset_at FROM user_credit_allocations AS a
                          WHERE a.org_id = k.org_id AND a.user_id = k.user_id FOR UPDATE) AS locked;
    -- Periods due for a reset start again before anything is charged to them.
    IF any_reset_due THEN
        PERFORM reset_allocation_if_due(a) FROM user_credit_allocations AS a
         WHERE a.org_id = ANY (p_org_ids) AND a.user_id = ANY (p_user_ids)
           AND (a.org_id, a.user_id) IN (SELECT * FROM unnest(p_org_ids, p_user_ids))
           AND a.next_reset_at <= ledger_now();
    END IF;

    FOR d IN
        WITH items AS (
            SELECT * FROM unnest(p_org_ids, p_user_ids, p_amounts, p_idempotency_keys, p_request_hashes)
                   WITH ORDINALITY AS x(org_id, user_id, amount, idempotency_key, request_hash, n))
        SELECT i.n, i.org_id, i.user_id, i.amount, i.request_hash,
               first_value(i.n) OVER same_key AS first_n,
               first_value(i.request_hash) OVER same_key AS first_hash,
               p.org_id IS NOT NULL AS pool_found,
               p.total_millicredits + p.overage_limit_millicredits - p.reserved_millicredits AS pool_capacity,
               p.used_millicredits AS pool_used,
               a.user_id IS NOT NULL AND a.revoked_at IS NULL AS allocation_found,
               a.limit_millicredits, a.used_millicredits, a.reserved_millicredits, a.period_number,
               c.deduction_id AS prior_id, c.request_hash AS prior_hash,
               c.allocation_remaining_after AS prior_remaining, c.pool_spendable_after AS prior_spendable,
               r.operation AS record_operation, r.request_hash AS record_hash, r.result AS record_result
          FROM items AS i
          LEFT JOIN LATERAL (SELECT * FROM organization_credit_pools AS p
                              WHERE p.org_id = i.org_id OFFSET 0) AS p ON true
          LEFT JOIN LATERAL (SELECT * FROM user_credit_allocations AS a
                              WHERE a.org_id = i.org_id AND a.user_id = i.user_id OFFSET 0) AS a ON true
          LEFT JOIN LATERAL (SELECT * FROM credit_usage_attribution AS c
                              WHERE c.org_id = i.org_id AND c.idempotency_key = i.idempotency_key
                             OFFSET 0) AS c ON true
          LEFT JOIN LATERAL (SELECT * FROM idempotency_records AS r
                              WHERE r.org_id = i.org_id AND r.family = 'deductions'
                                AND r.idempotency_key = i.idempotency_key OFFSET 0) AS r ON true
        WINDOW same_key AS (PARTITION BY i.org_id, i.idempotency_key ORDER BY i.n)
         ORDER BY i.org_id, i.n
    LOOP
        IF current_org IS DISTINCT FROM d.org_id THEN
            IF current_org IS NOT NULL THEN
                f_org := f_org || current_org;
                f_pool_used := f_pool_used || pool_used;
                f_alloc_org := f_alloc_org || array_fill(current_org, ARRAY[cardinality(users)]);
                f_alloc_user := f_alloc_user || users;
                f_alloc_used := f_alloc_used || used;
            END IF;
            current_org := d.org_id;
            pool_used := d.pool_used;
            users := '{}'; limits := '{}'; used := '{}'; reserved := '{}'; periods := '{}';
        END IF;

        IF d.amount IS NULL OR d.amount < 1 OR d.amount > 1000000000000000 THEN
            r_outcome[d.n] := 'INVALID_AMOUNT'; CONTINUE;
        END IF;
        IF NOT d.pool_found THEN
            r_outcome[d.n] := 'ORG_NOT_FOUND'; CONTINUE;
        END IF;
        -- The key was used before this batch, by a deduction: charged, or refused.
        IF d.prior_id IS NOT NULL THEN
            IF d.prior_hash = d.request_hash THEN
                r_outcome[d.n] := 'OK';
                r_id[d.n] := d.prior_id;
                r_remaining[d.n] := d.prior_remaining;
                r_spendable[d.n] := d.prior_spendable;
                r_replayed[d.n] := true;
            ELSE
                r_outcome[d.n] := 'IDEMPOTENCY_KEY_REUSED';
            END IF;
            CONTINUE;
        END IF;
        IF d.record_operation IS NOT NULL THEN
            IF d.record_operation = 'DeductCredits' AND d.record_hash = d.request_hash THEN
                r_outcome[d.n] := d.record_result ->> 'outcome';
                r_remaining[d.n] := (d.record_result ->> 'allocation_remaining')::bigint;
                r_spendable[d.n] := (d.record_result ->> 'pool_spendable')::bigint;
                r_replayed[d.n] := true;
            ELSE
                r_outcome[d.n] := 'IDEMPOTENCY_KEY_REUSED';
            END IF;
            CONTINUE;
        END IF;
        -- The key was used earlier in this batch: the first use's answer.
        IF d.first_n < d.n THEN
            IF d.first_hash = d.request_hash AND r_outcome[d.first_n] <> 'INVALID_AMOUNT' THEN
                r_outcome[d.n] := r_outcome[d.first_n];
                r_id[d.n] := r_id[d.first_n];
                r_remaining[d.n] := r_remaining[d.first_n];
                r_spendable[d.n] := r_spendable[d.first_n];
                r_replayed[d.n] := true;
            ELSE
                r_outcome[d.n] := 'IDEMPOTENCY_KEY_REUSED';
            END IF;
            CONTINUE;
        END IF;

        IF NOT d.allocation_found THEN
            r_outcome[d.n] := 'ALLOCATION_NOT_FOUND';
            refused_n := refused_n || d.n::integer;
            refused_result := refused_result || '{"outcome": "ALLOCATION_NOT_FOUND"}'::jsonb;
            CONTINUE;
        END IF;
        u := array_position(users, d.user_id);
        IF u IS NULL THEN
            users := users || d.user_id;
            limits := limits || d.limit_millicredits;
            used := used || d.used_millicredits;
            reserved := reserved || d.reserved_millicredits;
            periods := periods || d.period_number;
            u := cardinality(users);
        END IF;

        remaining := limits[u] - used[u] - reserved[u];
        spendable := d.pool_capacity - pool_used;
        IF d.amount > remaining OR d.amount > spendable THEN
            r_outcome[d.n] := 'INSUFFICIENT_CREDITS';
            r_remaining[d.n] := greatest(0, remaining);
            r_spendable[d.n] := greatest(0, spendable);
            refused_n := refused_n || d.n::integer;
            refused_result := refused_result || jsonb_build_object(
                'outcome', 'INSUFFICIENT_CREDITS', 'allocation_remaining', r_remaining[d.n],
                'pool_spendable', r_spendable[d.n]);
            CONTINUE;
        END IF;

        used[u] := used[u] + d.amount;
        pool_used := pool_used + d.amount;
        r_outcome[d.n] := 'OK';
        r_id[d.n] := uuidv7();
        r_remaining[d.n] := remaining - d.amount;
        r_spendable[d.n] := spendable - d.amount;
        w_n := w_n || d.n::integer;
        w_id := w_id || r_id[d.n];
        w_period := w_period || periods[u];
        w_remaining := w_remaining || r_remaining[d.n];
        w_spendable := w_spendable || r_spendable[d.n];
    END LOOP;
    IF current_org IS NOT NULL THEN
        f_org := f_org || current_org;
        f_pool_used := f_pool_used || pool_used;
        f_alloc_org := f_alloc_org || array_fill(current_org, ARRAY[cardinality(users)]);
        f_alloc_user := f_alloc_user || users;
        f_alloc_used := f_alloc_used || used;
    END IF;
    IF p_all_or_nothing AND NOT ('OK' = ALL (r_outcome)) THEN
        -- Not applied: the new charges, and their replays later in the batch
        -- (a replay of a charge made before the batch stays as it is).
        FOR i IN 1 .. item_count LOOP
            IF r_outcome[i] = 'OK' AND (NOT r_replayed[i] OR r_id[i] = ANY (w_id)) THEN
                r_outcome[i] := 'NOT_APPLIED';
                r_id[i] := NULL; r_remaining[i] := NULL; r_spendable[i] := NULL;
                r_replayed[i] := false;
            END IF;
        END LOOP;
        w_n := '{}';
    END IF;

    -- Each write only when there is something to write: a statement costs
    -- the batch its executor's start and end even with no rows.
    IF cardinality(refused_n) > 0 THEN
        INSERT INTO idempotency_records (org_id, family, idempotency_key, operation, request_hash, result)
        SELECT i.org_id, 'deductions', i.idempotency_key, 'DeductCredits', i.request_hash, f.result
          FROM unnest(p_org_ids, p_idempotency_keys, p_request_hashes)
               WITH ORDINALITY AS i(org_id, idempotency_key, request_hash, n)
          JOIN unnest(refused_n, refused_result) AS f(n, result) ON f.n = i.n;
    END IF;
    IF cardinality(w_n) > 0 THEN
        -- The items' own columns are joined back by position from one unnest,
        -- never read as p_x[i] (subscripting a flat array walks it from the start).
        INSERT INTO credit_usage_attribution (
            org_id, deduction_id, user_id, amount_millicredits, service_type, service_name,
            idempotency_key, request_hash, request_id, metadata, allocation_period,
            allocation_remaining_after, pool_spendable_after)
        SELECT i.org_id, w.id, i.user_id, i.amount, i.service_type, i.service_name,
               i.idempotency_key, i.request_hash, i.request_id, i.metadata, w.period,
               w.remaining, w.spendable
          FROM unnest(p_org_ids, p_user_ids, p_amounts, p_service_types, p_service_names,
                      p_idempotency_keys, p_request_hashes, p_request_ids, p_metadata)
               WITH ORDINALITY AS i(org_id, user_id, amount, service_type, service_name,
                                    idempotency_key, request_hash, request_id, metadata, n)
          JOIN unnest(w_n, w_id, w_period, w_remaining, w_spendable)
               AS w(n, id, period, remaining, spendable) ON w.n = i.n;

        -- The same charges, summed into the summary tables once per user and
        -- service: a batch on a hot allocation is one bucket.
        PERFORM add_usage_to_summaries(i.org_id, i.user_id, i.service_type, i.service_name,
                                       sum(i.amount)::bigint, count(*))
           FROM unnest(p_org_ids, p_user_ids, p_service_types, p_service_names, p_amounts)
                WITH ORDINALITY AS i(org_id, user_id, service_type, service_name, amount, n)
           JOIN unnest(w_n) AS w(n) ON w.n = i.n
          GROUP BY i.org_id, i.user_id, i.service_type, i.service_name;

        UPDATE user_credit_allocations AS a
           SET used_millicredits = f.used, updated_at = ledger_now()
          FROM unnest(f_alloc_org, f_alloc_user, f_alloc_used) AS f(org_id, user_id, used)
         WHERE a.org_id = f.org_id AND a.user_id = f.user_id AND a.used_millicredits <> f.used
           AND a.org_id = ANY (f_alloc_org) AND a.user_id = ANY (f_alloc_user);
        UPDATE organization_credit_pools AS p
           SET used_millicredits = f.used, updated_at = ledger_now()
          FROM unnest(f_org, f_pool_used) AS f(org_id, used)
         WHERE p.org_id = f.org_id AND p.used_millicredits <> f.used AND p.org_id = ANY (f_org);
    END IF;

    RETURN QUERY
        SELECT x.n::integer, x.outcome, x.deduction_id, x.remaining, x.spendable, x.replayed
          FROM unnest(r_outcome, r_id, r_remaining, r_spendable, r_replayed)
               WITH ORDINALITY AS x(outcome, deduction_id, remaining, spendable, replayed, n);
END $$;
