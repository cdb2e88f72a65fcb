"""Every interceptor of the chain on a unary method in the thread pool, a
server-streaming one and a unary coroutine on the event loop alike: a
test-only service (no database) served through the real InterceptorChain
on a grpc.aio server, with each interceptor as the server builds it."""

import asyncio
import concurrent.futures
import contextlib
import contextvars
import threading
import time

import grpc
import pytest
from google.protobuf import descriptor_pool, wrappers_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from orgbilling.server.app import FREQUENT_METHODS
from orgbilling.server.auth import scopes
from orgbilling.server.auth.caller import Caller
from orgbilling.server.errors import ServiceError, unauthenticated
from orgbilling.server.event_loop import EventLoopThread
from orgbilling.server.health import HealthServicer
from orgbilling.server.interceptors import Interceptor, InterceptorChain
from orgbilling.server.interceptors.admission import AdmissionInterceptor
from orgbilling.server.interceptors.auth import AuthInterceptor
from orgbilling.server.interceptors.deadline import DeadlineInterceptor
from orgbilling.server.interceptors.draining import DrainingInterceptor
from orgbilling.server.interceptors.open_streams import OpenStreamsInterceptor
from orgbilling.server.interceptors.ratelimit import RateLimitInterceptor, TokenBuckets
from orgbilling.server.request_context import current_request_id, seconds_left
from tests.support import error_info

SERVICE = "test.Echo"
OPEN_SERVICE = "test.OpenEcho"
UNARY = f"/{SERVICE}/Unary"
STREAM = f"/{SERVICE}/Stream"
ON_LOOP = f"/{SERVICE}/OnLoop"
# A call's kind, and its method's name.
METHODS = {"unary": "Unary", "stream": "Stream", "loop": "OnLoop"}
KINDS = list(METHODS)
GOOD_TOKEN = "good"


class Behaviour:
    """What the test service does, set by each test: echo the request by
    default, or raise; the next call after `release` is set waits for it."""

    def __init__(self):
        self.raise_error: Exception | None = None
        self.release: threading.Event | None = None
        self.started = threading.Semaphore(0)
        self.seen: list[dict] = []

    def run(self, request, context):
        self.seen.append({"request_id": current_request_id(), "seconds_left": seconds_left()})
        self.started.release()
        release, self.release = self.release, None
        if release is not None:
            release.wait(10)
        if self.raise_error is not None:
            raise self.raise_error
        return wrappers_pb2.StringValue(value=request.value)


class FakeAuthenticator:
    """Admits `authorization: Bearer good`, with every scope, on org "acme"."""

    def authenticate(self, metadata, auth_context):
        if ("authorization", f"Bearer {GOOD_TOKEN}") in tuple(metadata):
            return Caller(principal="test:good", display_name="good", scopes=scopes.ALL_SCOPES,
                          org_ids=None)
        raise unauthenticated("missing", "no credentials")


def echo_handlers(behaviour: Behaviour) -> dict[str, grpc.RpcMethodHandler]:
    def unary(request, context):
        return behaviour.run(request, context)

    def stream(request, context):
        yield wrappers_pb2.StringValue(value="first")
        yield behaviour.run(request, context)

    async def on_loop(request, context):
        # In a thread, as the behaviour may wait; the call's context variables go with it.
        return await asyncio.to_thread(behaviour.run, request, context)

    options = {"request_deserializer": wrappers_pb2.StringValue.FromString,
               "response_serializer": wrappers_pb2.StringValue.SerializeToString}
    return {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, **options),
        "Stream": grpc.unary_stream_rpc_method_handler(stream, **options),
        "OnLoop": grpc.unary_unary_rpc_method_handler(on_loop, **options),
    }


