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

The same mechanism, in a second GroupCommitter over Store.check_batch,
coalesces CheckCredits: the checks waiting at one moment share one
statement (no lock, no write, unless a period ended) instead of a pooled
connection and a round trip each.

There is no timer: a call that finds its lane idle is committed at once, so
under light load nothing waits, and batches form only from calls that are
already waiting. Each caller gets its answer only after its batch commits.

With tracing on (server.tracing), each batch has a span, a child of the
leader's current span (its call's), parent of the batch's statements, with
a link to the span of every call it carries; and each of those calls' spans
gets a link back to the batch's span. Both ways, because a trace shows the
links its own spans hold: from a slow call one finds the batch that carried
it (in the leader's trace), and from a batch the calls it served. The link
back also outlives the SDK's limit of links per span (128 by default,
OTEL_SPAN_LINK_COUNT_LIMIT), which a batch of up to batch_size_max items
can pass.
"""

import collections
import contextlib
import logging
import threading
import zlib
from typing import Callable

import psycopg
from opentelemetry import trace
from opentelemetry.trace import Link, Status, StatusCode

from orgbilling.server.errors import deadline_exceeded, server_busy
from orgbilling.server.request_context import call_deadline_var, seconds_left
from orgbilling.server.store import (
    Deduction, DeductionResult, Reservation, ReservationCommit, ReservationRelease,
)

# What a lane queues, and what each gets back (see Store.commit_group).
Item = Deduction | Reservation | ReservationCommit | ReservationRelease

log = logging.getLogger(__name__)

# The batch span's attribute: how many items it carried.
BATCH_SIZE = "orgbilling.group_commit.batch_size"


class _Ticket:
    """One caller's item, waiting in a lane.

    Its signal is a plain lock, acquired from birth and released once to wake
    the caller: Event.set and Event.wait cost several times more, and py-spy
    showed them at a fifth of the server's time on a hot pool."""

    __slots__ = ("item", "span", "leads", "done", "result", "error", "_signal", "_signaled")

    def __init__(self, item: Item, span: trace.Span | None):
        self.item = item
        # The caller's span, when tracing: its batch links to it and back.
        self.span = span
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
        tracer: trace.Tracer | None = None,
    ):
        self._commit_batch = commit_batch
        self._lanes = [_Lane() for _ in range(lanes)]
        self._batch_size_max = batch_size_max
        self._queue_length_max = queue_length_max
        # Told each batch's size (metrics).
        self._on_batch = on_batch
        # Spans for the batches; None when tracing is off.
        self._tracer = tracer

    def queue_lengths(self) -> list[int]:
        """Items waiting in each lane now (a leader's batch included): for
        metrics, read without the lanes' locks."""
        return [len(lane.queue) for lane in self._lanes]

    def _lane_of(self, org_id: str) -> _Lane:
        # crc32, not hash(): the same org must map to the same lane in every
        # process, so batches of several replicas lock pools in one order.
        return self._lanes[zlib.crc32(org_id.encode()) % len(self._lanes)]

    def deduct(self, deduction: Deduction) -> DeductionResult:
        return self.submit(deduction)

    def reserve(self, reservation: Reservation) -> dict:
        """Its answer from reservations_batch (jsonb)."""
        return self.submit(reservation)

    def commit_reservation(self, commit: ReservationCommit) -> dict:
        """Its answer from reservations_batch (jsonb)."""
        return self.submit(commit)

    def release_reservation(self, release: ReservationRelease) -> dict:
        """Its answer from reservations_batch (jsonb)."""
        return self.submit(release)

    def submit(self, item):
        """Queues any item with an org_id for commit_batch, and returns its
        result once its batch is done (the typed methods above, for the
        ledger's committer; a check committer's items are CreditChecks)."""
        lane = self._lane_of(item.org_id)
        ticket = _Ticket(item, None if self._tracer is None else trace.get_current_span())
        with lane.lock:
            if len(lane.queue) >= self._queue_length_max:
                raise server_busy("too many calls are waiting for this pool",
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
        with (contextlib.nullcontext(trace.INVALID_SPAN) if self._tracer is None
              else self._batch_span(batch)) as span:
            try:
                results = self._commit_batch([t.item for t in batch])
            except psycopg.OperationalError as error:
                # The database is unreachable or too slow: every caller hears so
                # and may retry with its key.
                _failed(span, error)
                for ticket in batch:
                    ticket.finish(error=error)
                return
            except Exception as error:  # noqa: BLE001: one bad item must not fail the others
                _failed(span, error)
                if len(batch) == 1:
                    batch[0].finish(error=error)
                    return
                log.exception("a batch of %d items failed; committing them one by one", len(batch))
                # Each in a batch of its own, whose span is a child of this one.
                for ticket in batch:
                    self._commit([ticket])
                return
            finally:
                call_deadline_var.reset(token)
        for ticket, result in zip(batch, results, strict=True):
            ticket.finish(result=result)

    def _batch_span(self, batch: list[_Ticket]):
        """The batch's span, made current until the batch ends, linked to the
        span of each call it carries and each of those back to it."""
        carried = [t.span for t in batch if t.span is not None and t.span.get_span_context().is_valid]
        span = self._tracer.start_span(
            "group commit", links=[Link(s.get_span_context()) for s in carried],
            attributes={BATCH_SIZE: len(batch)})
        batch_context = span.get_span_context()
        for call_span in carried:
            # Linked before the commit, while the callers wait; one whose
            # deadline has passed may have ended its span already.
            if call_span.is_recording():
                call_span.add_link(batch_context)
        return trace.use_span(span, end_on_exit=True, record_exception=False,
                              set_status_on_exception=False)


def _failed(span: trace.Span, error: BaseException) -> None:
    """Marks the batch's span failed (a no-op for INVALID_SPAN: tracing off)."""
    span.record_exception(error)
    span.set_status(Status(StatusCode.ERROR, type(error).__name__))
