-- The ledger's clock: every instant the ledger compares or records (hold
-- expiries, period resets and advances, refreshes, created_at and
-- updated_at) is ledger_now(), never now() directly, so that there is one
-- place to put the ledger at another instant.
--
-- Here it is now(), the transaction's start, and the planner sees exactly
-- now() once the function is inlined: no cost, and the same plans. The
-- tests' databases replace it with a clock they can stop at any
-- microsecond on either side of a boundary (tests/postgres.py). A clock
-- that looked up a setting here instead cost each reserve-and-commit pair
-- about 500 us more of database CPU at 64 callers (make bench, measured):
-- the expression changed which index the expiry probes chose.
--
-- Here rather than in functions/, because column defaults depend on it and
-- versioned files run before the repeatable ones. Not for
-- idempotency_records (kept for a retention of real time) or api_keys,
-- which are not the ledger's.

CREATE FUNCTION ledger_now() RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT now()
$$;

ALTER TABLE organizations ALTER COLUMN created_at SET DEFAULT ledger_now();
ALTER TABLE organization_subscriptions
    ALTER COLUMN created_at SET DEFAULT ledger_now(),
    ALTER COLUMN updated_at SET DEFAULT ledger_now();
ALTER TABLE organization_credit_pools ALTER COLUMN updated_at SET DEFAULT ledger_now();
ALTER TABLE user_credit_allocations
    ALTER COLUMN created_at SET DEFAULT ledger_now(),
    ALTER COLUMN updated_at SET DEFAULT ledger_now();
ALTER TABLE credit_usage_attribution ALTER COLUMN created_at SET DEFAULT ledger_now();
ALTER TABLE org_billing_history ALTER COLUMN created_at SET DEFAULT ledger_now();
ALTER TABLE credit_reservations ALTER COLUMN created_at SET DEFAULT ledger_now();
ALTER TABLE invoices
    ALTER COLUMN created_at SET DEFAULT ledger_now(),
    ALTER COLUMN updated_at SET DEFAULT ledger_now();
