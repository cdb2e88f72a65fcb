-- The ledger's clock: every instant the ledger compares or records (hold
-- expiries, period resets and advances, refreshes, created_at and
-- updated_at) is ledger_now(), never now() directly, so that tests can put
-- the ledger at an exact microsecond on either side of a boundary.
--
-- ledger_now() is now(), the transaction's start, except in a database
-- whose setting orgbilling.test_clock is 'on' (the tests' databases:
-- ALTER DATABASE ... SET) and whose ledger_clock table holds a row: there
-- it is that row's instant, frozen until the row changes. Production never
-- sets the setting, so it never reads the table: the cost is a setting
-- lookup. The check is an inlined CASE over function calls with no
-- subquery, so plpgsql still evaluates it as a simple expression (a
-- subquery would send every use through the executor).
--
-- Here rather than in functions/, because column defaults depend on it and
-- versioned files run before the repeatable ones. Not for
-- idempotency_records (kept for a retention of real time) or api_keys,
-- which are not the ledger's.

CREATE TABLE ledger_clock (
    only_row   boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    frozen_at  timestamptz NOT NULL
);

CREATE FUNCTION frozen_ledger_now() RETURNS timestamptz
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN coalesce((SELECT frozen_at FROM ledger_clock), now());
END $$;

CREATE FUNCTION ledger_now() RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN current_setting('orgbilling.test_clock', true) = 'on'
                THEN frozen_ledger_now() ELSE now() END
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
