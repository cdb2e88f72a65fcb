"""The logs: the access log (a line per call, as the operator chose with
access_log: failures by default, all, or off; failure lines limited in
rate), and the two formats (text, the default; json, one object a line),
through the real server."""

import json
import logging
import re
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orgbilling.v1 import credit_service_pb2 as pb
from orgbilling.v1 import reporting_service_pb2 as rp
from orgbilling.v1 import reporting_service_pb2_grpc
from orgbilling.server.auth.api_keys import split_key
from orgbilling.server.errors import ServiceError
from orgbilling.server.interceptors.access_log import AccessLogInterceptor
from orgbilling.server.settings import Settings
from tests.server_process import ServerProcess, environment_without_settings
from tests.support import REPO, Client, new_key

ACCESS_LOGGER = "orgbilling.server.access"
CHECK = "/orgbilling.v1.CreditService/CheckCredits"


def check(client, org_id: str, request_id: str | None = None) -> str:
    """CheckCredits on org_id; the request ID the server answered with."""
    metadata = () if request_id is None else (("x-request-id", request_id),)
    request = pb.CheckCreditsRequest(org_id=org_id, user_id="alice", amount_millicredits=1)
    try:
        _, call = client.credits.CheckCredits.with_call(request, metadata=metadata)
    except grpc.RpcError as error:
        call = error
    [returned] = [value for key, value in call.trailing_metadata() if key == "x-request-id"]
    return returned


def wait_for(predicate, server: ServerProcess, timeout_s: float = 5.0):
    deadline = time.monotonic() + timeout_s
    while not (found := predicate(server.log())):
        assert time.monotonic() < deadline, server.log()[-3000:]
        time.sleep(0.05)
    return found


def json_lines(log: str) -> list[dict]:
    """Every line of the log, each of which must be a JSON object."""
    objects = []
    for line in log.splitlines():
        try:
            objects.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON line: {line!r}")
    assert all(isinstance(o, dict) for o in objects)
    return objects


def test_json_lines_carry_the_call_the_caller_and_no_secret(database_url):
    server = ServerProcess(database_url, log_format="json", access_log="all").start()
    try:
        token = server.token
        key_id, secret = split_key(token)
        client = server.client()
        client.funded_org("acme", 1_000, {"alice": 100})
        ok_id = check(client, "acme")  # a request ID the server made
        failed_id = check(client, "nobody", request_id="rid-missing-org")
        stranger = Client(server.address, token=f"obk_{key_id}_{'x' * len(secret)}")
        guessed_id = check(stranger, "acme", request_id="rid-guessed-key")
        client.close()
        stranger.close()

        def access_lines(log):
            found = {o["request_id"]: o for o in json_lines(log) if o.get("logger") == ACCESS_LOGGER}
            return found if {ok_id, failed_id, guessed_id} <= found.keys() else None

        lines = wait_for(access_lines, server)
        assert server.stop() == 0
        log = server.log()
    finally:
        server.stop()

    ok, failed, guessed = lines[ok_id], lines[failed_id], lines[guessed_id]
    for line in (ok, failed, guessed):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+\+00:00", line["time"]), line
        assert line["level"] == "INFO" and line["method"] == CHECK, line
        assert isinstance(line["duration_ms"], float) and 0 <= line["duration_ms"] < 5000, line
        assert CHECK in line["message"], line
    assert (ok["code"], ok["principal"]) == ("OK", f"apikey:{key_id}")
    assert ok["caller_name"].startswith("test-admin-") and "reason" not in ok
    assert (failed["code"], failed["reason"], failed["principal"]) == (
        "NOT_FOUND", "ORG_NOT_FOUND", f"apikey:{key_id}")
    # A refused key: no principal, and neither its secret nor the real one anywhere.
    assert (guessed["code"], guessed["reason"], guessed["principal"]) == (
        "UNAUTHENTICATED", "UNAUTHENTICATED", None)
    assert secret not in log and "x" * len(secret) not in log
    # Not only the access lines: the startup lines are JSON too (json_lines
    # read every line), with the request ID of lines logged outside calls.
    lines = json_lines(log)
    assert any(o["message"].startswith("orgbilling listening on") for o in lines)
    assert all("request_id" in o and "time" in o for o in lines)


def test_by_default_text_lines_for_failed_calls_only(database_url):
    """The defaults, from the command line's own loading of settings: text,
    in the format it always had, and an access line for failures only."""
    server = ServerProcess(database_url).start()
    try:
        client = server.client()
        client.funded_org("acme", 1_000, {"alice": 100})
        check(client, "acme", request_id="rid-fine")
        check(client, "nobody", request_id="rid-missing-org")
        client.close()
        failure_line = wait_for(
            lambda log: next((l for l in log.splitlines() if "[rid-missing-org]" in l), None), server)
        time.sleep(0.3)  # the success's line, if there were one, was logged before the failure's
        assert "[rid-fine]" not in server.log()
    finally:
        assert server.stop() == 0
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO orgbilling\.server\.access \[rid-missing-org\] "
        + re.escape(CHECK) + r" failed: NOT_FOUND ORG_NOT_FOUND: .+ \(\d+\.\d ms, apikey:\w+\)",
        failure_line), failure_line


def access_records(caplog, request_id: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == ACCESS_LOGGER and r.request_id == request_id]


