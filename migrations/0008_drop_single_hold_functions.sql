-- reserve_credits, commit_reservation and release_reservation wrapped
-- reservations_batch for one call. The server sends a lone call to
-- reservations_batch itself (server/store.py), so nothing called them:
-- dropped, so that a reader of the ledger has one entry point for holds.
DROP FUNCTION IF EXISTS reserve_credits(text, text, bigint, bigint, text, text, text, bytea, text, jsonb);
DROP FUNCTION IF EXISTS commit_reservation(text, uuid, bigint, text, bytea, text, jsonb);
DROP FUNCTION IF EXISTS release_reservation(text, uuid, text, bytea, text);
