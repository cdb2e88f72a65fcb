-- Reservations (holds): an amount held against an allocation and its pool
-- for a bounded time, ended exactly once: committed (with the actual amount,
-- which writes one attribution row linked here), released, or expired.
--
-- The pool's and the allocation's reserved_millicredits are the sums of
-- their holds in state OPEN. A hold whose expires_at has passed counts as
-- released from that instant: every function that locks a pool first
-- persists the org's expired holds (release_expired_holds,
-- functions/35_reservations.sql), readers subtract them, and the sweeper
-- persists the rest in batches. So an expired OPEN row is a state that
-- nobody can observe, only a write not yet done.
CREATE TABLE credit_reservations (
    org_id                      text NOT NULL,
    -- uuidv7: time-ordered, so pages by id are pages by creation time.
    reservation_id              uuid NOT NULL DEFAULT uuidv7(),
    user_id                     text NOT NULL,
    amount_millicredits         bigint NOT NULL CHECK (amount_millicredits BETWEEN 1 AND 1000000000000000),
    state                       text NOT NULL DEFAULT 'OPEN'
                                CHECK (state IN ('OPEN', 'COMMITTED', 'RELEASED', 'EXPIRED')),
    service_type                text NOT NULL,
    service_name                text NOT NULL,
    -- The key of the ReserveCredits call (its replay lives in
    -- idempotency_records, family deductions).
    idempotency_key             text NOT NULL,
    request_id                  text NOT NULL DEFAULT '',
    metadata                    jsonb NOT NULL DEFAULT '{}',
    created_at                  timestamptz NOT NULL DEFAULT now(),
    expires_at                  timestamptz NOT NULL,
    -- When it ended: the commit or release, or its expires_at when it expired.
    resolved_at                 timestamptz,
    -- COMMITTED only: what was charged, and the attribution row charging it.
    committed_millicredits      bigint,
    deduction_id                uuid,
    PRIMARY KEY (org_id, reservation_id),
    CHECK (expires_at > created_at),
    CHECK ((state = 'OPEN') = (resolved_at IS NULL)),
    CHECK ((state = 'COMMITTED') = (deduction_id IS NOT NULL)),
    CHECK ((state = 'COMMITTED') = (committed_millicredits IS NOT NULL)),
    FOREIGN KEY (org_id, user_id) REFERENCES user_credit_allocations
);

-- The open holds of an org by expiry: what a function that locks the pool
-- reads to persist the expired ones, in the common case finding none. Partial,
-- so it holds only open holds (few at any time) and is used only by queries
-- that name state = 'OPEN': the key lookups have the primary key alone.
CREATE INDEX credit_reservations_open_by_org
    ON credit_reservations (org_id, expires_at) WHERE state = 'OPEN';
-- The sweeper's: the oldest expiries across orgs. Not led by org_id, which a
-- distributed table allows for a non-unique index.
CREATE INDEX credit_reservations_open_by_expiry
    ON credit_reservations (expires_at) WHERE state = 'OPEN';

-- A commit's attribution row names its reservation; NULL for a deduction.
ALTER TABLE credit_usage_attribution ADD COLUMN reservation_id uuid;
-- At most one attribution row per reservation: a hold is committed once.
CREATE UNIQUE INDEX credit_usage_attribution_one_per_reservation
    ON credit_usage_attribution (reservation_id, org_id) WHERE reservation_id IS NOT NULL;