def test_all_logs_successes_and_streams_once(start_server, database_url, token, caplog):
    server = start_server(database_url, access_log="all")
    client = Client(f"127.0.0.1:{server.port}", token=token)
    reports = reporting_service_pb2_grpc.ReportingServiceStub(client.channel)
    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
        client.funded_org("acme", 1_000, {"alice": 100})
        for n in range(30):  # more than refusal_log_lines_per_s: successes are not limited
            check(client, "acme", request_id=f"rid-ok-{n}")
        list(reports.ExportUsage(rp.ExportUsageRequest(org_id="acme"),
                                          metadata=(("x-request-id", "rid-export"),)))
        client.close()
        server.stop()
    for n in range(30):
        [record] = access_records(caplog, f"rid-ok-{n}")
        assert (record.code, record.method) == ("OK", CHECK)
    [export] = access_records(caplog, "rid-export")
    assert (export.code, export.method) == ("OK", "/orgbilling.v1.ReportingService/ExportUsage")


def test_a_stream_its_caller_leaves_is_logged_cancelled(start_server, database_url, token, caplog):
    server = start_server(database_url, access_log="all")
    client = Client(f"127.0.0.1:{server.port}", token=token)
    reports = reporting_service_pb2_grpc.ReportingServiceStub(client.channel)
    client.funded_org("acme", 1_000, {"alice": 100})
    for _ in range(3):
        client.credits.DeductCredits(pb.DeductCreditsRequest(
            org_id="acme", user_id="alice", amount_millicredits=1, service_type="llm",
            service_name="chat", idempotency_key=new_key()))
    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
        stream = reports.ExportUsage(rp.ExportUsageRequest(org_id="acme", chunk_size=1),
                                     metadata=(("x-request-id", "rid-left"),))
        next(stream)
        stream.cancel()
        deadline = time.monotonic() + 5
        while not access_records(caplog, "rid-left"):
            assert time.monotonic() < deadline, "the abandoned stream was never logged"
            time.sleep(0.05)
        client.close()
        server.stop()
    [left] = access_records(caplog, "rid-left")
    assert (left.code, left.method) == ("CANCELLED", "/orgbilling.v1.ReportingService/ExportUsage")


def test_off_logs_no_call(start_server, database_url, token, caplog):
    server = start_server(database_url, access_log="off")
    client = Client(f"127.0.0.1:{server.port}", token=token)
    anonymous = Client(f"127.0.0.1:{server.port}")
    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
        check(client, "nobody", request_id="rid-missing-org")
        check(anonymous, "acme", request_id="rid-anonymous")
        client.close()
        anonymous.close()
        server.stop()
    assert [r for r in caplog.records if r.name == ACCESS_LOGGER] == []


def test_the_default_logs_failures_not_successes_in_process(start_server, database_url, token, caplog):
    server = start_server(database_url)
    client = Client(f"127.0.0.1:{server.port}", token=token)
    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
        client.funded_org("acme", 1_000, {"alice": 100})
        check(client, "acme", request_id="rid-fine")
        check(client, "nobody", request_id="rid-missing-org")
        with pytest.raises(grpc.RpcError):
            health_pb2_grpc.HealthStub(client.channel).Check(
                health_pb2.HealthCheckRequest(service="no.such.Service"),
                metadata=(("x-request-id", "rid-unknown-service"),))
        client.close()
        server.stop()
    assert access_records(caplog, "rid-fine") == []
    [failed] = access_records(caplog, "rid-missing-org")
    assert (failed.code, failed.reason) == ("NOT_FOUND", "ORG_NOT_FOUND")
    # A status the servicer set itself (health's), without an ErrorInfo reason.
    [unknown] = access_records(caplog, "rid-unknown-service")
    assert (unknown.code, unknown.method) == ("NOT_FOUND", "/grpc.health.v1.Health/Check")
    assert "failed: NOT_FOUND -: unknown service" in unknown.getMessage()


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--log-format", "yaml", "log_format must be one of text, json, got 'yaml'"),
    ("--access-log", "everything", "access_log must be one of failures, all, off, got 'everything'"),
    ("--log-level", "LOUD", "log_level must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got 'LOUD'"),
])
def test_bad_values_are_refused_at_startup(flag, value, message):
    # The server never starts: nothing needs a database.
    for arguments, variables in (([flag, value], {}),
                                 ([], {f"ORGBILLING_{flag[2:].replace('-', '_').upper()}": value})):
        done = subprocess.run(
            [sys.executable, "-m", "orgbilling.server", "serve", *arguments],
            cwd=REPO, env=environment_without_settings(variables), capture_output=True, text=True,
            timeout=60)
        assert done.returncode == 2, done
        assert message in done.stderr, done.stderr


# The failure lines' rate limit, alone, with a clock the test moves.

class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class FakeContext:
    def code(self):
        return None

    def cancelled(self):
        return False


class FakeCall:
    """What the access log reads of a server.interceptors.Call."""

    class method:
        path = "/orgbilling.v1.CreditService/DeductCredits"

    def __init__(self, failure: ServiceError | None):
        self.failure = failure
        self.context = FakeContext()
        self.caller = None
        self.request_id = "rid"


REFUSAL = ServiceError(grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", "no credentials")


@pytest.mark.parametrize("log_successes", [False, True])
def test_failures_past_the_rate_are_counted_not_logged(caplog, log_successes):
    clock = FakeClock()
    access_log = AccessLogInterceptor(log_successes=log_successes, failure_lines_per_s=3, clock=clock)

    def end(call):
        access_log.intercept(call)()

    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
        for _ in range(1000):
            end(FakeCall(REFUSAL))
        assert len(caplog.records) == 3
        clock.now += 1.0
        end(FakeCall(REFUSAL))
        # Successes neither take from the failures' budget nor (by default) appear.
        end(FakeCall(None))
    assert len(caplog.records) == 4 + log_successes
    assert "997 more failed calls not logged" in caplog.records[3].getMessage()
    assert caplog.records[3].failures_not_logged == 997
    assert "DeductCredits failed: UNAUTHENTICATED UNAUTHENTICATED" in caplog.records[0].getMessage()


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="access_log must be one of failures, all, off, got 'some'"):
        Settings(access_log="some").validate()
