"""reservations_batch answers a batch exactly as the same calls answer one
at a time (each a batch of one, as the server sends a lone call): every
answer, and every row of the ledger's tables, for seeded random batches.

The batch writes its rows after its last call and answers a key or a hold
used again from memory (35_reservations.sql), so this is where a batch
could drift from the rules: random mixes of holds, commits and releases
over two orgs and an unknown one, with keys used again in the batch and
before it (by a deduction, a refused deduction, a refund, a commit, a
release, a hold), calls sent again as they were or with another hold,
amount or request under their key, holds open, expired, committed and
released, a user due for a period reset, a revoked one and a missing one,
bad amounts and TTLs.
Each batch runs twice in a transaction that is rolled back: once as one
call of the function, once call by call. The ledger's clock is frozen, so
both see the same instant. Rows' updated_at are left out: a batch whose
calls cancel out does not rewrite a row (write_balances), where the calls
alone each do. Each of the batch's memories broken on purpose (a hold's
end, a key's owner, the hold a commit's key charged) fails this test.
"""

import datetime
import json
import random
import re
import uuid

import psycopg
from psycopg.types.json import Jsonb

from tests.support import set_ledger_clock

BATCHES = 400
CALLS_MAX = 7

BEFORE = datetime.datetime(2025, 3, 10, 12, 0, tzinfo=datetime.timezone.utc)
NOW = BEFORE + datetime.timedelta(hours=1)
HOUR_US = 3_600_000_000

COLUMNS = (("operation", "text"), ("org_id", "text"), ("user_id", "text"), ("reservation_id", "uuid"),
           ("amount", "bigint"), ("ttl_us", "bigint"), ("service_type", "text"),
           ("service_name", "text"), ("idempotency_key", "text"), ("request_hash", "bytea"),
           ("request_id", "text"), ("metadata", "jsonb"))
BATCH = "SELECT result FROM reservations_batch({}) ORDER BY item".format(
    ", ".join(f"%s::{type_}[]" for _, type_ in COLUMNS))

# The ledger as both ways leave it (updated_at aside, see above).
TABLES = {
    "pools": "SELECT org_id, total_millicredits, used_millicredits, reserved_millicredits,"
             " period_ends_at FROM organization_credit_pools",
    "allocations": "SELECT org_id, user_id, limit_millicredits, used_millicredits,"
                   " reserved_millicredits, period_number, next_reset_at FROM user_credit_allocations",
    "holds": "SELECT * FROM credit_reservations",
    "charges": "SELECT * FROM credit_usage_attribution",
    "answers": "SELECT org_id, family, idempotency_key, operation, request_hash, result"
               " FROM idempotency_records",
    "history": "SELECT org_id, event_type, credits_delta_millicredits, user_id, details"
               " FROM org_billing_history",
    **{table: f"SELECT * FROM {table}" for table in (
        "usage_daily", "user_usage_daily", "user_usage_monthly", "org_usage_running",
        "user_usage_running")},
}
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def reserve(org, user, amount, key, *, ttl_us=HOUR_US, request_hash=b"h1"):
    return dict(operation="ReserveCredits", org_id=org, user_id=user, amount=amount, ttl_us=ttl_us,
                service_type="llm", service_name="m", idempotency_key=key,
                request_hash=request_hash, request_id="r", metadata={"k": key})


def commit(org, hold, amount, key, *, request_hash=b"h1"):
    return dict(operation="CommitReservation", org_id=org, reservation_id=hold, amount=amount,
                idempotency_key=key, request_hash=request_hash, request_id="r", metadata={"c": key})


def release(org, hold, key, *, request_hash=b"h1"):
    return dict(operation="ReleaseReservation", org_id=org, reservation_id=hold,
                idempotency_key=key, request_hash=request_hash, request_id="r", metadata={})


def run(conn, calls: list[dict]) -> list[dict]:
    columns = [[call.get(name) for call in calls] for name, _ in COLUMNS]
    columns[-1] = [Jsonb(metadata) for metadata in columns[-1]]
    return [answer for (answer,) in conn.execute(BATCH, columns).fetchall()]


