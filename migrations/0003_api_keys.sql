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
