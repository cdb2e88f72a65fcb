-- deduct_credits_batch's statements take arrays whose length the planner
-- cannot see, so plpgsql's plan cache judged every custom plan cheaper than
-- the generic one and planned each statement anew on every call: a batch of
-- one cost 2.2-2.4 ms of database CPU (measured), a single-row
-- deduct_credits 0.5 ms. With sequential scans already off (0004), the
-- generic plans are index lookups that suit one item and a thousand alike.
ALTER FUNCTION deduct_credits_batch(text[], text[], bigint[], text[], text[], text[], bytea[], text[], jsonb[])
    SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION deduct_credits(text, text, bigint, text, text, text, bytea, text, jsonb)
    SET plan_cache_mode = force_generic_plan;
