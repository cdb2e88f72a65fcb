"""The one place the server speaks SQL. Every method is one statement, so one
short transaction (but LaneStore.commit_group: group commit's one transaction
of several ledger calls, pipelined, with no round trip between them); the
ledger's logic lives in the SQL functions of migrations/, called here.

The hot path's calls (a group commit's batch, a batch of checks, a
DeductCreditsBatch) are each a `_Plan`: the statements to send and how
their rows become results, apart from how they are sent. The Store runs
plans on a thread's connection (DeductCreditsBatch, whose servicer runs in
the chain's threads, and the coalesced checks); the LaneStore runs them on
the event loop, where the group commit's lanes wait for them
(server.group_commit).

Refusals come back as outcomes (see server.errors.refusal); database failures
come back as psycopg exceptions, which the error interceptor maps to
UNAVAILABLE.
"""

import contextlib
import dataclasses
import datetime
import uuid
from collections.abc import Callable
from operator import itemgetter
from typing import NamedTuple

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from orgbilling.server.binary_arrays import BigintArray, ByteaArray, JsonbArray, TextArray, UuidArray
from orgbilling.server.errors import deadline_exceeded
from orgbilling.server.request_context import seconds_left


# Deductions and their results are tuples: a DeductCreditsBatch makes a
# thousand of each, and a frozen dataclass cost three times the time to
# build (1.1 against 0.4 us). Deduction's fields are in the order of the
# arguments of deduct_credits and deduct_credits_batch, which _statement
# and _batch_params take them in.
class Deduction(NamedTuple):
    org_id: str
    user_id: str
    amount_millicredits: int
    service_type: str
    service_name: str
    idempotency_key: str
    request_hash: bytes
    request_id: str
    metadata: dict[str, str]


# The type of each of Deduction's fields as deduct_credits_batch's array.
_DEDUCTION_ARRAYS = (TextArray, TextArray, BigintArray, TextArray, TextArray, TextArray, ByteaArray,
                     TextArray, JsonbArray)


class DeductionResult(NamedTuple):
    """In the order of _DEDUCTION_COLUMNS."""
    outcome: str
    deduction_id: str
    allocation_remaining_millicredits: int
    pool_spendable_millicredits: int
    replayed: bool


@dataclasses.dataclass(frozen=True, kw_only=True)
class Reservation:
    """A ReserveCredits call, checked."""
    org_id: str
    user_id: str
    amount_millicredits: int
    ttl_ms: int
    service_type: str
    service_name: str
    idempotency_key: str
    request_hash: bytes
    request_id: str
    metadata: dict[str, str]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReservationCommit:
    """A CommitReservation call, checked."""
    org_id: str
    reservation_id: str
    amount_millicredits: int
    idempotency_key: str
    request_hash: bytes
    request_id: str
    metadata: dict[str, str]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReservationRelease:
    """A ReleaseReservation call, checked."""
    org_id: str
    reservation_id: str
    idempotency_key: str
    request_hash: bytes
    request_id: str


