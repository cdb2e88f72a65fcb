"""What the access log costs: the same calls through `orgbilling serve` with
access_log off, failures (the default: successes log nothing), and all, in
text and in JSON, the log written to a file as in production.

Two measurements. Per line (precise): the time AccessLog.ended takes per
call in this process, with the server's own logging configuration writing
to a file. Per call (end to end, noisy on a shared machine): for each variant a fresh server process over the same database; callers in
threads of this process for a fixed time; reported per variant: calls per
second and the server's CPU per call (user + system, from /proc), and both
relative to `off`. The variants run in turns, `rounds` times, so that a
drift of the machine (other work on it) spreads over all of them; the
figures are the median of the rounds.

    PYTHONPATH=. .venv/bin/python tools/measure_access_log.py --seconds 5 --rounds 3

Uses the tests' PostgreSQL (tests.postgres: ORGBILLING_TEST_DATABASE_URL or
a private embedded one)."""

import argparse
import logging
import statistics
import tempfile
import threading
import time

import grpc

from orgbilling.v1 import credit_service_pb2 as pb
from orgbilling.server.app import configure_logging
from orgbilling.server.auth.caller import Caller
from orgbilling.server.errors import ServiceError
from orgbilling.server.interceptors.access_log import AccessLogInterceptor
from tests.postgres import Postgres
from tests.server_process import ServerProcess
from tests.support import new_key

# The per-caller rate limits off: every call here is one caller's.
COMMON = {"rate_limit_reads_per_s": 0, "rate_limit_writes_per_s": 0}
VARIANTS = {
    "off": {"access_log": "off"},
    "failures": {"access_log": "failures"},
    "all-text": {"access_log": "all", "log_format": "text"},
    "all-json": {"access_log": "all", "log_format": "json"},
}


def check(client):
    client.credits.CheckCredits(pb.CheckCreditsRequest(org_id="acme", user_id="alice", amount_millicredits=1))


def deduct(client):
    client.credits.DeductCredits(pb.DeductCreditsRequest(
        org_id="acme", user_id="alice", amount_millicredits=1, service_type="llm",
        service_name="bench", idempotency_key=new_key()))


WORKLOADS = {"check": check, "deduct": deduct}


def run(server: ServerProcess, call, *, callers: int, seconds: float) -> tuple[float, float]:
    """(calls per second, server CPU µs per call) of `callers` threads
    calling for `seconds`, after a warm-up."""
    clients = [server.client() for _ in range(callers)]
    for client in clients:
        for _ in range(20):
            call(client)
    counts = [0] * callers
    stop = threading.Event()

    def caller(index: int) -> None:
        client = clients[index]
        while not stop.is_set():
            call(client)
            counts[index] += 1

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(callers)]
    cpu_before, started = server.cpu_seconds(), time.monotonic()
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    elapsed, cpu = time.monotonic() - started, server.cpu_seconds() - cpu_before
    for client in clients:
        client.close()
    calls = sum(counts)
    return calls / elapsed, cpu / calls * 1e6


class EndedCall:
    """What the access log reads of a server.interceptors.Call, as a real one has it."""

    class method:
        path = "/orgbilling.v1.CreditService/DeductCredits"

    class context:
        @staticmethod
        def code():
            return None

        @staticmethod
        def is_active():
            return True

    caller = Caller(principal="apikey:0123456789abcdef", display_name="chat-api",
                    scopes=frozenset({"credits.deduct"}), org_ids=None)
    request_id = "0123456789abcdef0123456789abcdef"

    def __init__(self, failure=None):
        self.failure = failure


def per_line(lines: int) -> None:
    """µs the access log takes per call (its intercept and its end), by mode
    and format; with access_log off it is not in the chain at all."""
    refused = ServiceError(grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", "invalid API key")
    cases = [
        ("failures, a success (no line)", "text", False, None),
        ("failures, a refusal past the rate (counted)", "text", False, refused),
        ("all, a success, text", "text", True, None),
        ("all, a success, json", "json", True, None),
    ]
    print(f"per call, {lines} calls each (µs in the access log, the line written to a file):")
    with tempfile.TemporaryFile("w") as sink:
        for label, log_format, log_successes, failure in cases:
            configure_logging(level="INFO", log_format=log_format)
            logging.getLogger().handlers[0].setStream(sink)
            # failure_lines_per_s=1: nearly every refusal takes the counted path.
            access_log = AccessLogInterceptor(log_successes=log_successes, failure_lines_per_s=1)
            calls = [EndedCall(failure) for _ in range(lines)]
            started = time.perf_counter()
            for call in calls:
                access_log.intercept(call)()
            print(f"  {label:45} {(time.perf_counter() - started) / lines * 1e6:6.2f} µs")
    logging.getLogger().handlers.clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per variant, round and workload")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--callers", type=int, default=16)
    parser.add_argument("--workloads", default="check,deduct", help="empty: the per-line figures only")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="some of " + ", ".join(VARIANTS))
    parser.add_argument("--lines", type=int, default=100_000, help="calls of the per-line measurement")
    arguments = parser.parse_args()

    per_line(arguments.lines)
    if not arguments.workloads:
        return

    postgres = Postgres(None)
    try:
        url = postgres.new_database()
        with ServerProcess(url) as setup:
            client = setup.client()
            client.funded_org("acme", 10**15, {"alice": 10**14})
            client.close()
            token = setup.token
        for workload in arguments.workloads.split(","):
            variants = {name: VARIANTS[name] for name in ["off", *arguments.variants.split(",")]}
            results: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
            for _ in range(arguments.rounds):
                for name, settings in variants.items():
                    with ServerProcess(url, token=token, **COMMON, **settings) as server:
                        results[name].append(run(server, WORKLOADS[workload], callers=arguments.callers,
                                                 seconds=arguments.seconds))
                        lines = len(server.log().splitlines())
                    print(f"  {workload} {name}: {results[name][-1][0]:.0f} calls/s,"
                          f" {results[name][-1][1]:.0f} µs CPU/call, {lines} log lines", flush=True)
            base_rate = statistics.median(r for r, _ in results["off"])
            base_cpu = statistics.median(c for _, c in results["off"])
            print(f"{workload}, {arguments.callers} callers, median of {arguments.rounds} rounds:")
            for name, rows in results.items():
                rate = statistics.median(r for r, _ in rows)
                cpu = statistics.median(c for _, c in rows)
                print(f"  {name:9} {rate:8.0f} calls/s ({rate / base_rate:6.1%} of off)"
                      f"  {cpu:6.0f} µs server CPU/call ({cpu / base_cpu:6.1%} of off)")
    finally:
        postgres.close()


if __name__ == "__main__":
    main()