class Harness:
    def __init__(self, *, calls_max=100, streams_max=100, stream_lifetime_ms=60_000,
                 rate_per_s=0, burst=1, innermost=()):
        self.behaviour = Behaviour()
        self.draining = DrainingInterceptor()
        buckets = TokenBuckets(rate_per_s=rate_per_s, burst=burst, keys_max=1000) if rate_per_s else None
        open_services = frozenset({OPEN_SERVICE, "grpc.health.v1.Health"})
        self.threads = concurrent.futures.ThreadPoolExecutor(32)
        chain = InterceptorChain([
            self.draining,
            AdmissionInterceptor(calls_max=calls_max, retry_after_ms=100),
            OpenStreamsInterceptor(open_services=open_services, streams_max=streams_max,
                                   lifetime_ms=stream_lifetime_ms, retry_after_ms=100),
            AuthInterceptor(FakeAuthenticator(), open_services=open_services),
            RateLimitInterceptor(reads=buckets, writes=buckets),
            DeadlineInterceptor(),
            *innermost,
        ], threads=self.threads)
        self.health = HealthServicer(service_names=[SERVICE], watch_lifetime_ms=60_000)
        self.event_loop = EventLoopThread(name="harness")

        def new_server():
            server = grpc.aio.server()
            # Unary a registered method, Stream and OnLoop served by their
            # service's generic handler only, as server.app splits its
            # services: the tests below, run for each kind, take both ways in.
            services = chain.services(server, registered={UNARY, f"/{OPEN_SERVICE}/Unary",
                                                          "/grpc.health.v1.Health/Check"})
            for name in (SERVICE, OPEN_SERVICE):
                # As the generated add_*_to_server functions add a service.
                handlers = echo_handlers(self.behaviour)
                services.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
                services.add_registered_method_handlers(name, handlers)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, services)
            return server, server.add_insecure_port("127.0.0.1:0")

        self.server, port = self.event_loop.call(new_server)
        self.event_loop.run(self.server.start())
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")

    def call(self, kind: str, value: str = "hi", *, service: str = SERVICE, token: str | None = GOOD_TOKEN,
             raw: bytes | None = None, timeout: float = 5, request_id: str | None = None):
        """The call's responses and its trailing metadata; raises grpc.RpcError."""
        metadata = [("authorization", f"Bearer {token}")] if token else []
        if request_id:
            metadata.append(("x-request-id", request_id))
        method = f"/{service}/{METHODS[kind]}"
        payload = raw if raw is not None else wrappers_pb2.StringValue(value=value).SerializeToString()
        if kind != "stream":
            call = self.channel.unary_unary(method, request_serializer=None, response_deserializer=None)
            response, outcome = call.with_call(payload, metadata=metadata, timeout=timeout)
            return [response], dict(outcome.trailing_metadata())
        call = self.channel.unary_stream(method, request_serializer=None, response_deserializer=None)
        responses = call(payload, metadata=metadata, timeout=timeout)
        return list(responses), dict(responses.trailing_metadata())

    def close(self):
        self.channel.close()
        self.event_loop.run(self.server.stop(0))
        self.event_loop.close()
        self.threads.shutdown(wait=False)


@pytest.fixture(autouse=True)
def declared_scopes(monkeypatch):
    """The test service's methods need credits.read, like any read."""
    monkeypatch.setitem(scopes.METHOD_SCOPES, UNARY, scopes.CREDITS_READ)
    monkeypatch.setitem(scopes.METHOD_SCOPES, STREAM, scopes.CREDITS_READ)
    monkeypatch.setitem(scopes.METHOD_SCOPES, ON_LOOP, scopes.CREDITS_READ)


@pytest.fixture
def harness():
    made = []

    def make(**options) -> Harness:
        made.append(Harness(**options))
        return made[-1]

    yield make
    for one in made:
        one.close()


def refusal(call) -> tuple[grpc.StatusCode, str, grpc.RpcError]:
    with pytest.raises(grpc.RpcError) as refused:
        call()
    return refused.value.code(), error_info(refused.value).reason, refused.value


@pytest.mark.parametrize("kind", KINDS)
def test_a_call_gets_its_request_id_back_in_the_trailers_and_the_servicer_sees_it(harness, kind):
    """The request ID set for the call is the one sent back, on success."""
    h = harness()
    responses, trailers = h.call(kind, request_id="trace-1")
    assert responses[-1] == wrappers_pb2.StringValue(value="hi").SerializeToString()
    assert trailers["x-request-id"] == "trace-1"
    assert h.behaviour.seen[-1]["request_id"] == "trace-1"