# reservations_batch's name for each kind of call.
_OPERATIONS = {
    Reservation: "ReserveCredits",
    ReservationCommit: "CommitReservation",
    ReservationRelease: "ReleaseReservation",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Refund:
    """A RefundCredits call, checked."""
    org_id: str
    deduction_id: str
    amount_millicredits: int
    reason: str
    idempotency_key: str
    request_hash: bytes
    request_id: str


# Tuples, as Deduction is: one of each a CheckCredits call.
class CreditCheck(NamedTuple):
    """A CheckCredits call, checked: what check_batch takes."""
    org_id: str
    user_id: str
    amount_millicredits: int


class CheckResult(NamedTuple):
    outcome: str
    sufficient: bool
    allocation_remaining_millicredits: int
    pool_spendable_millicredits: int


# The deductions' answers as DeductionResult's fields, deduction_id as
# text, the form the answer takes: loading a uuid and formatting it cost
# 0.6 us more a row (measured).
_DEDUCTION_COLUMNS = ("outcome, coalesce(deduction_id::text, ''), coalesce(allocation_remaining, 0),"
                      " coalesce(pool_spendable, 0), replayed")
_DEDUCT_BATCH = (f"SELECT item, {_DEDUCTION_COLUMNS}"
                 " FROM deduct_credits_batch(%b, %b, %b, %b, %b, %b, %b, %b, %b, %b)")
_CHECK_ONE = "SELECT * FROM has_sufficient_credits(%s, %s, %s)"
_DEDUCT_ONE = f"SELECT 1, {_DEDUCTION_COLUMNS} FROM deduct_credits(%b, %b, %b, %b, %b, %b, %b, %b, %b)"
_RESERVATION_TYPES = ("text", "text", "text", "uuid", "bigint", "bigint", "text", "text", "text",
                      "bytea", "text", "jsonb")
_RESERVATIONS_BATCH = "SELECT * FROM reservations_batch({})".format(
    ", ".join(f"%b::{name}[]" for name in _RESERVATION_TYPES))
# A lone call's fields as scalars, made arrays by the server: dumping twelve
# one-element arrays cost this process about 60 us more a call
# (benchmarks/micro/hold_batch_statements.py, measured both ways).
_RESERVATION_ONE = "SELECT * FROM reservations_batch({})".format(
    ", ".join(f"ARRAY[%b::{name}]" for name in _RESERVATION_TYPES))
# Many checks in one statement, answered in the order given. They run in
# org_id order as the database sorts it, as every batch locks its pools
# (has_sufficient_credits may lock a pool whose period ended): under a
# collation other than C, Python's order of the same ids can differ, and
# two orders of locks can deadlock.
_CHECK_BATCH = (
    "SELECT h.* FROM (SELECT * FROM unnest(%b::text[], %b::text[], %b::bigint[]) WITH ORDINALITY"
    " AS c(org_id, user_id, amount, n) ORDER BY c.org_id OFFSET 0) AS c"
    " CROSS JOIN LATERAL has_sufficient_credits(c.org_id, c.user_id, c.amount) AS h ORDER BY c.n"
)

# The oldest expired idempotency records, one batch. Deleted by primary key,
# found through idempotency_records_by_age (created_at).
_DELETE_EXPIRED_RECORDS = """
    DELETE FROM idempotency_records AS r
     USING (SELECT org_id, family, idempotency_key FROM idempotency_records
             WHERE created_at < now() - %s
             ORDER BY created_at
             LIMIT %s) AS expired
     WHERE (r.org_id, r.family, r.idempotency_key)
           = (expired.org_id, expired.family, expired.idempotency_key)
"""
# Any constant works; it only has to be the same in every replica (and differ
# from orgbilling.server.migrate's).
SWEEP_LOCK_KEY = 0x6F726773776565  # "orgswee"
# The reservation expiry sweeper's, apart from the idempotency sweeper's so
# that each runs on one replica at a time without waiting for the other.
RESERVATION_SWEEP_LOCK_KEY = 0x6F7267686F6C64  # "orghold"
PERIOD_SWEEP_LOCK_KEY = 0x6F72677065726E  # "orgpern"

# A page of an org's reservations, newest first, by the primary key. The
# state filter is on the state as of now (reservation_json_now): an open
# hold past its expiry is EXPIRED.
_LIST_RESERVATIONS = """
    SELECT reservation_json_now(r) FROM credit_reservations AS r
     WHERE org_id = %(org_id)s
       AND (%(before)s::uuid IS NULL OR reservation_id < %(before)s::uuid)
       AND (%(state)s::text IS NULL
            OR CASE WHEN r.state = 'OPEN' AND r.expires_at <= ledger_now() THEN 'EXPIRED'
                    ELSE r.state END = %(state)s::text)
     ORDER BY reservation_id DESC
     LIMIT %(limit)s
"""


class ConnectionLost(psycopg.OperationalError):
    """A database error that left the connection broken, whatever psycopg
    calls it: PgBouncer reports the loss of its server connection as one
    more result, which psycopg raises as an InternalError from BEGIN or
    COMMIT. An OperationalError, so the caller gets UNAVAILABLE."""


# A caller's deadline within this of statement_timeout_ms counts as no
# shorter: bounding its statements by it costs three more round trips
# (BEGIN, SET LOCAL, COMMIT), and they may outlive the caller by this much at
# most. The client's default deadline equals the server's default statement
# timeout (5 s), and reaches the server a little under it.
DEADLINE_SLACK_MS = 50


@dataclasses.dataclass(frozen=True, slots=True)
class _Plan:
    """One call of the hot path, apart from how it is sent: its statements,
    and its results from their rows (one list of rows a statement; every row
    starts with its item's number). With `pools`, the statements run in one
    transaction that first locks those pools, in org_id order as every batch
    takes them, then sends the statements pipelined."""
    statements: list[tuple[str, tuple]]
    results: Callable[[list[list[tuple]]], list]
    pools: list[str] | None = None


def _check_plan(checks: list[CreditCheck]) -> _Plan:
    """Checks, each answered as one alone would be: one statement for all
    (server.group_commit coalesces the checks that wait at one moment)."""
    if len(checks) == 1:
        (one,) = checks
        return _Plan([(_CHECK_ONE, (one.org_id, one.user_id, one.amount_millicredits))],
                     lambda rows: [_check_result(rows[0][0])])
    def results(rows: list[list[tuple]]) -> list[CheckResult]:
        return [_check_result(row) for row in rows[0]]

    return _Plan([(_CHECK_BATCH, (TextArray(check.org_id for check in checks),
                                  TextArray(check.user_id for check in checks),
                                  BigintArray(check.amount_millicredits for check in checks)))],
                 results)


def _deductions_plan(items: list[Deduction], *, all_or_nothing: bool = False) -> _Plan:
    """Deductions in one transaction, each with its own result, as if run
    one at a time in the order given. With all_or_nothing, one refusal and
    none is charged: the results still say which were refused, the others
    are NOT_APPLIED, and the refusals are kept under their keys
    (deduct_credits_batch says why)."""
    if len(items) == 1 and not all_or_nothing:
        # Same rules, a fraction of the fixed cost: a batch of one through
        # deduct_credits_batch cost 1.3 ms of database CPU, through
        # deduct_credits 0.5 ms (measured). Group commit under light load
        # and most spread-out traffic come here.
        return _Plan([_statement(items)], lambda rows: [_deduction_result(rows[0][0])])

    def results(rows: list[list[tuple]]) -> list[DeductionResult]:
        (rows,) = rows
        return [_deduction_result(row) for row in sorted(rows, key=_ITEM)]

    return _Plan([(_DEDUCT_BATCH, _batch_params(items, all_or_nothing=all_or_nothing))], results)


def _group_plan(items: list) -> _Plan:
    """Group commit's batch (server.group_commit): deductions, holds and
    their commits and releases that waited in one lane, in one transaction,
    with the semantics of running them one at a time in arrival order; one
    result each (a DeductionResult, or a reservation function's dict).

    Deductions alone take _deductions_plan, set-based. A mix runs its
    consecutive deductions as one deduct_credits_batch and its consecutive
    holds, commits and releases as one reservations_batch, pipelined: one
    round trip, and the pool lock taken once for all of them instead of
    once per call."""
    if all(isinstance(item, Deduction) for item in items):
        return _deductions_plan(items)
    runs: list[list] = []
    for item in items:
        if runs and isinstance(item, Deduction) == isinstance(runs[-1][0], Deduction):
            runs[-1].append(item)
        else:
            runs.append([item])

    def results(rows: list[list[tuple]]) -> list:
        answers = []
        for run, run_rows in zip(runs, rows, strict=True):
            in_order = sorted(run_rows, key=_ITEM)
            if isinstance(run[0], Deduction):
                answers += [_deduction_result(row) for row in in_order]
            else:
                answers += [row[1] for row in in_order]
        return answers

    # Every pool of the batch locked first, in org_id order as every batch
    # takes them; its statements then take only locks this transaction
    # holds, so batches of several replicas cannot deadlock.
    pools = None if len(items) == 1 else sorted({item.org_id for item in items})
    return _Plan([_statement(run) for run in runs], results, pools=pools)


def _connection_lost(conn, error: psycopg.Error) -> psycopg.Error:
    """The error to raise for `error` on conn: ConnectionLost when it left
    the connection broken."""
    if conn.broken and not isinstance(error, ConnectionLost):
        return ConnectionLost(f"the database connection was lost: {error}")
    return error


class Store:
    def __init__(self, pool: ConnectionPool, *, pool_wait_timeout_ms: int, statement_timeout_ms: int):
        self.pool = pool
        self._pool_wait_timeout_s = pool_wait_timeout_ms / 1000
        # Deadlines this long or longer are left to the statement timeout.
        self._short_deadline_s = (statement_timeout_ms - DEADLINE_SLACK_MS) / 1000

    @contextlib.contextmanager
    def _connection(self):
        """A pooled connection, waited for and used no longer than the caller's
        deadline allows: a caller that gave up leaves no work running. Any
        database error that leaves the connection broken comes out as
        ConnectionLost."""
        left = seconds_left()
        if left is not None and left <= 0:
            raise deadline_exceeded()
        wait_s = self._pool_wait_timeout_s if left is None else min(self._pool_wait_timeout_s, left)
        with self.pool.connection(timeout=wait_s) as conn:
            try:
                left = seconds_left()
                if left is None or left >= self._short_deadline_s:
                    yield conn
                    return
                if left <= 0:
                    raise deadline_exceeded()
                # Rare (short deadlines only), so the extra round trips (BEGIN,
                # set_config, COMMIT) are paid rarely. A local setting, in one
                # transaction with the work: it ends with it. A session SET would
                # outlive the work, and behind PgBouncer in transaction mode it
                # would stay on a server connection that other clients use next
                # (its RESET may even run on another one).
                # SET LOCAL rather than set_config(): a utility statement takes
                # no snapshot, so a report may still set its isolation level
                # after it (ReportStore._snapshot).
                with conn.transaction():
                    conn.execute(sql.SQL("SET LOCAL statement_timeout = {}").format(
                        sql.Literal(max(1, int(left * 1000)))))
                    yield conn
            except psycopg.Error as error:
                lost = _connection_lost(conn, error)
                if lost is error:
                    raise
                raise lost from error

    def _run(self, work):
        """Runs work(conn) on a pooled connection and returns its result.

        A connection found dead on use (PostgreSQL restarted, a proxy dropped
        it) is retried once on a fresh one: every mutation is guarded by its
        idempotency key, so running it again is safe.
        """
        for attempt in (1, 2):
            try:
                with self._connection() as conn:
                    return work(conn)
            except ConnectionLost:
                if attempt == 2:
                    raise
            # One dead connection means its idle siblings are likely dead too
            # (PostgreSQL restarted): find them now, not one failed call each.
            self.pool.check()

    def _one(self, sql: str, params: tuple):
        """Runs one statement and returns its first row."""
        return self._run(lambda conn: conn.execute(sql, params).fetchone())

    def _json(self, sql: str, params: tuple) -> dict:
        return self._one(sql, params)[0]

    def _execute(self, plan: _Plan) -> list:
        return plan.results(self._run(lambda conn: _send(conn, plan)))

    # The hot path: DeductCreditsBatch and the coalesced checks (the group
    # commit's batches run on the LaneStore).

    def check_batch(self, checks: list[CreditCheck]) -> list[CheckResult]:
        """Checks that waited at one moment (_check_plan)."""
        return self._execute(_check_plan(checks))

    def deduct_batch(self, items: list[Deduction], *,
                     all_or_nothing: bool = False) -> list[DeductionResult]:
        """Commits many deductions in one transaction (_deductions_plan)."""
        return self._execute(_deductions_plan(items, all_or_nothing=all_or_nothing))

    def get_reservation(self, org_id: str, *, reservation_id: str) -> dict | None:
        row = self._one(
            "SELECT reservation_json_now(r) FROM credit_reservations AS r"
            " WHERE org_id = %s AND reservation_id = %s::uuid",
            (org_id, reservation_id),
        )
        return row[0] if row else None

    def list_reservations(self, org_id: str, *, state: str | None, before_id: str | None,
                          limit: int) -> list[dict]:
        rows = self._run(lambda conn: conn.execute(
            _LIST_RESERVATIONS,
            {"org_id": org_id, "state": state, "before": before_id, "limit": limit},
        ).fetchall())
        return [row[0] for row in rows]

    def refund(self, r: Refund) -> dict:
        """One refund in its own transaction: refunds are rare, so they skip
        group commit (migrations/functions/37_refunds.sql)."""
        return self._json(
            "SELECT refund_credits(%s, %s::uuid, %s, %s, %s, %s, %s)",
            (r.org_id, r.deduction_id, r.amount_millicredits, r.reason, r.idempotency_key,
             r.request_hash, r.request_id),
        )

    # Administration: each returns the jsonb outcome of its SQL function.

    def add_credits(self, org_id: str, *, source: str, amount_millicredits: int,
                    payment_reference: str | None, amount_paid_cents: int | None,
                    currency: str | None, reason: str, idempotency_key: str,
                    request_hash: bytes, request_id: str) -> dict:
        return self._json(
            "SELECT add_credits_to_pool(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (org_id, source, amount_millicredits, payment_reference, amount_paid_cents,
             currency, reason, idempotency_key, request_hash, request_id),
        )

    def set_overage(self, org_id: str, *, limit_millicredits: int,
                    rate_millicents_per_credit: int, idempotency_key: str,
                    request_hash: bytes, request_id: str) -> dict:
        return self._json(
            "SELECT set_pool_overage(%s, %s, %s, %s, %s, %s)",
            (org_id, limit_millicredits, rate_millicents_per_credit, idempotency_key,
             request_hash, request_id),
        )

    def set_refresh(self, org_id: str, *, refresh_millicredits: int | None,
                    rollover_cap_millicredits: int, idempotency_key: str,
                    request_hash: bytes, request_id: str) -> dict:
        return self._json(
            "SELECT set_pool_refresh(%s, %s, %s, %s, %s, %s)",
            (org_id, refresh_millicredits, rollover_cap_millicredits, idempotency_key,
             request_hash, request_id),
        )

    def allocate(self, org_id: str, *, user_id: str, limit_millicredits: int, reset_period: str,
                 idempotency_key: str, request_hash: bytes, request_id: str) -> dict:
        return self._json(
            "SELECT allocate_credits_to_user(%s, %s, %s, %s, %s, %s, %s)",
            (org_id, user_id, limit_millicredits, reset_period, idempotency_key,
             request_hash, request_id),
        )

    def revoke(self, org_id: str, *, user_id: str, idempotency_key: str, request_hash: bytes,
               request_id: str) -> dict:
        return self._json(
            "SELECT revoke_allocation(%s, %s, %s, %s, %s)",
            (org_id, user_id, idempotency_key, request_hash, request_id),
        )

    def create_subscription(self, org_id: str, *, plan: str, billing_cycle: str,
                            price_cents: int, refresh_millicredits: int, currency: str,
                            trial_days: int, external_customer_id: str,
                            external_subscription_id: str, idempotency_key: str,
                            request_hash: bytes, request_id: str) -> dict:
        return self._json(
            "SELECT create_subscription(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (org_id, plan, billing_cycle, price_cents, currency, refresh_millicredits, trial_days,
             external_customer_id, external_subscription_id, idempotency_key,
             request_hash, request_id),
        )

    def change_plan(self, org_id: str, *, plan: str, billing_cycle: str, price_cents: int,
                    refresh_millicredits: int, currency: str, idempotency_key: str,
                    request_hash: bytes, request_id: str) -> dict:
        return self._json(
            "SELECT change_subscription_plan(%s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (org_id, plan, billing_cycle, price_cents, currency, refresh_millicredits,
             idempotency_key, request_hash, request_id),
        )

    def cancel_subscription(self, org_id: str, *, reason: str, idempotency_key: str,
                            request_hash: bytes, request_id: str) -> dict:
        return self._json(
            "SELECT cancel_subscription(%s, %s, %s, %s, %s)",
            (org_id, reason, idempotency_key, request_hash, request_id),
        )

    def record_invoice(self, org_id: str, *, external_invoice_id: str, status: str,
                       amount_cents: int, currency: str, period_start: datetime.datetime,
                       period_end: datetime.datetime, request_id: str) -> dict:
        """One invoice event, idempotent by (org, invoice, status): no key of
        the caller's (migrations/functions/55_invoices.sql)."""
        return self._json(
            "SELECT record_invoice(%s, %s, %s, %s, %s, %s, %s, %s)",
            (org_id, external_invoice_id, status, amount_cents, currency, period_start,
             period_end, request_id),
        )

    # Reads.

    # Reads of a pool or a subscription apply an ended period first
    # (settle_due_periods, 50_subscriptions.sql), as any first access does.

    def get_pool(self, org_id: str) -> dict | None:
        row = self._one(
            "SELECT pool_json_now(p) FROM settle_due_periods(%s) AS p WHERE p.org_id IS NOT NULL",
            (org_id,),
        )
        return row[0] if row else None

    def get_live_subscription(self, org_id: str) -> dict | None:
        return self._json("SELECT live_subscription_json(%s)", (org_id,))

    def org_exists(self, org_id: str) -> bool:
        return self._one("SELECT 1 FROM organizations WHERE org_id = %s", (org_id,)) is not None

    def list_allocations(self, org_id: str, *, after_user_id: str, limit: int,
                         include_revoked: bool) -> list[dict]:
        rows = self._run(lambda conn: conn.execute(
            "SELECT allocation_json_now(a) FROM user_credit_allocations a"
            " WHERE org_id = %s AND user_id > %s AND (%s OR revoked_at IS NULL)"
            " ORDER BY user_id LIMIT %s",
            (org_id, after_user_id, include_revoked, limit),
        ).fetchall())
        return [row[0] for row in rows]

    # Housekeeping.

    def delete_expired_idempotency_records(self, *, retention_ms: int, batch_size_max: int) -> int:
        """Deletes up to batch_size_max idempotency records older than
        retention_ms (by the database's clock), oldest first, in one short
        transaction; returns how many. Returns 0 without deleting when another
        replica is sweeping: deleting is idempotent, so two sweepers would be
        correct, but the second would only repeat the first one's work."""
        retention = datetime.timedelta(milliseconds=retention_ms)

        def work(conn):
            with conn.transaction():
                # A transaction-level lock: it cannot outlive the batch, and it
                # works through PgBouncer in transaction mode.
                if not conn.execute("SELECT pg_try_advisory_xact_lock(%s)",
                                    (SWEEP_LOCK_KEY,)).fetchone()[0]:
                    return 0
                return conn.execute(_DELETE_EXPIRED_RECORDS, (retention, batch_size_max)).rowcount

        return self._run(work)

    def expire_reservations(self, *, batch_size_max: int) -> int:
        """Persists the expiry of up to about batch_size_max expired holds
        (all of their orgs' expired holds), in one short transaction; returns
        how many. Returns 0 when another replica is sweeping."""
        return self._sweep(RESERVATION_SWEEP_LOCK_KEY, "SELECT sweep_expired_reservations(%s)",
                           batch_size_max)

    def advance_due_periods(self, *, batch_size_max: int) -> int:
        """Applies the ended subscription periods of up to batch_size_max
        pools, in one short transaction; returns how many pools. Returns 0
        when another replica is sweeping."""
        return self._sweep(PERIOD_SWEEP_LOCK_KEY, "SELECT sweep_due_periods(%s)", batch_size_max)

    def _sweep(self, lock_key: int, sql: str, batch_size_max: int) -> int:
        """One sweeper batch, sql, under the transaction-level advisory lock
        lock_key (it cannot outlive the batch, and it works through PgBouncer
        in transaction mode): 0 without running it when another replica holds it."""
        def work(conn):
            with conn.transaction():
                if not conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (lock_key,)).fetchone()[0]:
                    return 0
                return conn.execute(sql, (batch_size_max,)).fetchone()[0]

        return self._run(work)

    def ping(self, timeout_s: float) -> None:
        with self.pool.connection(timeout=timeout_s) as conn:
            conn.execute("SELECT 1")


