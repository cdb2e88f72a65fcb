"""The checker: compares what callers were told with what the database holds.

Every operation's idempotency key must map to exactly the effects its
outcome allows: an acknowledged one to its effect, once, with its amount; a
refused one to nothing (but perhaps the refusal itself, remembered); an
indeterminate one to all of its effect or none of it. The database may hold no effect of a key nobody sent. At the end,
when every operation has resolved, the balances must equal the sums of
what was acknowledged, and the server's own invariant checks must pass.

Refunds are charges with a negative amount, linked to the deduction they
give back: an acknowledged one is one row and one REFUND event under its
key; the refunds of a deduction never add up to more than it charged; and
a refusal as more than its unrefunded amount must be borne out by the
refunds the database holds.
"""

import collections
import dataclasses
import functools
import json

import psycopg

from orgbilling.server.verify import violations as server_invariant_violations
from tests.bank.history import History, Operation, Outcome
from tests.postgres import HARNESS_APPLICATION_NAME

# The rows each kind of mutation writes, in the table that carries its key.
EXPECTED_HISTORY_EVENT = {
    "AddCredits": "CREDITS_ADDED",
    "AllocateCredits": "ALLOCATION_CHANGED",
    "RevokeAllocation": "ALLOCATION_REVOKED",
    "CreateSubscription": "SUBSCRIPTION_CREATED",
}


@dataclasses.dataclass
class LedgerSnapshot:
    """The rows the checker needs, read in one consistent snapshot."""

    attributions: dict[str, list[tuple]]  # key -> [(org, user, amount, deduction_id, refund_of)]
    history: dict[str, list[tuple]]  # key -> [(org, event_type, user, delta, event_id, details)]
    records: dict[str, list[tuple]]  # key -> [(org, operation, outcome)]
    reservations: dict[str, list[tuple]]  # key of the hold -> [(org, user, amount, reservation_id)]
    pools: dict[str, tuple[int, int]]  # org -> (total, used)
    allocations: dict[tuple[str, str], int]  # (org, user) -> used

    @functools.cached_property
    def refunded(self) -> dict[str, tuple[int | None, int]]:
        """deduction_id -> (what it charged, what its refunds gave back), for
        every charge and every deduction a refund names (charged None if it
        names none)."""
        charged, given_back = {}, collections.Counter()
        for rows in self.attributions.values():
            for _org, _user, amount, deduction_id, refund_of in rows:
                if refund_of is None:
                    charged[deduction_id] = amount
                else:
                    given_back[refund_of] -= amount
        return {deduction_id: (charged.get(deduction_id), given_back[deduction_id])
                for deduction_id in charged.keys() | given_back.keys()}


def read_snapshot(database_url: str) -> LedgerSnapshot:
    with psycopg.connect(database_url, autocommit=True, connect_timeout=10,
                         application_name=HARNESS_APPLICATION_NAME) as conn:
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            return LedgerSnapshot(
                attributions=_by_key(conn.execute(
                    "SELECT idempotency_key, org_id, user_id, amount_millicredits, deduction_id::text,"
                    " refund_of::text FROM credit_usage_attribution")),
                history=_by_key(conn.execute(
                    "SELECT idempotency_key, org_id, event_type, user_id, credits_delta_millicredits,"
                    " event_id::text, details FROM org_billing_history WHERE idempotency_key IS NOT NULL")),
                records=_by_key(conn.execute(
                    "SELECT idempotency_key, org_id, operation, result ->> 'outcome'"
                    " FROM idempotency_records")),
                reservations=_by_key(conn.execute(
                    "SELECT idempotency_key, org_id, user_id, amount_millicredits, reservation_id::text"
                    " FROM credit_reservations")),
                pools={org: (total, used) for org, total, used in conn.execute(
                    "SELECT org_id, total_millicredits, used_millicredits FROM organization_credit_pools")},
                allocations={(org, user): used for org, user, used in conn.execute(
                    "SELECT org_id, user_id, used_millicredits FROM user_credit_allocations")},
            )