def ledger_at_rest(database_url) -> dict[str, str]:
    """Two orgs' ledger before the calls, as of BEFORE; returns the holds'
    and charges' IDs by name. Then the clock is frozen at NOW: two holds
    have expired (not yet persisted), bob's period in o1 has ended."""
    set_ledger_clock(database_url, BEFORE)
    ids = {}
    with psycopg.connect(database_url, autocommit=True) as conn:
        for org, total, overage in (("o1", 10_000, 0), ("o2", 1_500, 100)):
            conn.execute("INSERT INTO organizations VALUES (%s)", (org,))
            conn.execute("INSERT INTO organization_credit_pools (org_id, total_millicredits,"
                         " overage_limit_millicredits) VALUES (%s, %s, %s)", (org, total, overage))
        for org, user, limit in (("o1", "alice", 3_000), ("o1", "bob", 2_000), ("o1", "carol", 1_000),
                                 ("o2", "alice", 1_000), ("o2", "bob", 5_000)):
            conn.execute("INSERT INTO user_credit_allocations (org_id, user_id, limit_millicredits,"
                         " reset_period) VALUES (%s, %s, %s, 'NEVER')", (org, user, limit))
        for name, org, user, amount, ttl_us in (
                ("A", "o1", "alice", 500, 2 * HOUR_US), ("X", "o1", "alice", 300, HOUR_US // 2),
                ("B", "o1", "bob", 400, 2 * HOUR_US), ("C", "o1", "carol", 200, 2 * HOUR_US),
                ("D", "o2", "alice", 400, 2 * HOUR_US), ("Y", "o2", "bob", 300, HOUR_US // 2),
                ("E", "o2", "bob", 200, 2 * HOUR_US), ("K", "o1", "alice", 100, 2 * HOUR_US),
                ("L", "o1", "bob", 50, 2 * HOUR_US)):
            (held,) = run(conn, [reserve(org, user, amount, "h" + name, ttl_us=ttl_us)])
            assert held["outcome"] == "OK", held
            ids[name] = held["reservation_id"]
        assert run(conn, [commit("o1", ids["K"], 100, "committed")])[0]["outcome"] == "OK"
        assert run(conn, [release("o1", ids["L"], "released")])[0]["outcome"] == "OK"
        (charged, outcome), = conn.execute(
            "SELECT deduction_id, outcome FROM deduct_credits('o1', 'alice', 10, 'llm', 'm',"
            " 'deducted', '\\x6831', '', '{}')").fetchall()
        assert outcome == "OK"
        assert conn.execute("SELECT outcome FROM deduct_credits('o2', 'alice', 1000000, 'llm', 'm',"
                            " 'refused', '\\x6831', '', '{}')").fetchone()[0] == "INSUFFICIENT_CREDITS"
        assert conn.execute("SELECT refund_credits('o1', %s, 5, 'x', 'refunded', '\\x6831', '')",
                            (charged,)).fetchone()[0]["outcome"] == "OK"
        conn.execute("UPDATE user_credit_allocations SET reset_period = 'MONTHLY', next_reset_at = %s"
                     " WHERE org_id = 'o1' AND user_id = 'bob'", (NOW - datetime.timedelta(seconds=1),))
        conn.execute("UPDATE user_credit_allocations SET limit_millicredits = 0, revoked_at = %s"
                     " WHERE org_id = 'o1' AND user_id = 'carol'", (BEFORE,))
    set_ledger_clock(database_url, NOW)
    return ids


def random_batch(rng: random.Random, holds: list[str]) -> list[dict]:
    keys = ["k1", "k2", "k3", "k4", "k1", "k2", "deducted", "refused", "refunded", "committed",
            "released", "hA", "hK"]
    calls = []
    for _ in range(rng.randint(2, CALLS_MAX)):
        if calls and rng.random() < 0.25:
            # A call before, again (a retry), or with one thing changed
            # under the same key: another hold, amount or request.
            again = dict(rng.choice(calls))
            change = rng.choice(["nothing", "reservation_id", "amount", "request_hash"])
            if change == "reservation_id" and again["operation"] != "ReserveCredits":
                again["reservation_id"] = rng.choice(holds)
            elif change == "amount":
                again["amount"] = rng.choice([1, 100, 400])
            elif change == "request_hash":
                again["request_hash"] = b"h3"
            calls.append(again)
            continue
        org = rng.choice(["o1"] * 5 + ["o2"] * 4 + ["o3"])
        key, request_hash = rng.choice(keys), rng.choice([b"h1", b"h1", b"h2"])
        amount = rng.choice([1, 50, 100, 200, 300, 400, 500, 700, 1_500, 2_500] * 3 + [0, None])
        kind = rng.random()
        if kind < 0.4:
            calls.append(reserve(org, rng.choice(["alice"] * 3 + ["bob"] * 3 + ["carol", "nobody"]),
                                 amount, key, request_hash=request_hash,
                                 ttl_us=rng.choice([HOUR_US] * 20 + [0, None, 31_622_400_000_001])))
        elif kind < 0.7:
            calls.append(commit(org, rng.choice(holds), amount, key, request_hash=request_hash))
        else:
            calls.append(release(org, rng.choice(holds), key, request_hash=request_hash))
    return calls


class _RolledBack(Exception):
    pass


def answers_and_ledger(conn, calls: list[dict], *, batched: bool):
    """The answers and the ledger's rows after the calls, as one batch or
    one call at a time; everything rolled back after."""
    try:
        with conn.transaction():
            answers = run(conn, calls) if batched else [run(conn, [call])[0] for call in calls]
            ledger = {name: conn.execute(query).fetchall() for name, query in TABLES.items()}
            raise _RolledBack(answers, ledger)
    except _RolledBack as done:
        return done.args


def comparable(answers, ledger, known: dict[str, str]):
    """Answers and rows with each new ID named by the call that made it
    (the two ways make different IDs), rows in a stable order."""
    names = dict(known)
    for n, answer in enumerate(answers, 1):
        for field in ("reservation_id", "deduction_id"):
            names.setdefault(answer.get(field), f"call {n}'s {field}")

    def named(value) -> str:
        text = json.dumps(value, sort_keys=True, default=str)
        return UUID.sub(lambda found: names.get(found.group(0), "an unknown ID"), text)

    return ([named(answer) for answer in answers],
            {table: sorted(named(list(row)) for row in rows) for table, rows in ledger.items()})


def test_a_batch_answers_and_writes_as_its_calls_one_at_a_time(database_url):
    ids = ledger_at_rest(database_url)
    missing = str(uuid.uuid4())
    open_holds = [ids[name] for name in ("A", "B", "C", "D", "E")]
    holds = list(ids.values()) + [missing] + open_holds * 3
    with psycopg.connect(database_url, autocommit=True) as conn:
        known = {reservation: f"hold {name}" for name, reservation in ids.items()} | {missing: "missing"}
        for key, deduction in conn.execute(
                "SELECT idempotency_key, deduction_id::text FROM credit_usage_attribution").fetchall():
            known[deduction] = f"charge {key}"
        outcomes = set()
        for seed in range(BATCHES):
            calls = random_batch(random.Random(seed), holds)
            batched = comparable(*answers_and_ledger(conn, calls, batched=True), known)
            alone = comparable(*answers_and_ledger(conn, calls, batched=False), known)
            assert batched[0] == alone[0], f"seed {seed}: {calls}"
            assert batched[1] == alone[1], f"seed {seed}: {calls}"
            outcomes |= {json.loads(answer)["outcome"] for answer in alone[0]}
    # The batches reached every answer a call can get.
    assert outcomes == {"OK", "INVALID_AMOUNT", "INVALID_TTL", "ORG_NOT_FOUND", "ALLOCATION_NOT_FOUND",
                        "INSUFFICIENT_CREDITS", "IDEMPOTENCY_KEY_REUSED", "RESERVATION_NOT_FOUND",
                        "RESERVATION_NOT_OPEN"}