class LaneStore:
    """The group commit's Store: its batches' plans, run on the event loop
    (server.group_commit), through a pool of its own.

    A batch serves every caller in it, so it runs under the server's own
    limits (the pool wait, statement_timeout), not any caller's deadline. A
    connection found dead on use is retried once on a fresh one, as the
    Store does."""

    def __init__(self, pool: AsyncConnectionPool, *, pool_wait_timeout_ms: int):
        self.pool = pool
        self._pool_wait_timeout_s = pool_wait_timeout_ms / 1000

    async def commit_group(self, items: list) -> list:
        """A group commit's batch (_group_plan)."""
        return await self._execute(_group_plan(items))

    async def ping(self, timeout_s: float) -> None:
        async with self.pool.connection(timeout=timeout_s) as conn:
            await conn.execute("SELECT 1")

    async def _execute(self, plan: _Plan) -> list:
        for attempt in (1, 2):
            try:
                async with self.pool.connection(timeout=self._pool_wait_timeout_s) as conn:
                    try:
                        rows = await _send_async(conn, plan)
                    except psycopg.Error as error:
                        lost = _connection_lost(conn, error)
                        if lost is error:
                            raise
                        raise lost from error
                return plan.results(rows)
            except ConnectionLost:
                if attempt == 2:
                    raise
            await self.pool.check()  # its idle siblings are likely dead too


