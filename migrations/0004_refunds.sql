-- Refunds: all or part of one deduction given back to the allocation and the
-- pool, never more in total than the deduction charged, linked to it.
--
-- A refund is a row of credit_usage_attribution with a negative amount and
-- refund_of naming the deduction it gives back (a separate table was the
-- other choice). In the same table, every existing rule holds as it is:
--   * pool used = the sum of the org's attribution rows, now net of refunds,
--     with no second table to add (verify's query is unchanged);
--   * the summary tables, running totals and reports sum these rows: a
--     refund is negative usage on the day it is made, of the deduction's
--     user and service, with no second source to join at the edges of a
--     report's range; it counts no request (request_count counts
--     deductions, refund_of IS NULL);
--   * the refund's idempotency key is in its row, in the deductions'
--     key space (the primary key), stored with its effect like a
--     deduction's: a deduction, hold or commit under a refund's key (and
--     the reverse) is IDEMPOTENCY_KEY_REUSED with no new lookup.
-- deduction_id is the refund's own id (uuidv7).
--
-- Periods: allocation_period is the allocation's period when the refund was
-- made, and allocation_refund_millicredits what it took off that period's
-- used: the whole amount for a deduction of the current period; for one of
-- an earlier period, only as far as used allows (used never goes below 0).
-- So an allocation's used = its charges of this period less the
-- allocation_refund_millicredits of this period's refunds (server/verify.py).
ALTER TABLE credit_usage_attribution ADD COLUMN refund_of uuid;
ALTER TABLE credit_usage_attribution ADD COLUMN refund_reason text;
ALTER TABLE credit_usage_attribution ADD COLUMN allocation_refund_millicredits bigint;
ALTER TABLE credit_usage_attribution DROP CONSTRAINT credit_usage_attribution_amount_millicredits_check;
ALTER TABLE credit_usage_attribution ADD CONSTRAINT credit_usage_attribution_amount_check
    CHECK (CASE WHEN refund_of IS NULL
                THEN amount_millicredits BETWEEN 1 AND 1000000000000000
                     AND refund_reason IS NULL AND allocation_refund_millicredits IS NULL
                ELSE amount_millicredits BETWEEN -1000000000000000 AND -1
                     AND refund_reason IS NOT NULL AND reservation_id IS NULL
                     AND allocation_refund_millicredits BETWEEN 0 AND -amount_millicredits
           END);

-- The refunds of one deduction, summed under the pool lock before each new
-- one. Led by refund_of, not org_id (see the top of 0001_baseline.sql: a key
-- lookup by org must have one index to choose); partial, so it holds
-- refunds only.
CREATE INDEX credit_usage_attribution_refunds
    ON credit_usage_attribution (refund_of, org_id) WHERE refund_of IS NOT NULL;

-- Each refund is an event in billing history too, linked to its deduction
-- (details: refund_id, deduction_id, amount, reason).
ALTER TABLE org_billing_history DROP CONSTRAINT org_billing_history_event_type_check;
ALTER TABLE org_billing_history ADD CONSTRAINT org_billing_history_event_type_check
    CHECK (event_type IN (
        'SUBSCRIPTION_CREATED', 'SUBSCRIPTION_UPGRADED', 'SUBSCRIPTION_DOWNGRADED',
        'SUBSCRIPTION_CHANGED', 'SUBSCRIPTION_CANCELED', 'CREDITS_ADDED',
        'ALLOCATION_CHANGED', 'ALLOCATION_REVOKED', 'PERIOD_RESET',
        'INVOICE_CREATED', 'INVOICE_PAID', 'INVOICE_PAYMENT_FAILED', 'INVOICE_VOIDED',
        'REFUND'));
