"""The client's rules, against a scripted CreditService that fails exactly as
told (the real server cannot be made to fail on cue): one idempotency key
for every retry of an operation, whatever the failure; RetryInfo honoured;
the budget obeyed; refusals not retried; typed errors built from the
ErrorInfo; a cut export resumed where it stopped. Each test runs the
blocking client and the asyncio one alike."""

import asyncio
import threading
import time
from concurrent import futures

import grpc
import pytest

from orgbilling.client import (
    AsyncCreditClient,
    CreditClient,
    DeadlineExceeded,
    InsufficientCredits,
    Overloaded,
    RetryPolicy,
    Unavailable,
)
from orgbilling.client.operations import SERVICE_DESCRIPTORS, method_name
from orgbilling.server.errors import ServiceError
from orgbilling.v1 import (
    credit_service_pb2 as pb,
    credit_service_pb2_grpc,
    reporting_service_pb2,
    reporting_service_pb2_grpc,
)

DEDUCTION = dict(org_id="acme", user_id="alice", amount_millicredits=1500,
                 service_type="llm", service_name="chat-api")


def status(code, reason, *, metadata=None, retry_delay_s=None):
    """The status the server sends for this refusal (its own ServiceError)."""
    error = ServiceError(code, reason, f"scripted {reason}", metadata=metadata,
                         retry_after_s=retry_delay_s)
    return error.to_status()


class ScriptedCredits(credit_service_pb2_grpc.CreditServiceServicer):
    """Answers each DeductCredits with the next step of `script`: "ok", a
    status to abort with, a bare (code, message) to abort with, or
    ("sleep", seconds) then ok. Records every
    request it received, with its x-request-id."""

    def __init__(self):
        self.script: list = []
        self.received: list[tuple[pb.DeductCreditsRequest, str]] = []
        self.lock = threading.Lock()

    def DeductCredits(self, request, context):
        metadata = dict(context.invocation_metadata())
        with self.lock:
            self.received.append((request, metadata.get("x-request-id")))
            step = self.script.pop(0) if self.script else "ok"
        context.set_trailing_metadata((("x-request-id", metadata.get("x-request-id", "")),))
        if isinstance(step, grpc.Status):
            context.abort_with_status(step)
        elif isinstance(step, tuple) and step[0] == "sleep":
            time.sleep(step[1])
        elif isinstance(step, tuple):
            context.abort(*step)
        return pb.DeductCreditsResponse(deduction_id="d-1", allocation_remaining_millicredits=10,
                                        pool_spendable_millicredits=20, replayed=len(self.received) > 1)


class ScriptedExport(reporting_service_pb2_grpc.ReportingServiceServicer):
    """Streams records 0..9 in chunks of two, each chunk's resume token the
    index after it; cuts the stream (UNAVAILABLE) once after `cut_after` chunks."""

    def __init__(self, cut_after: int):
        self.cut_after = cut_after
        self.resume_tokens: list[str] = []

    def ExportUsage(self, request, context):
        self.resume_tokens.append(request.resume_token)
        start = int(request.resume_token or 0)
        for sent, first in enumerate(range(start, 10, 2)):
            if self.cut_after is not None and sent == self.cut_after:
                self.cut_after = None
                context.abort(grpc.StatusCode.UNAVAILABLE, "cut")
            yield reporting_service_pb2.ExportUsageResponse(
                records=[reporting_service_pb2.UsageRecord(deduction_id=str(i)) for i in (first, first + 1)],
                resume_token=str(first + 2))