def _send(conn: psycopg.Connection, plan: _Plan) -> list[list[tuple]]:
    """Sends plan's statements on conn; their rows, one list a statement."""
    if plan.pools is None:
        (statement,) = plan.statements
        return [conn.execute(*statement).fetchall()]
    with conn.transaction():
        conn.execute(_LOCK_POOLS, (plan.pools,))
        with conn.pipeline():
            cursors = [conn.execute(*statement) for statement in plan.statements]
        return [cursor.fetchall() for cursor in cursors]


async def _send_async(conn: psycopg.AsyncConnection, plan: _Plan) -> list[list[tuple]]:
    """_send on an async connection."""
    if plan.pools is None:
        (statement,) = plan.statements
        return [await (await conn.execute(*statement)).fetchall()]
    async with conn.transaction():
        await conn.execute(_LOCK_POOLS, (plan.pools,))
        async with conn.pipeline():
            cursors = [await conn.execute(*statement) for statement in plan.statements]
        return [await cursor.fetchall() for cursor in cursors]


_LOCK_POOLS = "SELECT 1 FROM organization_credit_pools WHERE org_id = ANY (%s) ORDER BY org_id FOR UPDATE"


def _statement(run: list) -> tuple[str, tuple]:
    """The SQL and parameters of one run of a group commit's batch: a
    deduction, several (deduct_credits_batch), or holds and their commits and
    releases (reservations_batch). Every row starts with its item's number."""
    item = run[0]
    if isinstance(item, Deduction):
        if len(run) > 1:
            return _DEDUCT_BATCH, _batch_params(run)
        *fields, metadata = item
        return _DEDUCT_ONE, (*fields, Jsonb(metadata))
    columns = _reservations_params(run)
    if len(run) == 1:
        *fields, metadata = (column[0] for column in columns)
        return _RESERVATION_ONE, (*fields, Jsonb(metadata))
    return _RESERVATIONS_BATCH, columns


