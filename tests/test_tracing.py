"""OpenTelemetry traces (server/tracing.py): real calls through a real
server and database, its spans caught by the SDK's in-memory exporter.

Each traced server here has a TracerProvider of its own, passed to it: no
test sets the process-global one."""

import concurrent.futures
import contextlib
import logging
import random
import time

import grpc
import psycopg
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from orgbilling.v1 import credit_service_pb2 as pb
from orgbilling.v1 import reporting_service_pb2 as rp
from orgbilling.v1 import reporting_service_pb2_grpc
from orgbilling.server.app import OrgBillingServer
from orgbilling.server.group_commit import BATCH_SIZE
from orgbilling.server.interceptors.tracing import ERROR_REASON, REQUEST_ID, RPC_GRPC_STATUS_CODE
from orgbilling.server.settings import Settings
from orgbilling.server.tracing import tracer_provider_from_environment
from tests.postgres import SERVER_APPLICATION_NAME
from tests.support import Client, new_key, raises_rpc

CODE = grpc.StatusCode
DEDUCT = "orgbilling.v1.CreditService/DeductCredits"
OTEL_VARIABLES = ("OTEL_TRACES_EXPORTER", "OTEL_SDK_DISABLED", "OTEL_SERVICE_NAME",
                  "OTEL_RESOURCE_ATTRIBUTES", "OTEL_TRACES_SAMPLER")


def start(database_url: str, **keywords) -> OrgBillingServer:
    """A started server as tests/fix_server.py makes them, with `keywords`
    for OrgBillingServer itself (tracer_provider)."""
    settings = Settings(listen_address="127.0.0.1:0", database_url=database_url,
                        health_check_interval_ms=200, pool_size_min=2,
                        **keywords.pop("settings", {}))
    server = OrgBillingServer(settings, database_url, **keywords)
    server.start()
    return server


class Traced:
    """A server with its own in-memory exporter, and a client of it."""

    def __init__(self, database_url: str, token: str, **settings):
        self.exporter = InMemorySpanExporter()
        provider = TracerProvider()
        # Simple, not batching: a span is there as soon as it ends.
        provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.server = start(database_url, tracer_provider=provider, settings=settings)
        self.client = Client(f"127.0.0.1:{self.server.port}", token=token)

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def calls(self, name: str = DEDUCT) -> list[ReadableSpan]:
        return [s for s in self.spans() if s.kind is SpanKind.SERVER and s.name == name]

    def close(self) -> None:
        self.client.close()
        self.server.stop()


@pytest.fixture
def traced(database_url, token):
    running = Traced(database_url, token)
    yield running
    running.close()


def caller_context() -> tuple[int, int, list[tuple[str, str]]]:
    """A caller's own trace and span id, and the metadata that carries them."""
    trace_id, span_id = random.getrandbits(128), random.getrandbits(64)
    return trace_id, span_id, [("traceparent", f"00-{trace_id:032x}-{span_id:016x}-01")]


def deduct_request(amount: int, org: str = "acme") -> pb.DeductCreditsRequest:
    return pb.DeductCreditsRequest(org_id=org, user_id="alice", amount_millicredits=amount,
                                   service_type="llm", service_name="chat", idempotency_key=new_key())


def ancestors(span: ReadableSpan, spans: list[ReadableSpan]) -> list[int]:
    """The span ids above `span` within `spans`, nearest first."""
    by_id = {s.context.span_id: s for s in spans}
    found = []
    while span.parent is not None and span.parent.span_id in by_id:
        span = by_id[span.parent.span_id]
        found.append(span.context.span_id)
    return found


def statements(spans: list[ReadableSpan]) -> list[ReadableSpan]:
    return [s for s in spans if s.kind is SpanKind.CLIENT and s.attributes.get("db.system") == "postgresql"]