def _by_key(cursor) -> dict[str, list[tuple]]:
    grouped = collections.defaultdict(list)
    for key, *rest in cursor:
        grouped[key].append(tuple(rest))
    return grouped


def check(history: History, database_url: str, final: bool) -> list[str]:
    """Every violation found, as a sentence. final: all operations have
    resolved and nothing runs any more."""
    # Outcomes read before the database, keys read after: an acknowledgement
    # the checker holds is already committed, and any effect it finds was
    # sent by an operation it knows.
    decided = history.snapshot()
    ledger = read_snapshot(database_url)
    known = {operation.idempotency_key: operation for operation in history.snapshot()}
    outcomes = {operation.idempotency_key: operation for operation in decided}
    found = list(history.client_violations)
    found += phantom_effects(ledger, known)
    found += over_refunded(ledger)
    for key, operation in known.items():
        # One begun after the first look had no outcome yet when the ledger was read.
        as_read = outcomes.get(key) or dataclasses.replace(operation, outcome=Outcome.INDETERMINATE)
        found += [f"{operation.method} {key} ({as_read.outcome.value}): {problem};"
                  f" attempts: {operation.describe_trail()}"
                  for problem in effect_problems(as_read, ledger)]
    found += [f"server invariant violated: {name}: {rows[:5]}"
              for name, rows in server_invariant_violations(database_url).items()]
    if final:
        found += unresolved(known.values())
        found += balance_problems(known.values(), ledger)
    return found


def phantom_effects(ledger: LedgerSnapshot, known: dict[str, Operation]) -> list[str]:
    keys = set(ledger.attributions) | set(ledger.history) | set(ledger.records) | set(ledger.reservations)
    return [f"an effect of key {key!r}, which no caller sent" for key in sorted(keys - set(known))]


def effect_problems(operation: Operation, ledger: LedgerSnapshot) -> list[str]:
    """What is wrong with the effects of one operation's key. A refusal may
    be remembered under its key (an idempotency record of the refusal):
    that is an answer, not an effect."""
    key = operation.idempotency_key
    attributions = ledger.attributions.get(key, [])
    holds = ledger.reservations.get(key, [])
    history = ledger.history.get(key, [])
    records = [r for r in ledger.records.get(key, []) if r[2] == "OK"]
    refusals = [r for r in ledger.records.get(key, []) if r[2] != "OK"]
    if operation.method == "CheckCredits":
        return ["a check left an effect"] if attributions or history or records or refusals else []
    applied = bool(attributions or history or records or holds)
    problems = remembered_refusal_problems(operation, refusals, applied)
    if operation.outcome is Outcome.REFUSED:
        if operation.reason == "REFUND_EXCEEDS_DEDUCTION":
            problems += refusal_of_refund_problems(operation, ledger)
        return problems + ([f"refused, but applied: {attributions or history or records or holds}"]
                           if applied else [])
    if operation.outcome is Outcome.INDETERMINATE and not applied:
        return problems  # it may yet happen, or never
    if not applied:
        return problems + ["acknowledged, but not applied"]
    if operation.method in ("DeductCredits", "CommitReservation"):
        return problems + deduction_problems(operation, attributions, history, records + holds)
    if operation.method == "RefundCredits":
        # Its row is checked as a charge's; its one REFUND event apart.
        return (problems + deduction_problems(operation, attributions, [], records + holds)
                + refund_event_problems(operation, attributions, history))
    if operation.method in ("ReserveCredits", "ReleaseReservation"):
        return problems + hold_problems(operation, attributions, history, records, holds)
    return problems + administrative_problems(operation, attributions, history, records)


