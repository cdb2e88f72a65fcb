"""Deletes idempotency records once their retention window has passed.

The records of refusals and administrative changes answer retries of their
key for idempotency_retention_ms; kept forever, they would cost storage for
nothing. After the window a key is treated as new. A successful deduction's
key lives in its attribution row, which is the charge itself: never swept.

Every replica runs a sweeper; a database advisory lock lets one of them work
at a time (server.store.Store.delete_expired_idempotency_records).
"""

import logging
import threading

import psycopg

from orgbilling.server.store import Store

log = logging.getLogger(__name__)


class IdempotencySweeper:
    """Every interval, deletes expired records in batches of at most
    batch_size_max rows, each batch its own short transaction, until a batch
    comes back short. Runs in its own thread, off the request path."""

    def __init__(self, store: Store, *, retention_ms: int, interval_ms: int, batch_size_max: int):
        self._store = store
        self._retention_ms = retention_ms
        self._interval_s = interval_ms / 1000
        self._batch_size_max = batch_size_max
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="idempotency-sweeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stops sweeping, waiting up to timeout_s for a batch in progress, so
        that the connection pool can be closed after it."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def sweep_once(self) -> int:
        """Deletes one batch of expired records; returns how many (0 also
        when another replica is sweeping)."""
        return self._store.delete_expired_idempotency_records(
            retention_ms=self._retention_ms, batch_size_max=self._batch_size_max)

    def _run(self) -> None:
        # Wait first: replicas starting together find nothing new to do, and a
        # short-lived process does no housekeeping.
        while not self._stopping.wait(self._interval_s):
            deleted = 0
            try:
                while not self._stopping.is_set():
                    batch = self.sweep_once()
                    deleted += batch
                    if batch < self._batch_size_max:
                        break
            except psycopg.Error as error:  # the database is away: next interval
                log.warning("sweeping idempotency records failed: %s", error)
            except Exception:  # noqa: BLE001: a bug must not end the thread
                log.exception("sweeping idempotency records failed")
            if deleted:
                log.info("deleted %d expired idempotency records", deleted)