def test_a_call_continues_the_callers_trace_with_its_request_id_and_statements_below_it(traced):
    traced.client.funded_org("acme", 10_000, {"alice": 1_000})
    trace_id, span_id, metadata = caller_context()
    _, call = traced.client.credits.DeductCredits.with_call(deduct_request(100), metadata=metadata)
    [span] = [s for s in traced.calls() if s.context.trace_id == trace_id]
    # The caller's span is the server span's parent, across the wire.
    assert span.parent.span_id == span_id and span.parent.is_remote
    assert span.attributes[REQUEST_ID] == dict(call.trailing_metadata())["x-request-id"]
    assert span.attributes["rpc.service"] == "orgbilling.v1.CreditService"
    assert span.attributes["rpc.method"] == "DeductCredits"
    assert span.attributes[RPC_GRPC_STATUS_CODE] == 0
    assert span.status.status_code is StatusCode.UNSET
    # Its statements (the deduction, in its group-commit batch) are below it, in its trace.
    spans = traced.spans()
    below = [s for s in statements(spans) if span.context.span_id in ancestors(s, spans)]
    assert any("deduct" in s.attributes["db.statement"].lower() for s in below), [
        s.attributes["db.statement"] for s in below]
    assert all(s.context.trace_id == trace_id for s in below)


def test_a_read_calls_statements_are_its_children_and_no_statement_starts_a_trace(traced):
    traced.client.funded_org("acme", 10_000, {"alice": 1_000})
    trace_id, _, metadata = caller_context()
    traced.client.credits.CheckCredits(
        pb.CheckCreditsRequest(org_id="acme", user_id="alice", amount_millicredits=1), metadata=metadata)
    time.sleep(0.5)  # the health monitor checks the database every 200 ms meanwhile
    [span] = traced.calls("orgbilling.v1.CreditService/CheckCredits")
    assert span.context.trace_id == trace_id
    children = [s for s in statements(traced.spans())
                if s.parent is not None and s.parent.span_id == span.context.span_id]
    assert children and all(s.end_time <= span.end_time for s in children)
    # The health checks, the sweepers and the pool run statements outside
    # any call: they make no span, let alone a trace of their own.
    assert all(s.parent is not None for s in statements(traced.spans()))


def test_a_call_without_traceparent_starts_a_trace(traced):
    traced.client.funded_org("acme", 10_000, {"alice": 1_000})
    traced.client.credits.DeductCredits(deduct_request(1))
    [span] = traced.calls()
    assert span.parent is None and span.context.trace_id != 0


@contextlib.contextmanager
def pool_row_locked(database_url: str, org: str = "acme"):
    """Holds the org's pool row lock, so a group-commit batch of the org
    waits for it, and the calls behind it queue in its lane."""
    with psycopg.connect(database_url) as conn:
        conn.execute("SELECT 1 FROM organization_credit_pools WHERE org_id = %s FOR UPDATE", (org,))
        yield
        conn.rollback()


def wait_lock_waiter(database_url: str, timeout_s: float = 10) -> None:
    """Waits until a server connection waits for a lock."""
    deadline = time.monotonic() + timeout_s
    with psycopg.connect(database_url, autocommit=True) as conn:
        while not conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
                " AND wait_event_type = 'Lock'", (SERVER_APPLICATION_NAME,)).fetchone()[0]:
            assert time.monotonic() < deadline, "no batch waits for the pool row"
            time.sleep(0.02)


