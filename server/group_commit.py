"""Group commit: deductions, holds and the commits and releases of holds
waiting at the same moment share one transaction.

A transaction per deduction on a hot pool stops scaling at the pool row's
lock. Here calls queue in a lane (chosen by org_id, so one pool always uses
the same lane, on every replica); the first caller to find its lane idle
starts a batch, which commits everything queued, in arrival order, in one
transaction (server.store.LaneStore.commit_group). Holds and their ends
(ReserveCredits, CommitReservation, ReleaseReservation) queue with the
deductions: they take the same pool lock, so sharing it is what makes a
hot allocation fast, and one lane keeps them all in arrival order. Whoever
arrives while that transaction runs waits; when it ends, the batch starts
the next one, and the lane is idle once nothing waits.

Callers are coroutines on the server's event loop (server.app), and so is
each batch, its transaction included (server.store's LaneStore, on an
async connection): nothing is handed to a thread and back.
Waking the callers of a batch is resolving their futures on the loop; with
one thread per caller, as once, each wake-up cost a caller 100-150 us of
the interpreter's time, and a batch run in a thread of the lane's cost the
loop two wake-ups more (benchmarks/README.md, "The lanes' batches on the
event loop, shipped").

The same mechanism, in a second GroupCommitter over Store.check_batch (in
threads of its own: server.app says why), coalesces CheckCredits: the
checks waiting at one moment share one statement (no lock, no write, unless a period ended) instead of a pooled
connection and a round trip each.

There is no timer: a call that finds its lane idle is committed at once, so
under light load nothing waits, and batches form only from calls that are
already waiting. Each caller gets its answer only after its batch commits.

With tracing on (server.tracing), each batch has a span, a child of the
span of the first call it carries, parent of the batch's statements, with
a link to the span of every call it carries; and each of those calls' spans
gets a link back to the batch's span. Both ways, because a trace shows the
links its own spans hold: from a slow call one finds the batch that carried
it (in its first call's trace), and from a batch the calls it served. The link
back also outlives the SDK's limit of links per span (128 by default,
OTEL_SPAN_LINK_COUNT_LIMIT), which a batch of up to batch_size_max items
can pass.
"""

import asyncio
import collections
import contextlib
import contextvars
import logging
import zlib
from typing import Awaitable, Callable

import psycopg
from opentelemetry import trace
from opentelemetry.trace import Link, Status, StatusCode

from orgbilling.server.errors import deadline_exceeded, server_busy
from orgbilling.server.request_context import call_deadline_var, seconds_left
from orgbilling.server.store import (
    Deduction, DeductionResult, Reservation, ReservationCommit, ReservationRelease,
)

# What a lane queues, and what each gets back (see LaneStore.commit_group).
Item = Deduction | Reservation | ReservationCommit | ReservationRelease

log = logging.getLogger(__name__)

# The batch span's attribute: how many items it carried.
BATCH_SIZE = "orgbilling.group_commit.batch_size"


class _Ticket:
    """One caller's item, waiting in a lane for its batch's outcome."""

    __slots__ = ("item", "span", "context", "outcome")

    def __init__(self, item: Item, span: trace.Span | None, outcome: asyncio.Future):
        self.item = item
        # The caller's span, when tracing: its batch links to it and back.
        self.span = span
        # The caller's context variables: a batch runs in its first caller's
        # (the statements' spans are that call's children, as in a call of its own).
        self.context = contextvars.copy_context()
        # Resolved on the loop when the ticket's batch ends; cancelled when
        # its caller stops waiting (then nobody reads it).
        self.outcome = outcome


class _Lane:
    __slots__ = ("queue", "batch")

    def __init__(self):
        self.queue: collections.deque[_Ticket] = collections.deque()
        # The task committing the lane's current batch; None when idle.
        self.batch: asyncio.Task | None = None