@pytest.fixture
def scripted():
    credits, export = ScriptedCredits(), ScriptedExport(cut_after=2)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    credit_service_pb2_grpc.add_CreditServiceServicer_to_server(credits, server)
    reporting_service_pb2_grpc.add_ReportingServiceServicer_to_server(export, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", credits, export
    server.stop(0)


def run(kind: str, target: str, operation, **options):
    """operation(client) with a client of this kind: its result, or the
    exception it raised (returned, to be asserted on)."""
    options = {"insecure": True, "transparent_attempts_max": 1, **options}
    try:
        if kind == "sync":
            with CreditClient(target, **options) as client:
                result = operation(client)
                return list(result) if hasattr(result, "__next__") else result

        async def main():
            async with AsyncCreditClient(target, **options) as client:
                result = operation(client)
                if hasattr(result, "__aiter__"):
                    return [item async for item in result]
                return await result
        return asyncio.run(main())
    except Exception as error:  # noqa: BLE001 - handed to the test
        return error


both = pytest.mark.parametrize("kind", ["sync", "async"])


@both
def test_every_retry_of_a_deduction_reuses_its_one_key_and_request_id(scripted, kind):
    """A deadline, an UNAVAILABLE, a RESOURCE_EXHAUSTED and a lost answer in
    a row: four retries, each with the same idempotency key (generated by
    the client) and request ID, then the answer."""
    target, credits, _ = scripted
    credits.script = [("sleep", 0.6), status(grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE"),
                      status(grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED", retry_delay_s=0.01),
                      "ok"]
    result = run(kind, target, lambda c: c.deduct_credits(**DEDUCTION), timeout_s=0.3)
    assert not isinstance(result, Exception), result
    keys = {request.idempotency_key for request, _ in credits.received}
    request_ids = {request_id for _, request_id in credits.received}
    assert len(credits.received) == 4 and len(keys) == 1 and len(request_ids) == 1
    assert result.idempotency_key == keys.pop() and len(result.idempotency_key) >= 16
    assert result.request_id == request_ids.pop() and result.replayed


@both
def test_a_callers_own_key_is_the_one_sent_every_time(scripted, kind):
    target, credits, _ = scripted
    credits.script = [status(grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN")] * 2
    result = run(kind, target, lambda c: c.deduct_credits(**DEDUCTION, idempotency_key="job-42/charge"))
    assert result.idempotency_key == "job-42/charge"
    assert [request.idempotency_key for request, _ in credits.received] == ["job-42/charge"] * 3


@both
def test_two_operations_get_two_keys(scripted, kind):
    target, credits, _ = scripted

    def twice(client):
        if kind == "sync":
            return client.deduct_credits(**DEDUCTION), client.deduct_credits(**DEDUCTION)

        async def both_calls():
            return await client.deduct_credits(**DEDUCTION), await client.deduct_credits(**DEDUCTION)
        return both_calls()
    first, second = run(kind, target, twice)
    assert first.idempotency_key != second.idempotency_key


@both
def test_the_server_retry_delay_is_honoured(scripted, kind):
    """RetryInfo asks for 0.4 s: the next attempt comes no sooner."""
    target, credits, _ = scripted
    credits.script = [status(grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED", retry_delay_s=0.4)]
    started = time.monotonic()
    result = run(kind, target, lambda c: c.deduct_credits(**DEDUCTION))
    assert not isinstance(result, Exception) and time.monotonic() - started >= 0.4


@both
def test_retries_stop_at_the_attempts_limit_with_the_typed_error_and_its_key(scripted, kind):
    target, credits, _ = scripted
    credits.script = [status(grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE")] * 10
    error = run(kind, target, lambda c: c.deduct_credits(**DEDUCTION),
                retry=RetryPolicy(attempts_max=3, backoff_initial_s=0.01))
    assert isinstance(error, Unavailable) and error.reason == "DATABASE_UNAVAILABLE"
    assert error.attempts == 3 and len(credits.received) == 3
    assert error.idempotency_key == credits.received[0][0].idempotency_key
    assert error.request_id == credits.received[0][1]


@both
def test_retries_stop_within_the_time_budget(scripted, kind):
    """Every attempt times out: the budget of 1 s ends it, deadlines cut to
    what is left, with DeadlineExceeded (the outcome is unknown)."""
    target, credits, _ = scripted
    credits.script = [("sleep", 0.5)] * 20
    started = time.monotonic()
    error = run(kind, target, lambda c: c.deduct_credits(**DEDUCTION), timeout_s=0.3,
                retry=RetryPolicy(budget_s=1.0, backoff_initial_s=0.01))
    elapsed = time.monotonic() - started
    assert isinstance(error, DeadlineExceeded) and isinstance(error, Unavailable)
    assert 0.9 <= elapsed < 1.5 and error.attempts >= 3


@both
def test_an_unreachable_service_is_unavailable_never_a_yes(kind):
    """Nothing listens: after the budget, Unavailable, including for a
    check (no option turns an unknown answer into 'sufficient')."""
    from tests.server_process import free_port
    target = f"127.0.0.1:{free_port()}"
    for operation in (lambda c: c.check_credits(org_id="a", user_id="b", amount_millicredits=1),
                      lambda c: c.deduct_credits(**DEDUCTION)):
        error = run(kind, target, operation, retry=RetryPolicy(budget_s=0.5, backoff_initial_s=0.05))
        assert isinstance(error, Unavailable) and not error.from_service
        assert error.attempts >= 2


@both
def test_refusals_are_not_retried_and_carry_their_numbers(scripted, kind):
    target, credits, _ = scripted
    credits.script = [status(grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_CREDITS",
                             metadata={"available_millicredits": "700",
                                       "requested_millicredits": "1500"})]
    error = run(kind, target, lambda c: c.deduct_credits(**DEDUCTION))
    assert isinstance(error, InsufficientCredits) and error.attempts == 1
    assert (error.available_millicredits, error.requested_millicredits) == (700, 1500)
    assert error.request_id == credits.received[0][1] and len(credits.received) == 1


@both
def test_errors_come_from_the_error_info_not_the_message(scripted, kind):
    """A status whose message says INSUFFICIENT_CREDITS but which carries no
    ErrorInfo of the service is not InsufficientCredits: the reason decides."""
    target, credits, _ = scripted
    credits.script = [(grpc.StatusCode.RESOURCE_EXHAUSTED, "INSUFFICIENT_CREDITS")]
    error = run(kind, target, lambda c: c.deduct_credits(**DEDUCTION),
                retry=RetryPolicy(attempts_max=1))
    assert type(error) is Overloaded and error.reason == "RESOURCE_EXHAUSTED"
    assert error.message == "INSUFFICIENT_CREDITS" and not error.from_service


@both
def test_a_cut_export_resumes_after_the_last_chunk_received(scripted, kind):
    target, _, export = scripted
    records = run(kind, target, lambda c: c.export_usage(org_id="acme"))
    assert [record.deduction_id for record in records] == [str(i) for i in range(10)]
    assert export.resume_tokens == ["", "4"]


def test_the_clients_cover_every_rpc_of_the_contract():
    """Each RPC of the three services has a method of the same name in
    snake case on both clients: a new RPC without one fails here."""
    for descriptor in SERVICE_DESCRIPTORS.values():
        for method in descriptor.methods:
            for client_class in (CreditClient, AsyncCreditClient):
                assert callable(getattr(client_class, method_name(method.name), None)), \
                    (client_class.__name__, method.name)


def test_options_are_checked_when_the_client_is_made():
    with pytest.raises(ValueError, match="tls=Tls"):
        CreditClient("localhost:1")
    with pytest.raises(ValueError, match="attempts_max"):
        RetryPolicy(attempts_max=0)
    with pytest.raises(ValueError, match="target"):
        CreditClient("", insecure=True)
