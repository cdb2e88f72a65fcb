-- Repeatable: this file holds the one current definition of each of its
-- functions, and the migration runner (server/migrate.py) re-applies it whole
-- whenever its checksum changes. To change a function, edit it here, never in
-- a versioned migration. Settings are written in the CREATE, as SET lines
-- before the body: CREATE OR REPLACE resets any set otherwise. CREATE OR
-- REPLACE cannot change a function's arguments or result type: to change
-- them, or to remove a function, this file drops the old signature itself
-- (DROP FUNCTION IF EXISTS name(old argument types)) before the new CREATE.

-- Invoices of the external billing system (Lago, Stripe): RecordInvoice.
-- Settings: see 30_deductions.sql.
--
-- An event is named by (org, external invoice id, status). Its row in billing
-- history is unique by that name (org_billing_history_one_invoice_event,
-- 0002_reporting.sql) and kept forever, so it is what makes recording it
-- idempotent: a webhook may be redelivered long after idempotency records
-- expire. The event's details keep the answer a replay returns.
--
-- Webhooks arrive out of order, so any status may be the first one seen; it
-- creates the invoice row, whose amount, currency and period never change
-- afterwards. From there:
--   CREATED -> FAILED, PAID or VOIDED;
--   FAILED  -> PAID or VOIDED; a CREATED after it is recorded but does not
--              move the invoice back: the failed payment is the newer news,
--              the CREATED webhook merely arrived late;
--   PAID, VOIDED: final; any other status is refused (INVOICE_FINAL).
-- A second FAILED of one invoice (the billing system retried the payment and
-- failed again) is the same event: a replay.
--
-- The live subscription follows the payments: a failed payment moves an
-- ACTIVE subscription to PAST_DUE; a paid invoice moves a PAST_DUE one back to
-- ACTIVE, whichever invoice failed: other invoices still unpaid are not looked
-- for (kept simple on purpose; dunning is the billing system's business).
-- TRIALING and CANCELED subscriptions are never moved, nor by VOIDED.

-- The JSON shape store.py reads back (see pool_json, 10_helpers.sql).
CREATE OR REPLACE FUNCTION invoice_json(i invoices) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object(
        'org_id', i.org_id,
        'external_invoice_id', i.external_invoice_id,
        'status', i.status,
        'amount_cents', i.amount_cents,
        'currency', i.currency,
        'period_start_us', epoch_micros(i.period_start),
        'period_end_us', epoch_micros(i.period_end),
        'created_at_us', epoch_micros(i.created_at),
        'updated_at_us', epoch_micros(i.updated_at))
$$;

-- Records one invoice event. Outcomes: OK (with invoice, subscription (null
-- when there is no live one) and event_id), ORG_NOT_FOUND, INVOICE_MISMATCH
-- and IDEMPOTENCY_KEY_REUSED (with the first differing request field, as
-- `field`), INVOICE_FINAL (with the invoice's `current_status`). Refusals
-- change nothing and are not stored: the same request is refused again.
-- Locks: the pool row (which serializes every change of the org, as in every
-- other ledger function), then the invoice row, then the live subscription.
CREATE OR REPLACE FUNCTION record_invoice(
    p_org_id text, p_external_invoice_id text, p_status text, p_amount_cents bigint,
    p_currency text, p_period_start timestamptz, p_period_end timestamptz, p_request_id text)
RETURNS jsonb LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
DECLARE
    kind text := CASE p_status WHEN 'CREATED' THEN 'INVOICE_CREATED'
                               WHEN 'PAID' THEN 'INVOICE_PAID'
                               WHEN 'FAILED' THEN 'INVOICE_PAYMENT_FAILED'
                               WHEN 'VOIDED' THEN 'INVOICE_VOIDED' END;
    i invoices;
    s organization_subscriptions;
    prior jsonb;
    differs text;
    moved_to text;  -- the live subscription's new status, when this event moved it
    event uuid := uuidv7();
    result jsonb;
BEGIN
    IF kind IS NULL THEN
        RAISE EXCEPTION 'unknown invoice status %', p_status;  -- the server checks it: a bug
    END IF;
    PERFORM 1 FROM organization_credit_pools WHERE org_id = p_org_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN '{"outcome": "ORG_NOT_FOUND"}';
    END IF;
    SELECT * INTO i FROM invoices
     WHERE org_id = p_org_id AND external_invoice_id = p_external_invoice_id FOR UPDATE;
    -- NULL when the invoice is new (every comparison with its NULLs is NULL).
    differs := CASE WHEN i.amount_cents <> p_amount_cents THEN 'amount_cents'
                    WHEN i.currency <> p_currency THEN 'currency'
                    WHEN i.period_start <> p_period_start THEN 'period_start_time'
                    WHEN i.period_end <> p_period_end THEN 'period_end_time' END;

    SELECT details -> 'result' INTO prior FROM org_billing_history
     WHERE org_id = p_org_id AND external_invoice_id = p_external_invoice_id AND event_type = kind;
    IF FOUND THEN
        -- Every event of an invoice was recorded with the values of its row,
        -- which never change: comparing with the row compares with the event.
        IF differs IS NOT NULL THEN
            RETURN jsonb_build_object('outcome', 'IDEMPOTENCY_KEY_REUSED', 'field', differs);
        END IF;
        RETURN prior || '{"replayed": true}';
    END IF;
    IF differs IS NOT NULL THEN
        RETURN jsonb_build_object('outcome', 'INVOICE_MISMATCH', 'field', differs);
    END IF;
    IF i.status IN ('PAID', 'VOIDED') THEN
        RETURN jsonb_build_object('outcome', 'INVOICE_FINAL', 'current_status', i.status);
    END IF;

    IF i.org_id IS NULL THEN
        INSERT INTO invoices (org_id, external_invoice_id, status, amount_cents, currency,
                              period_start, period_end)
        VALUES (p_org_id, p_external_invoice_id, p_status, p_amount_cents, p_currency,
                p_period_start, p_period_end)
        RETURNING * INTO i;
    ELSIF p_status <> 'CREATED' THEN
        -- The invoice exists and is not final, so it is CREATED or FAILED; a
        -- CREATED arriving now is late news and leaves it as it is (above).
        UPDATE invoices SET status = p_status, updated_at = ledger_now()
         WHERE org_id = p_org_id AND external_invoice_id = p_external_invoice_id
        RETURNING * INTO i;
    END IF;

    SELECT * INTO s FROM organization_subscriptions
     WHERE org_id = p_org_id AND status IN ('TRIALING', 'ACTIVE', 'PAST_DUE') FOR UPDATE;
    IF (p_status = 'FAILED' AND s.status = 'ACTIVE') OR (p_status = 'PAID' AND s.status = 'PAST_DUE') THEN
        UPDATE organization_subscriptions
           SET status = CASE p_status WHEN 'FAILED' THEN 'PAST_DUE' ELSE 'ACTIVE' END,
               updated_at = ledger_now()
         WHERE org_id = p_org_id AND subscription_id = s.subscription_id
        RETURNING * INTO s;
        moved_to := s.status;
    END IF;

    result := jsonb_build_object(
        'outcome', 'OK', 'event_id', event, 'invoice', invoice_json(i),
        'subscription', CASE WHEN s.subscription_id IS NOT NULL THEN subscription_json(s) END);
    -- The amount and currency on every event, PAID or not: reports count
    -- revenue from INVOICE_PAID events alone (docs/reporting.md).
    INSERT INTO org_billing_history (
        org_id, event_id, event_type, subscription_id, external_invoice_id,
        amount_paid_cents, currency, details, request_id)
    VALUES (
        p_org_id, event, kind, s.subscription_id, p_external_invoice_id,
        p_amount_cents, p_currency,
        jsonb_build_object('period_start', p_period_start, 'period_end', p_period_end,
                           'invoice_status', i.status, 'result', result)
        || CASE WHEN moved_to IS NOT NULL
                THEN jsonb_build_object('subscription_status', moved_to) ELSE '{}' END,
        p_request_id);
    RETURN result || '{"replayed": false}';
END $$;
