"""Housekeeping off the request path: sweepers that each do one job in
batches, every interval, in a thread of their own.

IdempotencySweeper deletes idempotency records once their retention window
has passed. The records of refusals and administrative changes answer
retries of their key for idempotency_retention_ms; kept forever, they would
cost storage for nothing. After the window a key is treated as new. A
successful deduction's key lives in its attribution row, which is the charge
itself: never swept.

ReservationSweeper persists the expiry of holds past their expires_at
(state EXPIRED, resolved at their expiry, their amounts off reserved). Only
for the record and to keep the open holds few: every check and charge
already counts an expired hold as released, swept or not
(migrations/functions/35_reservations.sql).

PeriodSweeper applies the ended periods of live subscriptions (the next
period, its refresh, the lapse of what does not roll over) of orgs nobody
touched since their period's end: the first access would apply them too
(migrations/functions/50_subscriptions.sql), so this keeps idle orgs'
reports and subscriptions current.

Every replica runs all of them; a database advisory lock per sweeper lets one
replica at a time do each job (server.store.Store).
"""

import logging
import threading

import psycopg

from orgbilling.server.store import Store

log = logging.getLogger(__name__)


class _Sweeper:
    """Every interval, runs sweep_once() (one batch of at most
    batch_size_max rows, its own short transaction) until a batch comes back
    short. Runs in its own thread."""

    # What a batch does, for the log: "deleted %d expired idempotency records".
    done_message = ""

    def __init__(self, *, interval_ms: int, batch_size_max: int, name: str):
        self._interval_s = interval_ms / 1000
        self._batch_size_max = batch_size_max
        self._stopping = threading.Event()
        self._name = name
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stops sweeping, waiting up to timeout_s for a batch in progress, so
        that the connection pool can be closed after it."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def sweep_once(self) -> int:
        raise NotImplementedError

    def _run(self) -> None:
        # Wait first: replicas starting together find nothing new to do, and a
        # short-lived process does no housekeeping.
        while not self._stopping.wait(self._interval_s):
            done = 0
            try:
                while not self._stopping.is_set():
                    batch = self.sweep_once()
                    done += batch
                    if batch < self._batch_size_max:
                        break
            except psycopg.Error as error:  # the database is away: next interval
                log.warning("%s failed: %s", self._name, error)
            except Exception:  # noqa: BLE001: a bug must not end the thread
                log.exception("%s failed", self._name)
            if done:
                log.info(self.done_message, done)


class IdempotencySweeper(_Sweeper):
    """Deletes expired idempotency records, oldest first."""

    done_message = "deleted %d expired idempotency records"

    def __init__(self, store: Store, *, retention_ms: int, interval_ms: int, batch_size_max: int):
        super().__init__(interval_ms=interval_ms, batch_size_max=batch_size_max,
                         name="idempotency-sweeper")
        self._store = store
        self._retention_ms = retention_ms

    def sweep_once(self) -> int:
        """Deletes one batch of expired records; returns how many (0 also
        when another replica is sweeping)."""
        return self._store.delete_expired_idempotency_records(
            retention_ms=self._retention_ms, batch_size_max=self._batch_size_max)


class ReservationSweeper(_Sweeper):
    """Persists the expiry of expired holds, oldest first."""

    done_message = "persisted the expiry of %d reservations"

    def __init__(self, store: Store, *, interval_ms: int, batch_size_max: int):
        super().__init__(interval_ms=interval_ms, batch_size_max=batch_size_max,
                         name="reservation-sweeper")
        self._store = store

    def sweep_once(self) -> int:
        """Persists one batch; returns how many holds it expired (0 also when
        another replica is sweeping)."""
        return self._store.expire_reservations(batch_size_max=self._batch_size_max)


class PeriodSweeper(_Sweeper):
    """Applies the ended subscription periods of idle orgs, longest due first."""

    done_message = "advanced the subscription periods of %d organizations"

    def __init__(self, store: Store, *, interval_ms: int, batch_size_max: int):
        super().__init__(interval_ms=interval_ms, batch_size_max=batch_size_max,
                         name="period-sweeper")
        self._store = store

    def sweep_once(self) -> int:
        """Advances one batch of pools; returns how many (0 also when another
        replica is sweeping)."""
        return self._store.advance_due_periods(batch_size_max=self._batch_size_max)