def _batch_params(items: list[Deduction], *, all_or_nothing: bool = False) -> list:
    # One typed array per column (server.binary_arrays), sent in binary:
    # formatting arrays as text cost 40 us per item (batches of 1,000).
    return [*(array(column) for array, column in zip(_DEDUCTION_ARRAYS, zip(*items), strict=True)),
            all_or_nothing]


def _reservations_params(items: list) -> tuple:
    """reservations_batch's arrays: each call's operation and fields, NULL
    where its kind has none (reservation IDs were checked by the servicer)."""
    def column(array: type[list], name: str) -> list:
        return array(getattr(item, name, None) for item in items)

    return (
        TextArray(_OPERATIONS[type(item)] for item in items),
        column(TextArray, "org_id"), column(TextArray, "user_id"),
        UuidArray(uuid.UUID(item.reservation_id) if hasattr(item, "reservation_id") else None
                  for item in items),
        column(BigintArray, "amount_millicredits"),
        BigintArray(item.ttl_ms * 1000 if isinstance(item, Reservation) else None for item in items),
        column(TextArray, "service_type"), column(TextArray, "service_name"),
        column(TextArray, "idempotency_key"), column(ByteaArray, "request_hash"),
        column(TextArray, "request_id"),
        JsonbArray(getattr(item, "metadata", {}) for item in items),
    )


def _check_result(row) -> CheckResult:
    return CheckResult(
        outcome=row[0], sufficient=bool(row[1]),
        allocation_remaining_millicredits=row[2] or 0, pool_spendable_millicredits=row[3] or 0,
    )


# A row's item number, which every row of the hot path's statements starts with.
_ITEM = itemgetter(0)


def _deduction_result(row: tuple) -> DeductionResult:
    """A row of _DEDUCTION_COLUMNS after its item number."""
    return DeductionResult._make(row[1:])
