-- The ledger functions find every row through a primary key. plpgsql caches a
-- generic plan per statement, and one first planned while a table was tiny
-- (a new database, just analyzed) stays as the table grows. Measured: the
-- idempotency lookup of deduct_credits_batch settled on the index
-- (org_id, user_id, created_at), which matches only org_id, and read every
-- attribution row of the org for each deduction (8.3M index tuples read for
-- 4,000 deductions), or on a sequential scan.
--
-- So: the attribution table's primary key becomes its natural key,
-- (org_id, idempotency_key), and no other index on it leads with org_id, so
-- the lookup has one index to use; and sequential scans are forbidden inside
-- the ledger functions, whatever the statistics say. An index for usage
-- reports will come with the reports, planned with this in mind.
DROP INDEX credit_usage_attribution_by_user;
ALTER TABLE credit_usage_attribution
    DROP CONSTRAINT credit_usage_attribution_pkey,
    DROP CONSTRAINT credit_usage_attribution_org_id_idempotency_key_key,
    ADD PRIMARY KEY (org_id, idempotency_key),
    -- Leads with deduction_id: finds a deduction by id, and cannot be mistaken
    -- for a lookup by org. It holds org_id so a Citus distribution can keep it.
    ADD UNIQUE (deduction_id, org_id);

ALTER FUNCTION has_sufficient_credits(text, text, bigint) SET enable_seqscan = off;
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
