-- The tables of the ledger, as one baseline (the first eight migrations
-- squashed before any database was deployed). Tables, indexes, constraints
-- and data moves only: the functions live in functions/, re-applied by the
-- runner whenever they change. This file is never edited again; a change to
-- a table is a new file, 0002_name.sql and so on.
--
-- The five tables of the old billing module, with corrected semantics, plus
-- organizations, idempotency records and the callers' credentials. Amounts
-- are bigint millicredits. Every primary key and hot index leads with org_id,
-- so the schema can be distributed by org_id (Citus) without change.
--
-- The ledger functions find every row through a primary key, and run with
-- sequential scans forbidden (see functions/30_deductions.sql). So no table
-- has a second index that leads with org_id: a key lookup must have exactly
-- one index to choose. Measured before this rule: a cached generic plan of
-- the idempotency lookup settled on an index (org_id, user_id, created_at),
-- which matches only org_id, and read every attribution row of the org for
-- each deduction (8.3M index tuples read for 4,000 deductions).

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
-- here, in the same row as its effect, so no charge can exist without it;
-- kept forever, never swept.
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
    -- The natural key, which every deduction looks up: the only index that
    -- leads with org_id (see the top of this file). An index for usage
    -- reports will come with the reports, planned with this in mind.
    PRIMARY KEY (org_id, idempotency_key),
    -- Leads with deduction_id: finds a deduction by id, and cannot be mistaken
    -- for a lookup by org. It holds org_id so a Citus distribution can keep it.
    UNIQUE (deduction_id, org_id),
    FOREIGN KEY (org_id, user_id) REFERENCES user_credit_allocations
);

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

-- The idempotency keys of everything but successful deductions (those are in
-- their attribution rows): administrative changes and refusals, each stored
-- in the same transaction as its effect, with the result a replay returns.
-- Kept for a retention window: server/sweeper.py deletes them after it.
--
-- A key names a request within its organization and operation family only:
--   deductions     DeductCredits, DeductCreditsBatch items (later: holds)
--   credits        AddCredits
--   allocations    AllocateCredits, RevokeAllocation
--   subscriptions  CreateSubscription, ChangePlan, CancelSubscription
-- Callers of different operations are different services with their own key
-- schemes: with one key space per organization, a key a deduction was refused
-- under could not be used for a purchase by another caller who never saw it.
CREATE TABLE idempotency_records (
    org_id           text NOT NULL,
    idempotency_key  text NOT NULL,
    operation        text NOT NULL,
    request_hash     bytea NOT NULL,
    result           jsonb NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    family           text NOT NULL CHECK (family IN ('deductions', 'credits', 'allocations', 'subscriptions')),
    PRIMARY KEY (org_id, family, idempotency_key)
);

-- For the sweeper, which deletes the oldest records first. It does not lead
-- with org_id on purpose: the key lookups have exactly one index to choose,
-- and a distributed table (Citus) may carry a non-unique index that does not
-- lead with the distribution column.
CREATE INDEX idempotency_records_by_age ON idempotency_records (created_at);

-- Credentials of service callers, with what each may do. A record is either
-- an API key (only the SHA-256 of its random secret is stored) or a client
-- certificate subject (mutual TLS). Every server replica loads the live
-- records every few seconds, so a revoke reaches all of them within seconds.
-- A small table read whole: under Citus it is a reference table, not
-- distributed by org_id.
CREATE TABLE api_keys (
    -- Public: the middle part of obk_<key_id>_<secret>, finds the record.
    key_id               text PRIMARY KEY CHECK (key_id ~ '^[0-9a-f]{16}$'),
    name                 text NOT NULL CHECK (name ~ '^[A-Za-z0-9._:@-]{1,128}$'),
    secret_sha256        bytea CHECK (octet_length(secret_sha256) = 32),
    -- RFC 4514 subject of the client certificate this record admits.
    certificate_subject  text CHECK (certificate_subject <> ''),
    scopes               text[] NOT NULL CHECK (cardinality(scopes) > 0),
    -- NULL: every organization; otherwise only these.
    org_ids              text[] CHECK (cardinality(org_ids) > 0),
    created_at           timestamptz NOT NULL DEFAULT now(),
    revoked_at           timestamptz,
    CHECK ((secret_sha256 IS NULL) <> (certificate_subject IS NULL))
);

-- A name, or a certificate subject, names one live credential; a revoked
-- one's name may be used again.
CREATE UNIQUE INDEX api_keys_live_name ON api_keys (name) WHERE revoked_at IS NULL;
CREATE UNIQUE INDEX api_keys_live_subject ON api_keys (certificate_subject)
    WHERE revoked_at IS NULL AND certificate_subject IS NOT NULL;
