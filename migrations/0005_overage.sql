-- Overage: a pool may be spent past its total, down to minus its overage
-- limit (organization_credit_pools.overage_limit_millicredits, in the
-- baseline since the first schema, and already counted by every charge and
-- by the pool's CHECK), at a rate set with the limit.
--
-- The rate is in integer millicents per credit, not cents per credit: a
-- credit is worth $0.001, a tenth of a cent (shared/DESIGN.md, Money), so a
-- rate in whole cents could not even state the catalog price. 100 millicents
-- per credit is the catalog price; 0 (the default) means no rate set. At
-- most 10^9 (10,000 dollars per credit): a bound so no product with an
-- amount can overflow. Allowing overage means a limit above 0; the default
-- is 0, no overage, as before.
ALTER TABLE organization_credit_pools
    ADD COLUMN overage_rate_millicents_per_credit bigint NOT NULL DEFAULT 0
        CHECK (overage_rate_millicents_per_credit BETWEEN 0 AND 1000000000);

-- Each change of the limit or rate is an event in billing history
-- (details: old_limit, new_limit, old_rate, new_rate, in_use).
ALTER TABLE org_billing_history DROP CONSTRAINT org_billing_history_event_type_check;
ALTER TABLE org_billing_history ADD CONSTRAINT org_billing_history_event_type_check
    CHECK (event_type IN (
        'SUBSCRIPTION_CREATED', 'SUBSCRIPTION_UPGRADED', 'SUBSCRIPTION_DOWNGRADED',
        'SUBSCRIPTION_CHANGED', 'SUBSCRIPTION_CANCELED', 'CREDITS_ADDED',
        'ALLOCATION_CHANGED', 'ALLOCATION_REVOKED', 'PERIOD_RESET',
        'INVOICE_CREATED', 'INVOICE_PAID', 'INVOICE_PAYMENT_FAILED', 'INVOICE_VOIDED',
        'REFUND', 'OVERAGE_CHANGED'));