def wait_queued(server: OrgBillingServer, count: int, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while sum(server.committer.queue_lengths()) < count:
        assert time.monotonic() < deadline, server.committer.queue_lengths()
        time.sleep(0.01)


def test_group_committed_deductions_are_linked_to_their_batch_both_ways(traced, database_url):
    """Concurrent deductions queue behind a batch that waits for the pool
    row; the next batch carries them all. Each call's span and its batch's
    span link to each other; the batch is a child of the first call it carries and
    the parent of its statements."""
    traced.client.funded_org("acme", 10**6, {"alice": 10**6})
    callers = 8
    with concurrent.futures.ThreadPoolExecutor(callers) as threads:
        with pool_row_locked(database_url):
            first = threads.submit(traced.client.credits.DeductCredits, deduct_request(1))
            wait_lock_waiter(database_url)  # the first batch, in its transaction
            rest = [threads.submit(traced.client.credits.DeductCredits, deduct_request(1))
                    for _ in range(callers - 1)]
            wait_queued(traced.server, callers - 1)
        for future in [first, *rest]:
            future.result(timeout=30)

    spans = traced.spans()
    calls = traced.calls()
    batches = [s for s in spans if s.name == "group commit"]
    assert len(calls) == callers
    assert sorted(b.attributes[BATCH_SIZE] for b in batches) == [1, callers - 1]
    by_id = {s.context.span_id: s for s in spans}
    for call in calls:
        [batch] = [b for b in batches if call.context.span_id in {l.context.span_id for l in b.links}]
        assert [l.context.span_id for l in call.links] == [batch.context.span_id]
        assert batch.context.trace_id in {l.context.trace_id for l in call.links}
    for batch in batches:
        assert len(batch.links) == batch.attributes[BATCH_SIZE]
        # Its parent is one of the calls it carries: the first.
        assert batch.parent.span_id in {l.context.span_id for l in batch.links}
        assert by_id[batch.parent.span_id].name == DEDUCT
        below = [s for s in statements(spans) if s.parent and s.parent.span_id == batch.context.span_id]
        assert below, "the batch's statements are its children"
    # Seven calls, seven traces, one batch: six calls reach it by their link only.
    [big] = [b for b in batches if b.attributes[BATCH_SIZE] == callers - 1]
    assert len({l.context.trace_id for l in big.links}) == callers - 1


def test_refusals_keep_the_status_unset_and_say_why(traced, token):
    traced.client.funded_org("acme", 10_000, {"alice": 1_000})
    with raises_rpc(CODE.FAILED_PRECONDITION, "INSUFFICIENT_CREDITS"):
        traced.client.credits.DeductCredits(deduct_request(5_000))
    anonymous = Client(f"127.0.0.1:{traced.server.port}", token=None)
    try:
        with raises_rpc(CODE.UNAUTHENTICATED):
            anonymous.credits.DeductCredits(deduct_request(1))
    finally:
        anonymous.close()
    refused, unauthenticated = traced.calls()
    # An answer to the caller, not a failure of the server (the RPC conventions).
    assert refused.status.status_code is StatusCode.UNSET
    assert refused.attributes[RPC_GRPC_STATUS_CODE] == CODE.FAILED_PRECONDITION.value[0]
    assert refused.attributes[ERROR_REASON] == "INSUFFICIENT_CREDITS"
    # Refused by an interceptor before any servicer: traced all the same.
    assert unauthenticated.attributes[RPC_GRPC_STATUS_CODE] == CODE.UNAUTHENTICATED.value[0]
    assert unauthenticated.status.status_code is StatusCode.UNSET


def test_a_server_failure_sets_the_error_status_of_the_call_its_batch_and_statement(
        database_url, token):
    traced = Traced(database_url, token, statement_timeout_ms=300)
    try:
        traced.client.funded_org("acme", 10_000, {"alice": 1_000})
        with pool_row_locked(database_url):
            with raises_rpc(CODE.UNAVAILABLE):
                traced.client.credits.DeductCredits(deduct_request(1))
        spans = traced.spans()
        [call] = traced.calls()
        assert call.status.status_code is StatusCode.ERROR
        assert call.status.description.startswith("UNAVAILABLE")
        assert call.attributes[RPC_GRPC_STATUS_CODE] == CODE.UNAVAILABLE.value[0]
        [batch] = [s for s in spans if s.name == "group commit"]
        assert batch.status.status_code is StatusCode.ERROR
        assert [e.attributes["exception.type"] for e in batch.events] == ["psycopg.errors.QueryCanceled"]
        failed = [s for s in statements(spans) if s.status.status_code is StatusCode.ERROR]
        assert failed and all(batch.context.span_id in ancestors(s, spans) for s in failed)
    finally:
        traced.close()


def test_a_streamed_call_is_traced_to_its_end_even_when_the_caller_stops_early(traced, caplog):
    traced.client.funded_org("acme", 10_000, {"alice": 1_000})
    for _ in range(3):
        traced.client.credits.DeductCredits(deduct_request(1))
    reports = reporting_service_pb2_grpc.ReportingServiceStub(traced.client.channel)
    trace_id, _, metadata = caller_context()
    chunks = list(reports.ExportUsage(rp.ExportUsageRequest(org_id="acme", chunk_size=1),
                                      metadata=metadata))
    assert len(chunks) == 3
    cancelled_trace_id, _, metadata = caller_context()
    stream = reports.ExportUsage(rp.ExportUsageRequest(org_id="acme", chunk_size=1), metadata=metadata)
    next(stream)
    with caplog.at_level(logging.ERROR, logger="opentelemetry.context"):
        stream.cancel()
        deadline = time.monotonic() + 10
        while len(traced.calls("orgbilling.v1.ReportingService/ExportUsage")) < 2:
            assert time.monotonic() < deadline, "the cancelled stream's span never ended"
            time.sleep(0.05)
    assert not caplog.records  # the call's context was detached where it was attached
    spans = traced.spans()
    for trace_id_ in (trace_id, cancelled_trace_id):
        [span] = [s for s in traced.calls("orgbilling.v1.ReportingService/ExportUsage")
                  if s.context.trace_id == trace_id_]
        assert any(s.parent.span_id == span.context.span_id for s in statements(spans) if s.parent)


def test_with_tracing_off_no_span_is_made(database_url, token, monkeypatch):
    """The default, with no OTEL_* variable: no provider, no instrumented
    connection, and not one span started, even for a caller's traceparent."""
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    started = []
    real_start_span = SdkTracer.start_span
    monkeypatch.setattr(SdkTracer, "start_span",
                        lambda *args, **kwargs: started.append(args) or real_start_span(*args, **kwargs))
    server = start(database_url)
    client = Client(f"127.0.0.1:{server.port}", token=token)
    try:
        assert server.tracer_provider is None
        with server.pool.connection() as conn:
            assert conn.cursor_factory is psycopg.Cursor
        client.funded_org("acme", 10_000, {"alice": 1_000})
        _, _, metadata = caller_context()
        client.credits.DeductCredits(deduct_request(1), metadata=metadata)
        with raises_rpc(CODE.FAILED_PRECONDITION):
            client.credits.DeductCredits(deduct_request(5_000), metadata=metadata)
    finally:
        client.close()
        server.stop()
    assert started == []


@pytest.mark.parametrize("variables", [
    {},
    {"OTEL_TRACES_EXPORTER": "none"},
    {"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"},
])
def test_tracing_is_off_unless_an_exporter_is_named(variables, monkeypatch):
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert tracer_provider_from_environment() is None


def test_the_otel_variables_configure_the_default_provider(database_url, token, monkeypatch):
    """OTEL_TRACES_EXPORTER=console and OTEL_SERVICE_NAME, read by the SDK:
    the server's spans reach the console exporter by the time it stops."""
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    # The console exporter writes to the sys.stdout of its import, which no
    # capture of this test sees: what it is given is kept instead.
    exported = []
    monkeypatch.setattr(ConsoleSpanExporter, "export",
                        lambda self, spans: exported.extend(spans) or SpanExportResult.SUCCESS)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    assert tracer_provider_from_environment().resource.attributes["service.name"] == "orgbilling"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "billing-under-test")
    server = start(database_url)
    client = Client(f"127.0.0.1:{server.port}", token=token)
    try:
        client.funded_org("acme", 10_000, {"alice": 1_000})
        client.credits.DeductCredits(deduct_request(1))
    finally:
        client.close()
        server.stop()  # shuts its own provider down: the batched spans are written
    [call] = [s for s in exported if s.name == DEDUCT]
    assert call.resource.attributes["service.name"] == "billing-under-test"