def remembered_refusal_problems(operation: Operation, refusals: list[tuple], applied: bool) -> list[str]:
    """A remembered refusal must be the only answer under its key, of this
    operation, and the refusal the caller heard (if it heard one)."""
    problems = []
    if len(refusals) > 1:
        problems.append(f"{len(refusals)} refusals remembered")
    if refusals and applied:
        problems.append(f"both applied and a refusal remembered: {refusals}")
    if refusals and operation.outcome is Outcome.ACKNOWLEDGED:
        problems.append(f"acknowledged, but a refusal is remembered: {refusals}")
    for org, recorded_operation, outcome in refusals:
        if (org, recorded_operation) != (operation.org_id, operation.method):
            problems.append(f"refusal of {recorded_operation} in {org} remembered")
        if operation.outcome is Outcome.REFUSED and outcome != operation.reason:
            problems.append(f"refusal {outcome} remembered, {operation.reason} heard")
    return problems


def deduction_problems(operation: Operation, attributions, history, records) -> list[str]:
    problems = []
    if len(attributions) != 1:
        problems.append(f"charged {len(attributions)} times")
    if history or records:
        problems.append(f"also left history {history} or records {records}")
    for org, user, amount, deduction_id, refund_of in attributions:
        if (org, user, amount) != (operation.org_id, operation.user_id, operation.amount_millicredits):
            problems.append(f"charged {amount} to {org}/{user}, asked {operation.amount_millicredits}"
                            f" of {operation.org_id}/{operation.user_id}")
        if operation.outcome is Outcome.ACKNOWLEDGED and deduction_id != operation.effect_id:
            problems.append(f"deduction {deduction_id}, acknowledged as {operation.effect_id}")
        if refund_of != (operation.refunded_deduction_id or None):
            problems.append(f"a refund of {refund_of}, asked {operation.refunded_deduction_id or 'none'}")
    return problems


def refund_event_problems(operation: Operation, attributions, history) -> list[str]:
    """A refund writes one REFUND event, in the same transaction as its
    row, naming the row, its deduction and its amount."""
    if len(history) != 1:
        return [f"{len(history)} history events, not 1"]
    org, event_type, user, delta, _event_id, details = history[0]
    details = _details(details)
    refund_ids = [deduction_id for *_, deduction_id, _refund_of in attributions]
    expected = (operation.org_id, "REFUND", operation.user_id, 0, operation.refunded_deduction_id,
                -operation.amount_millicredits)
    found = (org, event_type, user, delta, details.get("deduction_id"), details.get("amount_millicredits"))
    problems = [] if found == expected else [f"event (org, type, user, delta, deduction, amount)"
                                             f" {found}, expected {expected}"]
    if [details.get("refund_id")] != refund_ids:
        problems.append(f"event names refund {details.get('refund_id')}, its rows are {refund_ids}")
    return problems


def refusal_of_refund_problems(operation: Operation, ledger: LedgerSnapshot) -> list[str]:
    """Refused as more than the deduction's unrefunded amount: refunds only
    accumulate, and the refusal was heard before the ledger was read, so
    what is unrefunded now is at most what was then."""
    charged, given_back = ledger.refunded.get(operation.refunded_deduction_id, (None, 0))
    asked = -operation.amount_millicredits
    if charged is not None and asked <= charged - given_back:
        return [f"refused as more than is left of deduction {operation.refunded_deduction_id},"
                f" but {charged - given_back} of its {charged} is still unrefunded (asked {asked})"]
    return []


def over_refunded(ledger: LedgerSnapshot) -> list[str]:
    """In the database: the refunds of each deduction add up to no more
    than it charged, and each names a charge."""
    problems = []
    for deduction_id, (charged, given_back) in sorted(ledger.refunded.items()):
        if charged is None:
            problems.append(f"refunds of {deduction_id}, which is no charge, give back {given_back}")
        elif given_back > charged:
            problems.append(f"deduction {deduction_id} charged {charged}, its refunds gave back {given_back}")
    return problems