@pytest.mark.parametrize("kind", KINDS)
def test_a_service_error_becomes_a_trailers_only_status_with_its_error_info(harness, kind):
    """Raised before or after a streamed message, a ServiceError is the
    status, with the request ID in the trailers; before any message, nothing
    but trailers is sent (so clients' retry policies apply)."""
    h = harness()
    h.behaviour.raise_error = ServiceError(grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE", "down")
    code, reason, error = refusal(lambda: h.call(kind, request_id="trace-2"))
    assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE")
    assert dict(error.trailing_metadata())["x-request-id"] == "trace-2"
    if kind != "stream":
        assert not error.initial_metadata()


@pytest.mark.parametrize("kind", KINDS)
def test_a_bug_is_internal_with_a_generic_message(harness, kind):
    """An unexpected exception is INTERNAL, 'internal error', with an ErrorInfo: no detail leaks."""
    h = harness()
    h.behaviour.raise_error = RuntimeError("secret detail")
    code, reason, error = refusal(lambda: h.call(kind))
    assert (code, reason) == (grpc.StatusCode.INTERNAL, "INTERNAL")
    assert "secret" not in error.details()


@pytest.mark.parametrize("kind", KINDS)
def test_undecodable_bytes_are_invalid_argument_but_only_after_authentication(harness, kind):
    """Bytes that are not a message: INVALID_ARGUMENT MALFORMED_REQUEST for an
    authenticated caller, UNAUTHENTICATED for anyone else."""
    h = harness()
    garbage = b"\xff\xff\xff\xff"
    assert refusal(lambda: h.call(kind, raw=garbage))[:2] == (
        grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST")
    assert refusal(lambda: h.call(kind, raw=garbage, token=None))[:2] == (
        grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")
    assert not h.behaviour.seen


@pytest.mark.parametrize("kind", KINDS)
def test_authentication_and_scope_apply_to_every_kind(harness, kind, monkeypatch):
    """No credentials: UNAUTHENTICATED; a method with no declared scope:
    refused to everyone; with a scope: admitted."""
    h = harness()
    assert refusal(lambda: h.call(kind, token="bad"))[0] == grpc.StatusCode.UNAUTHENTICATED
    assert h.call(kind)[0]
    for method in (UNARY, STREAM, ON_LOOP):
        monkeypatch.delitem(scopes.METHOD_SCOPES, method)
    assert refusal(lambda: h.call(kind))[:2] == (grpc.StatusCode.PERMISSION_DENIED, "SCOPE_NOT_DECLARED")
    assert h.call(kind, service=OPEN_SERVICE, token=None)[0]  # open services need no credentials


@pytest.mark.parametrize("kind", KINDS)
def test_the_rate_limit_applies_to_every_kind(harness, kind, monkeypatch):
    """A caller past its budget gets RATE_LIMITED with a RetryInfo."""
    h = harness(rate_per_s=1, burst=2)
    h.call(kind)
    h.call(kind)
    code, reason, error = refusal(lambda: h.call(kind))
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
    assert has_retry_info(error)


@pytest.mark.parametrize("kind", KINDS)
def test_admission_refuses_past_the_limit_at_once_and_exempts_health(harness, kind, monkeypatch):
    """With every admission slot taken by a call of the other kind, a call is
    refused SERVER_BUSY with a RetryInfo at once; health still answers."""
    h = harness(calls_max=1)
    with held_call(h, "stream" if kind == "unary" else "unary"):
        started = time.monotonic()
        code, reason, error = refusal(lambda: h.call(kind))
        assert time.monotonic() - started < 1
        assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "SERVER_BUSY")
        assert error_info(error).metadata["limit"] == "concurrent_rpcs_max"
        assert has_retry_info(error)
        check = health_pb2_grpc.HealthStub(h.channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING  # answered; nothing set it
    assert h.call(kind)[0]  # the slot is free again once the held call ended


def test_open_service_streams_are_limited_in_number_and_end_after_their_lifetime(harness):
    """Streams of an open service: past streams_max, SERVER_BUSY; a stream
    still talking after its lifetime ends normally; unary calls are not counted."""
    h = harness(streams_max=1, stream_lifetime_ms=300)
    with held_call(h, "stream", service=OPEN_SERVICE, token=None):
        code, reason, error = refusal(lambda: h.call("stream", service=OPEN_SERVICE, token=None))
        assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "SERVER_BUSY")
        assert error_info(error).metadata["limit"] == "open_service_streams_max"
        assert h.call("unary", service=OPEN_SERVICE, token=None)[0]
        time.sleep(0.4)
    # The held stream outlived its lifetime: its second message was never sent.
    assert h.held_responses == [wrappers_pb2.StringValue(value="first").SerializeToString()]


@pytest.mark.parametrize("kind", KINDS)
def test_draining_refuses_new_calls_and_waits_for_running_ones(harness, kind, monkeypatch):
    """Once draining, new calls get UNAVAILABLE SHUTTING_DOWN; wait_quiet
    waits for a running call of either kind."""
    h = harness()
    with held_call(h, kind):
        h.draining.begin_draining()
        assert refusal(lambda: h.call(kind))[:2] == (grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN")
        assert not h.draining.wait_quiet(quiet_s=0.0, timeout_s=0.3)
    assert h.draining.wait_quiet(quiet_s=0.0, timeout_s=5)


@pytest.mark.parametrize("kind", KINDS)
def test_the_callers_deadline_reaches_the_servicer(harness, kind, monkeypatch):
    """seconds_left() in the servicer is the caller's deadline, or None without one."""
    h = harness()
    h.call(kind, timeout=3)
    assert 2 < h.behaviour.seen[-1]["seconds_left"] < 3.5
    h.call(kind, timeout=None)
    assert h.behaviour.seen[-1]["seconds_left"] is None


class ContextVarInterceptor(Interceptor):
    """Sets a context variable for the call and resets it at the call's end,
    which fails unless the end runs in the context the call began in (as
    OpenTelemetry's detach does)."""

    def __init__(self):
        self.var = contextvars.ContextVar("test_call_var")
        self.ended = threading.Event()
        self.failures: list[Exception] = []

    def intercept(self, call):
        token = self.var.set(call.request_id)

        def end():
            try:
                self.var.reset(token)
            except ValueError as error:
                self.failures.append(error)
            self.ended.set()

        return end


def test_a_stream_cancelled_while_its_servicer_runs_ends_in_its_own_context(harness):
    """The caller cancels while the stream's next message is being made in
    a thread: once that step returns, the interceptors' ends run, in the
    context the call began in."""
    probe = ContextVarInterceptor()
    h = harness(innermost=[probe])
    release = h.behaviour.release = threading.Event()
    stream = h.channel.unary_stream(STREAM, request_serializer=None, response_deserializer=None)(
        wrappers_pb2.StringValue(value="hi").SerializeToString(),
        metadata=[("authorization", f"Bearer {GOOD_TOKEN}")], timeout=5)
    next(stream)
    assert h.behaviour.started.acquire(timeout=5), "the second step never reached the servicer"
    stream.cancel()
    time.sleep(0.1)  # the server sees the cancellation while the step still runs
    assert not probe.ended.is_set()
    release.set()
    assert probe.ended.wait(5), "the cancelled stream's interceptors never ended"
    assert probe.failures == []


class SlowEnd(Interceptor):
    """An end that takes its time, and says when it has run."""

    def __init__(self):
        self.ended = threading.Event()

    def intercept(self, call):
        self.ended.clear()

        def end():
            time.sleep(0.1)
            self.ended.set()

        return end


@pytest.mark.parametrize("outcome", ["ok", "refused"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_calls_ends_have_run_before_its_caller_has_the_answer(harness, kind, outcome):
    """What an interceptor does at a call's end (its log line, its metric,
    its span) is done once the caller has its answer, success or failure."""
    slow = SlowEnd()
    h = harness(innermost=[slow])
    if outcome == "refused":
        h.behaviour.raise_error = ServiceError(grpc.StatusCode.FAILED_PRECONDITION, "TEST_REFUSAL", "no")
        assert refusal(lambda: h.call(kind))[:2] == (grpc.StatusCode.FAILED_PRECONDITION, "TEST_REFUSAL")
    else:
        assert h.call(kind)[0]
    assert slow.ended.is_set()


def has_retry_info(error: grpc.RpcError) -> bool:
    status = rpc_status.from_call(error)
    return any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details)


@contextlib.contextmanager
def held_call(h: Harness, kind: str, **options):
    """A call of `kind` that stays in the servicer until the block ends."""
    release = h.behaviour.release = threading.Event()
    h.held_responses = []

    def run():
        with contextlib.suppress(grpc.RpcError):
            h.held_responses = h.call(kind, **options)[0]

    thread = threading.Thread(target=run)
    thread.start()
    assert h.behaviour.started.acquire(timeout=5), "the held call never reached the servicer"
    try:
        yield
    finally:
        release.set()
        thread.join(10)


def test_the_servers_frequent_methods_are_methods_of_its_services():
    # A misspelt path would quietly leave its method to the generic handler.
    pool = descriptor_pool.Default()
    for path in FREQUENT_METHODS:
        _, service, method = path.split("/")
        assert pool.FindServiceByName(service).FindMethodByName(method) is not None, path