class GroupCommitter:
    """Lanes of calls committed in batches; `submit` from the event loop.
    Nothing here takes a lock: the lanes are only touched on the loop."""

    def __init__(
        self,
        commit_batch: Callable[[list[Item]], Awaitable[list[DeductionResult | dict]]],
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
        """Items waiting in each lane now (a batch committing excluded): for
        metrics, read from any thread."""
        return [len(lane.queue) for lane in self._lanes]

    def _lane_of(self, org_id: str) -> _Lane:
        # crc32, not hash(): the same org must map to the same lane in every
        # process, so batches of several replicas lock pools in one order.
        return self._lanes[zlib.crc32(org_id.encode()) % len(self._lanes)]

    async def submit(self, item):
        """Queues any item with an org_id for commit_batch, and returns its
        result once its batch is done: a DeductionResult for a Deduction, a
        dict for a hold or its end (reservations_batch's jsonb), what
        Store.check_batch answers for a CreditCheck."""
        lane = self._lane_of(item.org_id)
        if len(lane.queue) >= self._queue_length_max:
            raise server_busy("too many calls are waiting for this pool",
                              limit="group_commit_queue_length_max")
        loop = asyncio.get_running_loop()
        ticket = _Ticket(item, None if self._tracer is None else trace.get_current_span(),
                         loop.create_future())
        lane.queue.append(ticket)
        if lane.batch is None:
            self._commit_next(lane)
        left = seconds_left()
        timer = None if left is None else loop.call_later(max(0.0, left), _expire, lane, ticket)
        try:
            return await ticket.outcome
        except asyncio.CancelledError:
            _withdraw(lane, ticket)  # the call was cancelled
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def _commit_next(self, lane: _Lane) -> None:
        """Starts the task that commits the lane's next batch, or leaves the
        lane idle when nothing waits. A task a batch, in the context of the
        batch's first caller: its statements' spans are that call's children."""
        if not lane.queue:
            lane.batch = None
            return
        lane.batch = asyncio.get_running_loop().create_task(
            self._commit_oldest(lane), context=lane.queue[0].context)

    async def _commit_oldest(self, lane: _Lane) -> None:
        """Commits the lane's oldest items as one batch (those that arrived
        before this task's first step included), answers their callers, then
        starts the next batch."""
        batch = [lane.queue.popleft() for _ in range(min(len(lane.queue), self._batch_size_max))]
        try:
            if not batch:
                return  # its callers withdrew before it started
            try:
                outcomes = await self._commit(batch)
            except Exception as error:  # noqa: BLE001: a bug around the batch (a hook, a span)
                log.exception("a batch of %d items failed before it committed", len(batch))
                outcomes = [(None, error)] * len(batch)  # its callers must not wait for ever
            for ticket, (result, error) in zip(batch, outcomes, strict=True):
                if ticket.outcome.done():
                    continue  # its caller stopped waiting
                if error is None:
                    ticket.outcome.set_result(result)
                else:
                    ticket.outcome.set_exception(error)
        finally:
            self._commit_next(lane)

    async def _commit(self, batch: list[_Ticket]) -> list[tuple[object, BaseException | None]]:
        """Each ticket's (result, error), in the context of the batch's first caller."""
        # The batch serves every caller in it, so it runs under the server's
        # own timeouts, not any caller's deadline.
        token = call_deadline_var.set(None)
        if self._on_batch is not None:
            self._on_batch(len(batch))
        with (contextlib.nullcontext(trace.INVALID_SPAN) if self._tracer is None
              else self._batch_span(batch)) as span:
            try:
                results = await self._commit_batch([t.item for t in batch])
            except psycopg.OperationalError as error:
                # The database is unreachable or too slow: every caller hears so
                # and may retry with its key.
                _failed(span, error)
                return [(None, error)] * len(batch)
            except Exception as error:  # noqa: BLE001: one bad item must not fail the others
                _failed(span, error)
                if len(batch) == 1:
                    return [(None, error)]
                log.exception("a batch of %d items failed; committing them one by one", len(batch))
                # Each in a batch of its own, whose span is a child of this one.
                return [outcome for ticket in batch for outcome in await self._commit([ticket])]
            finally:
                call_deadline_var.reset(token)
        return [(result, None) for result in results]

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


def _expire(lane: _Lane, ticket: _Ticket) -> None:
    """The caller's deadline has passed. A ticket no batch has taken yet is
    withdrawn, so surely not applied; one in a batch is committing now, and
    its result will be there for the caller's retry under the same key."""
    if not ticket.outcome.done():
        _withdraw(lane, ticket)
        ticket.outcome.set_exception(deadline_exceeded())


def _withdraw(lane: _Lane, ticket: _Ticket) -> None:
    """Takes the ticket out of its lane if no batch has taken it yet (so it
    is surely not applied); one in a batch stays there."""
    with contextlib.suppress(ValueError):
        lane.queue.remove(ticket)


def _failed(span: trace.Span, error: BaseException) -> None:
    """Marks the batch's span failed (a no-op for INVALID_SPAN: tracing off)."""
    span.record_exception(error)
    span.set_status(Status(StatusCode.ERROR, type(error).__name__))
