-- The five tables of the old billing module, with corrected semantics, plus
-- organizations and idempotency records. Amounts are bigint millicredits.
-- Every primary key and hot index leads with org_id, so the schema can be
-- distributed by org_id (Citus) without change.

CREATE TABLE organizations (
    org_id      text PRIMARY KEY CHECK (org_id ~ '^[A-Za-z0-9._:@-]{1,128}$'),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE organization_subscriptions (
    org_id                    text NOT NULL REFERENCES organizations,
    subscription_id           uuid NOT NULL DEFAULT uuidv7(),
    plan                      text NOT NULL CHECK (plan IN ('PLATFORM', 'BYOK', 'HYBRID')),
    billing_cycle             text NOT NULL CHECK (billing_cycle IN ('MONTHLY', 'YEARLY')),
    status                    text NOT NULL CHECK (status IN ('TRIALING', 'ACTIVE', 'PAST_DUE', 'CANCELED')),
    price_cents               bigint NOT NULL CHECK (price_cents >= 0),
    currency                  text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    current_period_start      timestamptz NOT NULL,
    current_period_end        timestamptz NOT NULL,
    trial_end                 timestamptz,
    external_customer_id      text NOT NULL DEFAULT '',
    external_subscription_id  text NOT NULL DEFAULT '',
    created_at                timestamptz NOT NULL DEFAULT now(),
    updated_at                timestamptz NOT NULL DEFAULT now(),
    canceled_at               timestamptz,
    PRIMARY KEY (org_id, subscription_id),
    CHECK ((status = 'CANCELED') = (canceled_at IS NOT NULL))
);

-- At most one live subscription per organization.
CREATE UNIQUE INDEX organization_subscriptions_one_live
    ON organization_subscriptions (org_id)
    WHERE status IN ('TRIALING', 'ACTIVE', 'PAST_DUE');

CREATE TABLE organization_credit_pools (
    org_id                      text PRIMARY KEY REFERENCES organizations,
    total_millicredits          bigint NOT NULL DEFAULT 0,
    allocated_millicredits      bigint NOT NULL DEFAULT 0,
    used_millicredits           bigint NOT NULL DEFAULT 0,
    reserved_millicredits       bigint NOT NULL DEFAULT 0,
    overage_limit_millicredits  bigint NOT NULL DEFAULT 0,
    updated_at                  timestamptz NOT NULL DEFAULT now(),
    CHECK (total_millicredits >= 0 AND allocated_millicredits >= 0
           AND used_millicredits >= 0 AND reserved_millicredits >= 0
           AND overage_limit_millicredits >= 0),
    -- Bounded so that no sum of them can overflow bigint.
    CHECK (total_millicredits <= 1000000000000000000
           AND overage_limit_millicredits <= 1000000000000000),
    -- Invariant 1: no pool balance goes below zero.
    CHECK (used_millicredits + reserved_millicredits
           <= total_millicredits + overage_limit_millicredits),
    -- Allocations are carved out of credits that exist.
    CHECK (allocated_millicredits <= total_millicredits)
);

CREATE TABLE user_credit_allocations (
    org_id              text NOT NULL REFERENCES organization_credit_pools,
    user_id             text NOT NULL CHECK (user_id ~ '^[A-Za-z0-9._:@-]{1,128}$'),
    limit_millicredits  bigint NOT NULL CHECK (limit_millicredits BETWEEN 0 AND 1000000000000000),
    -- Used in the current period only; the pool's used is lifetime.
    used_millicredits   bigint NOT NULL DEFAULT 0 CHECK (used_millicredits >= 0),
    reserved_millicredits bigint NOT NULL DEFAULT 0 CHECK (reserved_millicredits >= 0),
    reset_period        text NOT NULL CHECK (reset_period IN ('DAILY', 'WEEKLY', 'MONTHLY', 'NEVER')),
    -- Counts resets: each attribution row records the period it was charged
    -- in, so used can be checked against the attribution rows of this period.
    period_number       integer NOT NULL DEFAULT 0,
    next_reset_at       timestamptz,
    revoked_at          timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, user_id),
    CHECK ((reset_period = 'NEVER') = (next_reset_at IS NULL)),
    CHECK (revoked_at IS NULL OR limit_millicredits = 0)
);

-- One immutable row per deduction. The idempotency key of a deduction lives
-- here, in the same row as its effect, so no charge can exist without it.
CREATE TABLE credit_usage_attribution (
    org_id                        text NOT NULL,
    deduction_id                  uuid NOT NULL DEFAULT uuidv7(),
    user_id                       text NOT NULL,
    amount_millicredits           bigint NOT NULL CHECK (amount_millicredits BETWEEN 1 AND 1000000000000000),
    service_type                  text NOT NULL,
    service_name                  text NOT NULL,
    idempotency_key               text NOT NULL,
    request_hash                  bytea NOT NULL,
    request_id                    text NOT NULL DEFAULT '',
    metadata                      jsonb NOT NULL DEFAULT '{}',
    allocation_period             integer NOT NULL,
    -- The balances right after this charge: the result a replay returns.
    allocation_remaining_after    bigint NOT NULL,
    pool_spendable_after          bigint NOT NULL,
    created_at                    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, deduction_id),
    UNIQUE (org_id, idempotency_key),
    FOREIGN KEY (org_id, user_id) REFERENCES user_credit_allocations
);

CREATE INDEX credit_usage_attribution_by_user
    ON credit_usage_attribution (org_id, user_id, created_at);

-- One immutable row per pool or subscription event.
CREATE TABLE org_billing_history (
    org_id                      text NOT NULL REFERENCES organizations,
    event_id                    uuid NOT NULL DEFAULT uuidv7(),
    event_type                  text NOT NULL CHECK (event_type IN (
                                    'SUBSCRIPTION_CREATED', 'SUBSCRIPTION_UPGRADED',
                                    'SUBSCRIPTION_DOWNGRADED', 'SUBSCRIPTION_CHANGED',
                                    'SUBSCRIPTION_CANCELED', 'CREDITS_ADDED',
                                    'ALLOCATION_CHANGED', 'ALLOCATION_REVOKED',
                                    'PERIOD_RESET')),
    -- Non-zero only on CREDITS_ADDED: the pool's total is the sum of these.
    credits_delta_millicredits  bigint NOT NULL DEFAULT 0,
    credit_source               text CHECK (credit_source IN ('PURCHASE', 'GRANT', 'ADJUSTMENT')),
    user_id                     text,
    subscription_id             uuid,
    payment_reference           text,
    amount_paid_cents           bigint,
    currency                    text,
    details                     jsonb NOT NULL DEFAULT '{}',
    idempotency_key             text,
    request_id                  text NOT NULL DEFAULT '',
    created_at                  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, event_id),
    CHECK ((event_type = 'CREDITS_ADDED') = (credit_source IS NOT NULL)),
    CHECK (event_type = 'CREDITS_ADDED' OR credits_delta_millicredits = 0)
);

-- A payment is recorded once, whatever idempotency key carries it.
CREATE UNIQUE INDEX org_billing_history_one_payment
    ON org_billing_history (org_id, payment_reference)
    WHERE payment_reference IS NOT NULL;

-- Idempotency keys of the administrative mutations, stored in the same
-- transaction as the change, with the result a replay returns.
CREATE TABLE idempotency_records (
    org_id           text NOT NULL,
    idempotency_key  text NOT NULL,
    operation        text NOT NULL,
    request_hash     bytea NOT NULL,
    result           jsonb NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, idempotency_key)
);