def hold_problems(operation: Operation, attributions, history, records, holds) -> list[str]:
    """A hold writes one reservation and one idempotency record, both or
    neither; a release one record; neither charges anything."""
    problems = []
    if attributions or history:
        problems.append(f"left a charge {attributions} or history {history}")
    expected_holds = 1 if operation.method == "ReserveCredits" else 0
    if len(records) != 1 or len(holds) != expected_holds:
        problems.append(f"{len(records)} records and {len(holds)} holds, not 1 and {expected_holds}")
    for org, user, amount, reservation_id in holds:
        if (org, user, amount) != (operation.org_id, operation.user_id, operation.amount_millicredits):
            problems.append(f"held {amount} of {org}/{user}, asked {operation.amount_millicredits}"
                            f" of {operation.org_id}/{operation.user_id}")
        if operation.outcome is Outcome.ACKNOWLEDGED and reservation_id != operation.effect_id:
            problems.append(f"reservation {reservation_id}, acknowledged as {operation.effect_id}")
    for org, recorded_operation, _outcome in records:
        if (org, recorded_operation) != (operation.org_id, operation.method):
            problems.append(f"record of {recorded_operation} in {org}")
    return problems


def administrative_problems(operation: Operation, attributions, history, records) -> list[str]:
    """An administrative mutation writes one history event and one
    idempotency record, both or neither."""
    problems = []
    if attributions:
        problems.append(f"left a charge: {attributions}")
    if len(history) != 1 or len(records) != 1:
        problems.append(f"{len(history)} history events and {len(records)} records, not 1 and 1")
    for org, event_type, user, delta, event_id, details in history:
        if org != operation.org_id or event_type != EXPECTED_HISTORY_EVENT[operation.method]:
            problems.append(f"event {event_type} in {org}")
        if operation.method == "AddCredits":
            if delta != operation.amount_millicredits:
                problems.append(f"added {delta}, asked {operation.amount_millicredits}")
            if operation.outcome is Outcome.ACKNOWLEDGED and event_id != operation.effect_id:
                problems.append(f"event {event_id}, acknowledged as {operation.effect_id}")
        elif operation.method in ("AllocateCredits", "RevokeAllocation"):
            if user != operation.user_id:
                problems.append(f"changed {user}'s allocation, asked {operation.user_id}'s")
            new_limit = _details(details).get("new_limit")
            if operation.method == "AllocateCredits" and new_limit != operation.amount_millicredits:
                problems.append(f"set limit {new_limit}, asked {operation.amount_millicredits}")
    for org, recorded_operation, _outcome in records:
        if (org, recorded_operation) != (operation.org_id, operation.method):
            problems.append(f"record of {recorded_operation} in {org}")
    return problems


def _details(details) -> dict:
    return details if isinstance(details, dict) else json.loads(details)


def unresolved(operations) -> list[str]:
    return [f"{operation.method} {operation.idempotency_key} never resolved after"
            f" {operation.attempts} attempts"
            for operation in operations
            if operation.outcome is Outcome.INDETERMINATE and operation.method != "CheckCredits"]


def balance_problems(operations, ledger: LedgerSnapshot) -> list[str]:
    """Each pool's total is what was acknowledged added, its used what was
    acknowledged charged less what was acknowledged refunded; each
    allocation's used likewise (no resets: the workload's allocations never
    reset, so a refund gives its allocation all of its amount back)."""
    added = collections.Counter()
    charged_pool = collections.Counter()
    charged_user = collections.Counter()
    for operation in operations:
        if operation.outcome is not Outcome.ACKNOWLEDGED:
            continue
        if operation.method == "AddCredits":
            added[operation.org_id] += operation.amount_millicredits
        elif operation.method in ("DeductCredits", "CommitReservation", "RefundCredits"):
            # A refund's amount is negative.
            charged_pool[operation.org_id] += operation.amount_millicredits
            charged_user[(operation.org_id, operation.user_id)] += operation.amount_millicredits
    problems = []
    for org, (total, used) in sorted(ledger.pools.items()):
        if total != added[org]:
            problems.append(f"pool {org}: total {total}, acknowledged additions {added[org]}")
        if used != charged_pool[org]:
            problems.append(f"pool {org}: used {used}, acknowledged charges {charged_pool[org]}")
    for (org, user), used in sorted(ledger.allocations.items()):
        if used != charged_user[(org, user)]:
            problems.append(f"allocation {org}/{user}: used {used},"
                            f" acknowledged charges {charged_user[(org, user)]}")
    return problems
