-- deduct_credits_batch, set-based. The per-item statements of the previous
-- version (two key lookups and an insert per deduction, about 140 us per item
-- measured on batches of 1,000) become a handful of statements per batch:
-- lock the pools, lock the allocations, read every item with what the ledger
-- already holds for its key in one query, decide each item in memory in
-- arrival order, then write all attributions, refusals and balances at once.
--
-- Semantics are unchanged: items are decided one at a time in the order
-- given, each against the balances the ones before it left; a refusal fails
-- only its own item and is stored under its key; a key seen before (in the
-- ledger, or earlier in the same batch) replays its first answer, or is
-- IDEMPOTENCY_KEY_REUSED for another request. Locks: every pool of the batch
-- in org_id order, then every allocation in (org_id, user_id) order: always
-- pools before allocations, as everywhere else.
CREATE OR REPLACE FUNCTION deduct_credits_batch(
    p_org_ids text[], p_user_ids text[], p_amounts bigint[], p_service_types text[],
    p_service_names text[], p_idempotency_keys text[], p_request_hashes bytea[],
    p_request_ids text[], p_metadata jsonb[])
RETURNS TABLE (item integer, outcome text, deduction_id uuid, allocation_remaining bigint,
               pool_spendable bigint, replayed boolean)
LANGUAGE plpgsql SET enable_seqscan = off AS $$
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
BEGIN
    IF item_count = 0 THEN
        RETURN;
    END IF;

    PERFORM 1 FROM organization_credit_pools
     WHERE org_id = ANY (p_org_ids) ORDER BY org_id FOR UPDATE;
    PERFORM 1 FROM user_credit_allocations
     WHERE (org_id, user_id) IN (SELECT * FROM unnest(p_org_ids, p_user_ids))
     ORDER BY org_id, user_id FOR UPDATE;
    -- Periods due for a reset start again before anything is charged to them.
    PERFORM reset_allocation_if_due(a) FROM user_credit_allocations AS a
     WHERE (a.org_id, a.user_id) IN (SELECT * FROM unnest(p_org_ids, p_user_ids))
       AND a.next_reset_at <= now();

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
          LEFT JOIN organization_credit_pools AS p ON p.org_id = i.org_id
          LEFT JOIN user_credit_allocations AS a ON a.org_id = i.org_id AND a.user_id = i.user_id
          LEFT JOIN credit_usage_attribution AS c
                 ON c.org_id = i.org_id AND c.idempotency_key = i.idempotency_key
          LEFT JOIN idempotency_records AS r
                 ON r.org_id = i.org_id AND r.idempotency_key = i.idempotency_key
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
        -- The key was used before this batch: for a charge, or for a refusal or
        -- an administrative change.
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

    INSERT INTO idempotency_records (org_id, idempotency_key, operation, request_hash, result)
    SELECT i.org_id, i.idempotency_key, 'DeductCredits', i.request_hash, f.result
      FROM unnest(p_org_ids, p_idempotency_keys, p_request_hashes)
           WITH ORDINALITY AS i(org_id, idempotency_key, request_hash, n)
      JOIN unnest(refused_n, refused_result) AS f(n, result) ON f.n = i.n;

    UPDATE user_credit_allocations AS a
       SET used_millicredits = f.used, updated_at = now()
      FROM unnest(f_alloc_org, f_alloc_user, f_alloc_used) AS f(org_id, user_id, used)
     WHERE a.org_id = f.org_id AND a.user_id = f.user_id AND a.used_millicredits <> f.used;
    UPDATE organization_credit_pools AS p
       SET used_millicredits = f.used, updated_at = now()
      FROM unnest(f_org, f_pool_used) AS f(org_id, used)
     WHERE p.org_id = f.org_id AND p.used_millicredits <> f.used;

    RETURN QUERY
        SELECT x.n::integer, x.outcome, x.deduction_id, x.remaining, x.spendable, x.replayed
          FROM unnest(r_outcome, r_id, r_remaining, r_spendable, r_replayed)
               WITH ORDINALITY AS x(outcome, deduction_id, remaining, spendable, replayed, n);
END $$;
