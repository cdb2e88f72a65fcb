"""Group commit: deductions, holds and the commits and releases of holds
waiting at the same moment share one transaction.

A transaction per deduction on a hot pool stops scaling at the pool row's
lock. Here calls queue in a lane (chosen by org_id, so one pool always uses
the same lane, on every replica); the first caller to find its lane idle
becomes the lane's leader and commits everything queued, its own item
first in line, as one batch (server.store.Store.commit_group). Holds and
their ends (ReserveCredits, CommitReservation, ReleaseReservation) queue with
the deductions:
they take the same pool lock, so sharing it is what makes a hot allocation
fast, and one lane keeps them all in arrival order. Whoever
arrives while that transaction runs waits; when it ends, the leader hands the
lane to the oldest waiter, who commits the next batch.

There is no timer: a call that finds its lane idle is committed at once, so
under light load nothing waits, and batches form only from calls that are
already waiting. Each caller gets its answer only after its batch commits.
"""

import collections
import logging
import threading
import zlib
from typing import Callable

import psycopg

from orgbilling.server.errors import deadline_exceeded, server_busy
from orgbilling.server.request_context import call_deadline_var, seconds_left
from orgbilling.server.store import (
    Deduction, DeductionResult, Reservation, ReservationCommit, ReservationRelease,
)

# What a lane queues, and what each gets back (see Store.commit_group).
Item = Deduction | Reservation | ReservationCommit | ReservationRelease

log = logging.getLogger(__name__)


class _Ticket:
    """One caller's item, waiting in a lane.

    Its signal is a plain lock, acquired from birth and released once to wake
    the caller: Event.set and Event.wait cost several times more, and py-spy
    showed them at a fifth of the server's time on a hot pool."""

    __slots__ = ("item", "leads", "done", "result", "error", "_signal", "_signaled")

    def __init__(self, item: Item):
        self.item = item
        self.leads = False
        self.done = False
        self.result: DeductionResult | dict | None = None
        self.error: BaseException | None = None
        self._signal = threading.Lock()
        self._signal.acquire()
        self._signaled = False

    def wake(self) -> None:
        # Only the lane's current leader wakes tickets, so this check needs no lock.
        if not self._signaled:
            self._signaled = True
            self._signal.release()

    def wait(self, timeout_s: float | None) -> bool:
        return self._signal.acquire(timeout=-1 if timeout_s is None else max(0.0, timeout_s))

    def finish(self, result: DeductionResult | dict | None = None, error: BaseException | None = None):
        self.result, self.error, self.done = result, error, True
        self.wake()

    def outcome(self) -> DeductionResult | dict:
        if self.error is not None:
            raise self.error
        return self.result


class _Lane:
    def __init__(self):
        self.lock = threading.Lock()
        self.queue: collections.deque[_Ticket] = collections.deque()
        self.leader_active = False


class GroupCommitter:
    def __init__(
        self,
        commit_batch: Callable[[list[Item]], list[DeductionResult | dict]],
        *,
        lanes: int,
        batch_size_max: int,
        queue_length_max: int,
        on_batch: Callable[[int], None] | None = None,
    ):
        self._commit_batch = commit_batch
        self._lanes = [_Lane() for _ in range(lanes)]
        self._batch_size_max = batch_size_max
        self._queue_length_max = queue_length_max
        # Told each batch's size (metrics).
        self._on_batch = on_batch

    def queue_lengths(self) -> list[int]:
        """Items waiting in each lane now (a leader's batch included): for
        metrics, read without the lanes' locks."""
        return [len(lane.queue) for lane in self._lanes]

    def _lane_of(self, org_id: str) -> _Lane:
        # crc32, not hash(): the same org must map to the same lane in every
        # process, so batches of several replicas lock pools in one order.
        return self._lanes[zlib.crc32(org_id.encode()) % len(self._lanes)]

    def deduct(self, deduction: Deduction) -> DeductionResult:
        return self._submit(deduction)

    def reserve(self, reservation: Reservation) -> dict:
        """reserve_credits' jsonb result."""
        return self._submit(reservation)

    def commit_reservation(self, commit: ReservationCommit) -> dict:
        """commit_reservation's jsonb result."""
        return self._submit(commit)

    def release_reservation(self, release: ReservationRelease) -> dict:
        """release_reservation's jsonb result."""
        return self._submit(release)

    def _submit(self, item: Item):
        lane = self._lane_of(item.org_id)
        ticket = _Ticket(item)
        with lane.lock:
            if len(lane.queue) >= self._queue_length_max:
                raise server_busy("too many deductions are waiting for this pool",
                                  limit="group_commit_queue_length_max")
            lane.queue.append(ticket)
            if not lane.leader_active:
                lane.leader_active = ticket.leads = True
        if not ticket.leads:
            self._wait(lane, ticket)
            if ticket.done:
                return ticket.outcome()
        self._lead(lane, ticket)
        return ticket.outcome()

    def _wait(self, lane: _Lane, ticket: _Ticket) -> None:
        """Waits until the ticket is done or made leader, within the deadline."""
        if ticket.wait(seconds_left()):
            return
        with lane.lock:
            if ticket.done:
                return
            if ticket in lane.queue:
                # Not taken into a batch yet: withdraw it, so it is surely not applied.
                lane.queue.remove(ticket)
                if ticket.leads:
                    self._hand_over(lane)
                raise deadline_exceeded()
        # In a batch that is committing now; the caller has gone, the result
        # will be there for its retry under the same idempotency key.
        raise deadline_exceeded()

    def _lead(self, lane: _Lane, own: _Ticket) -> None:
        while True:
            with lane.lock:
                batch = [lane.queue.popleft() for _ in range(min(len(lane.queue), self._batch_size_max))]
            self._commit(batch)
            with lane.lock:
                if own.done:
                    self._hand_over(lane)
                    return

    @staticmethod
    def _hand_over(lane: _Lane) -> None:
        """Makes the oldest waiter the next leader, or marks the lane idle.
        Call with lane.lock held."""
        if lane.queue:
            successor = lane.queue[0]
            successor.leads = True
            successor.wake()
        else:
            lane.leader_active = False

    def _commit(self, batch: list[_Ticket]) -> None:
        # The batch serves every caller in it, so it runs under the server's
        # own timeouts, not the leader's deadline.
        token = call_deadline_var.set(None)
        if self._on_batch is not None:
            self._on_batch(len(batch))
        try:
            results = self._commit_batch([t.item for t in batch])
        except psycopg.OperationalError as error:
            # The database is unreachable or too slow: every caller hears so
            # and may retry with its key.
            for ticket in batch:
                ticket.finish(error=error)
            return
        except Exception as error:  # noqa: BLE001: one bad item must not fail the others
            if len(batch) == 1:
                batch[0].finish(error=error)
                return
            log.exception("a batch of %d items failed; committing them one by one", len(batch))
            for ticket in batch:
                self._commit([ticket])
            return
        finally:
            call_deadline_var.reset(token)
        for ticket, result in zip(batch, results, strict=True):
            ticket.finish(result=result)
