"""The server under an anonymous attacker (issue 8): stalled unary requests,
open reflection and health Watch streams, Watch-and-cancel loops, and
authenticated overload at four times the admission limit. Each test runs
`orgbilling serve` as a process over a fresh database; the attacker (and the
overload's callers) run in a process of their own (tests/attacker.py), so
that their CPU and GIL do not distort the latencies measured here. All
traffic is loopback; every loop is bounded in time; every thread is joined
and every process stopped at the end."""

import contextlib
import math
import os
import signal
import threading
import time

import grpc
import psycopg
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from orgbilling.v1 import credit_service_pb2 as credit_pb
from orgbilling.server.verify import violations
from tests.attacker import AttackerProcess, new_channel
from tests.server_process import ServerProcess
from tests.support import Client, admin_token, error_info, new_key

pytestmark = pytest.mark.timeout(240)

ORG = "attacked"
SERVING = health_pb2.HealthCheckResponse.SERVING
# How long the acceptance test attacks, and the overload test overloads.
ATTACK_DURATION_S = float(os.environ.get("ORGBILLING_ATTACK_DURATION_S", "30"))
HEALTH_PROBE_INTERVAL_S = 0.5
HEALTH_PROBE_TIMEOUT_S = 1.0


def cpu_share_during(server: ServerProcess, seconds: float, phase: str, set_phase) -> float:
    """Cores of CPU the server used over `seconds` of the phase `phase`,
    after which the phase is "between" again."""
    set_phase(phase)
    cpu_began, began = server.cpu_seconds(), time.monotonic()
    time.sleep(seconds)
    set_phase("between")
    return (server.cpu_seconds() - cpu_began) / (time.monotonic() - began)


class HealthProbe:
    """A thread that asks health Check every 0.5 s (timeout 1 s) on a
    connection of its own, and samples the server's RSS; `failures` lists
    every probe that did not answer SERVING within 1 s."""

    def __init__(self, server: ServerProcess):
        self._server = server
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-probe", daemon=True)
        self.probes = 0
        self.failures: list[str] = []
        self.slowest_s = 0.0
        self.rss_max_bytes = 0

    def _run(self) -> None:
        channel = new_channel(self._server.address)
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            while not self._stop.is_set():
                began = time.monotonic()
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(),
                                        timeout=HEALTH_PROBE_TIMEOUT_S).status
                    answer = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
                except grpc.RpcError as error:
                    answer = error.code().name
                seconds = time.monotonic() - began
                self.probes += 1
                self.slowest_s = max(self.slowest_s, seconds)
                if answer != "SERVING" or seconds >= HEALTH_PROBE_TIMEOUT_S:
                    self.failures.append(f"{answer} after {seconds:.3f} s")
                with contextlib.suppress(OSError):
                    self.rss_max_bytes = max(self.rss_max_bytes, self._server.rss_bytes())
                self._stop.wait(max(0.0, began + HEALTH_PROBE_INTERVAL_S - time.monotonic()))
        finally:
            channel.close()

    def __enter__(self) -> "HealthProbe":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        assert not self._thread.is_alive()

    def assert_always_serving(self) -> None:
        assert self.probes > 0
        assert not self.failures, (
            f"{len(self.failures)} of {self.probes} health probes not SERVING within "
            f"{HEALTH_PROBE_TIMEOUT_S} s: {self.failures[:10]}")


def deduct(client: Client, user_id: str, timeout_s: float = 5.0):
    return client.credits.DeductCredits(credit_pb.DeductCreditsRequest(
        org_id=ORG, user_id=user_id, amount_millicredits=1, service_type="llm",
        service_name="attack-test", idempotency_key=new_key()), timeout=timeout_s)


def timed(call) -> tuple[str, float]:
    """(status code name, seconds) of one call; "OK" when it succeeds."""
    began = time.monotonic()
    try:
        call()
        code = "OK"
    except grpc.RpcError as error:
        code = error.code().name
    return code, time.monotonic() - began


def health_check(address: str):
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)


def sigterm_and_wait(server: ServerProcess, timeout_s: float) -> tuple[int | None, float]:
    """(exit code, seconds) after SIGTERM; code None if it did not exit in time."""
    os.kill(server.process.pid, signal.SIGTERM)
    began = time.monotonic()
    try:
        code = server.process.wait(timeout_s)
    except Exception:  # noqa: BLE001: subprocess.TimeoutExpired; leaving the `with` kills it
        code = None
    return code, time.monotonic() - began


def pool_used(database_url: str) -> int:
    with psycopg.connect(database_url, autocommit=True) as conn:
        return conn.execute("SELECT used_millicredits FROM organization_credit_pools WHERE org_id = %s",
                            (ORG,)).fetchone()[0]


def p99(latencies: list[float]) -> float:
    ordered = sorted(latencies)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def keep_calling(call, until, pause_s: float = 0.05) -> list[tuple[str, float]]:
    """Makes `call` (timed) every pause_s until `until()` is true."""
    results = []
    while not until():
        results.append(timed(call))
        time.sleep(pause_s)
    return results


def test_watch_and_cancel_loops_do_not_wedge_the_server(database_url, tmp_path):
    """Four threads opening a health Watch and cancelling it at once, for 10 s,
    neither wedge nor slow the server: health Check answers within 1 s
    throughout, a deduction succeeds afterwards, and SIGTERM stops it (exit 0)
    within its grace period. grpc_health's own servicer deadlocked here."""
    grace_s = 5
    with ServerProcess(database_url, shutdown_grace_ms=grace_s * 1000) as server:
        client = server.client()
        client.funded_org(ORG, 10**6, {"alice": 10**5})
        with HealthProbe(server) as probe:
            with AttackerProcess(server.address, 10, tmp_path / "attack.json",
                                 cancel_threads=4) as attacker:
                report = attacker.result()
        loops = report["parts"]["watch-cancel"]
        print(f"\nwatch-and-cancel: {loops['counts']}, {loops['outcomes']}; health probes "
              f"{probe.probes}, slowest {probe.slowest_s * 1000:.0f} ms")
        probe.assert_always_serving()
        assert loops["counts"].get("loops", 0) > 1000, loops
        assert loops["counts"].get("threads_still_running", 0) == 0, loops
        deduct(client, "alice")
        client.close()
        code, seconds = sigterm_and_wait(server, grace_s + 5)
        print(f"SIGTERM: exit {code} after {seconds:.2f} s")
        assert code == 0, server.log()[-3000:]
        assert seconds < grace_s + 5


def test_stream_flood_is_limited_and_authenticated_calls_go_on(database_url, tmp_path):
    """With open_service_streams_max 8, a flood of 30 reflection and 30
    health Watch streams gets at most 8 open at once; the rest are refused
    with RESOURCE_EXHAUSTED SERVER_BUSY and a RetryInfo, while authenticated
    deductions and health checks keep answering within 1 s. With a short
    open_service_stream_lifetime_ms, a held Watch ends by itself (OK) after
    about that long."""
    streams_max = 8
    with ServerProcess(database_url, open_service_streams_max=streams_max) as server:
        client = server.client()
        client.funded_org(ORG, 10**6, {"alice": 10**5})
        deduct(client, "alice")
        with HealthProbe(server) as probe:
            with AttackerProcess(server.address, 6, tmp_path / "flood.json",
                                 reflection=30, watches=30) as attacker:
                # Every slot is taken: one more stream is refused, saying why.
                with grpc.insecure_channel(server.address) as channel:
                    watch = health_pb2_grpc.HealthStub(channel).Watch(
                        health_pb2.HealthCheckRequest(), timeout=5)
                    with pytest.raises(grpc.RpcError) as refused:
                        next(watch)
                finished = lambda: attacker.process.poll() is not None  # noqa: E731
                deductions = keep_calling(lambda: deduct(client, "alice", timeout_s=5), finished)
                report = attacker.result()
        client.close()

    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value
    assert error_info(refused.value).reason == "SERVER_BUSY"
    status = rpc_status.from_call(refused.value)
    assert any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details), status

    parts = report["parts"]
    print(f"\nstreams open at most {report['open_streams_max']}; reflection {parts['reflection']['counts']}"
          f" {parts['reflection']['outcomes']}; watch {parts['watch']['counts']} {parts['watch']['outcomes']};"
          f" deductions {len(deductions)}, slowest {max(s for _, s in deductions) * 1000:.0f} ms;"
          f" health slowest {probe.slowest_s * 1000:.0f} ms")
    assert report["open_streams_max"] == streams_max, report
    for name in ("reflection", "watch"):
        outcomes = parts[name]["outcomes"]
        assert outcomes.get("refused RESOURCE_EXHAUSTED/SERVER_BUSY/retry", 0) > 0, (name, outcomes)
        # Nothing else: no other refusal, and no stream ended by the server
        # (the lifetime is a minute, the connection age two).
        assert set(outcomes) == {"refused RESOURCE_EXHAUSTED/SERVER_BUSY/retry"}, (name, outcomes)
    assert deductions and all(code == "OK" and seconds < 1 for code, seconds in deductions), \
        [d for d in deductions if d[0] != "OK" or d[1] >= 1]
    probe.assert_always_serving()

    lifetime_s = 2.0
    with ServerProcess(database_url, open_service_stream_lifetime_ms=int(lifetime_s * 1000)) as server:
        with grpc.insecure_channel(server.address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=10)
            began = time.monotonic()
            answers = [answer.status for answer in watch]  # ends OK, or raises
            lasted_s = time.monotonic() - began
    print(f"a held Watch with a lifetime of {lifetime_s} s ended after {lasted_s:.2f} s")
    assert answers[:1] == [SERVING], answers
    assert watch.code() == grpc.StatusCode.OK
    assert lifetime_s * 0.9 <= lasted_s <= lifetime_s + 1.0, lasted_s


def test_stalled_requests_are_cut_off_and_do_not_take_the_workers(database_url, tmp_path):
    """200 anonymous calls that send headers and never their request, kept
    up for 10 s over 4 connections, against 256 worker threads: each is cut
    off when its connection reaches its age plus grace (3 s * 1.1 + 1 s, with
    slack: 6 s), and authenticated deductions keep succeeding meanwhile."""
    age_ms, grace_ms = 3000, 1000
    cut_within_s = 6.0
    with ServerProcess(database_url, concurrent_rpcs_max=16, open_service_streams_max=8,
                       worker_threads=256, connection_age_max_ms=age_ms,
                       connection_age_grace_ms=grace_ms) as server:
        client = server.client()
        client.funded_org(ORG, 10**6, {"alice": 10**5})
        with HealthProbe(server) as probe:
            with AttackerProcess(server.address, 10, tmp_path / "stalled.json",
                                 stalled=200, stalled_channels=4) as attacker:
                finished = lambda: attacker.process.poll() is not None  # noqa: E731
                deductions = keep_calling(lambda: deduct(client, "alice", timeout_s=5), finished)
                report = attacker.result()
        client.close()
        rss_mib = server.rss_bytes() / 2**20

    stalled = report["parts"]["stalled"]
    lifetimes = stalled["lifetimes_s"]
    print(f"\nstalled calls {stalled['counts']}, ended {stalled['outcomes']}; lifetimes when cut "
          f"min {min(lifetimes, default=0):.2f} s, max {max(lifetimes, default=0):.2f} s; still open "
          f"at the end, the oldest {max(stalled['lifetimes_at_end_s'], default=0):.2f} s; "
          f"deductions {len(deductions)}, slowest {max(s for _, s in deductions) * 1000:.0f} ms; "
          f"health slowest {probe.slowest_s * 1000:.0f} ms; RSS {rss_mib:.0f} MiB")
    # 200 open at once, each cut within 6 s, over 10 s: every slot was cut at least once.
    assert stalled["counts"]["ended_by_server"] >= 200, stalled["counts"]
    assert max(lifetimes) <= cut_within_s, lifetimes[-10:]
    assert max(stalled["lifetimes_at_end_s"], default=0) <= cut_within_s, stalled["lifetimes_at_end_s"][-10:]
    # Cut by the connection's end, never answered: the handler never ran.
    assert set(stalled["outcomes"]) <= {"UNAVAILABLE", "CANCELLED", "INTERNAL"}, stalled["outcomes"]
    assert deductions and all(code == "OK" for code, _ in deductions), \
        [d for d in deductions if d[0] != "OK"]
    probe.assert_always_serving()


class LatencyBoundMissed(AssertionError):
    """The p99 bound alone failed: every other check of the test passed."""


# Watch-and-cancel loops are HTTP/2 "rapid reset": each call is cancelled
# before its request is read, so none reaches our code (nothing of ours can
# refuse it cheaply), yet each costs gRPC's single serving thread and the
# worker pool Python work (py-spy --gil: ~60% of the GIL on the serving
# thread), and the attacker never waits, so the server cannot slow it. With
# the attacker on the same 2 cores (0.6-0.75 of them), p99 went from 5-15 ms
# to 55-210 ms (8-16x) in four runs; one cancel thread alone gives ~50 ms.
# Held calls alone (stalled requests, open streams) leave p99 unchanged.
# Meeting the bound needs a front proxy with per-connection stream-reset
# limits, or more than one server process: see the README's threat model.
RAPID_RESET_MISSES_THE_BOUND = pytest.mark.xfail(
    strict=True, raises=LatencyBoundMissed,
    reason="Watch-and-cancel loops (rapid reset) cost gRPC's serving thread CPU our code never sees")


@pytest.mark.parametrize("cancel_threads", [
    pytest.param(0, id="held-calls"),
    pytest.param(4, id="held-calls-and-rapid-reset", marks=RAPID_RESET_MISSES_THE_BOUND),
])
def test_the_whole_attack_leaves_deductions_fast_and_the_server_bounded(
        database_url, tmp_path, cancel_threads):
    """The acceptance test of issue 8: under 200 stalled requests, 50 open
    reflection streams, 50 held health Watch streams (and Watch-and-cancel
    loops from 4 threads), all at once, every authenticated deduction
    succeeds, health answers SERVING within 1 s throughout, the server's
    memory stays bounded, SIGTERM drains it (exit 0), the ledger is
    consistent, and the deductions' p99 is at most twice what it is without
    the attack (checked last: missed with the cancel loops, see above)."""
    callers_count = 4
    baseline_s = 10.0
    grace_s = 10  # shutdown_grace_ms, the default
    # Measured on 2 cores: ~70 MiB before the attack, ~135 MiB at most under
    # it (the worker threads that 300 stalled calls and held streams keep
    # busy, and gRPC's buffers): the bound leaves room for noise, not leaks.
    rss_bound_bytes = 400 * 2**20
    tokens = [admin_token(database_url, f"caller-{i}") for i in range(callers_count)]
    with ServerProcess(database_url, connection_age_max_ms=10_000,
                       connection_age_grace_ms=2_000) as server:
        admin = server.client()
        admin.funded_org(ORG, 10**9, {f"user-{i}": 10**8 for i in range(callers_count)})
        admin.close()
        clients = [Client(server.address, token=token) for token in tokens]
        lock = threading.Lock()
        results: dict[str, list[tuple[str, float]]] = {
            "warmup": [], "baseline": [], "between": [], "attack": []}
        phase = {"name": "warmup"}
        stop = threading.Event()

        def caller(index: int) -> None:
            while not stop.is_set():
                code, seconds = timed(lambda: deduct(clients[index], f"user-{index}", timeout_s=10))
                with lock:
                    results[phase["name"]].append((code, seconds))

        def set_phase(name: str) -> None:
            with lock:
                phase["name"] = name

        threads = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(callers_count)]
        try:
            with HealthProbe(server) as probe:
                for thread in threads:
                    thread.start()
                time.sleep(1.0)
                server_cpu_baseline = cpu_share_during(server, baseline_s, "baseline", set_phase)
                rss_before = server.rss_bytes()
                # The attack lasts a little longer than the window measured under it.
                with AttackerProcess(server.address, ATTACK_DURATION_S + 2, tmp_path / "attack.json",
                                     stalled=200, stalled_channels=4, reflection=50, watches=50,
                                     cancel_threads=cancel_threads) as attacker:
                    server_cpu_attack = cpu_share_during(server, ATTACK_DURATION_S, "attack", set_phase)
                    rss_attack = server.rss_bytes()
                    report = attacker.result()
                stop.set()
                for thread in threads:
                    thread.join(15)
                assert not any(thread.is_alive() for thread in threads)
        finally:
            stop.set()
            for client in clients:
                client.close()
        code, stopped_s = sigterm_and_wait(server, grace_s + 5)

    every = [result for results_of_phase in results.values() for result in results_of_phase]
    failed = [result for result in every if result[0] != "OK"]
    baseline = [seconds for _, seconds in results["baseline"]]
    attacked = [seconds for _, seconds in results["attack"]]
    p99_baseline, p99_attack = p99(baseline), p99(attacked)
    parts = report["parts"]
    stalled = parts["stalled"]
    print(f"\nDeductCredits p99 without attack {p99_baseline * 1000:.1f} ms ({len(baseline)} calls), "
          f"under attack {p99_attack * 1000:.1f} ms ({len(attacked)} calls); "
          f"RSS before {rss_before / 2**20:.0f} MiB, max {probe.rss_max_bytes / 2**20:.0f} MiB, "
          f"at the attack's end {rss_attack / 2**20:.0f} MiB; health slowest "
          f"{probe.slowest_s * 1000:.0f} ms of {probe.probes}; stalled {stalled['counts']} "
          f"{stalled['outcomes']}, cut after at most {max(stalled['lifetimes_s'], default=0):.2f} s; "
          f"reflection {parts['reflection']['counts']} {parts['reflection']['outcomes']}; "
          f"watch {parts['watch']['counts']} {parts['watch']['outcomes']}; "
          f"watch-and-cancel {parts.get('watch-cancel', {}).get('counts')}; open streams at most "
          f"{report['open_streams_max']}; SIGTERM: exit {code} after {stopped_s:.2f} s; "
          f"CPU (cores) of the server without attack {server_cpu_baseline:.2f}, under attack "
          f"{server_cpu_attack:.2f}, of the attacker {report['cpu_s'] / report['duration_s']:.2f}, "
          f"of {os.cpu_count()}; load average {os.getloadavg()[0]:.1f}")

    assert not failed, f"{len(failed)} of {len(every)} deductions failed: {failed[:10]}"
    probe.assert_always_serving()
    assert probe.rss_max_bytes < rss_bound_bytes, probe.rss_max_bytes
    assert code == 0, server.log()[-3000:]
    assert stopped_s < grace_s + 5
    # The attack was the one asked for: every part did its work.
    assert report["open_streams_max"] == 100, report["open_streams_max"]
    assert stalled["counts"]["ended_by_server"] >= 200, stalled["counts"]
    if cancel_threads:
        assert parts["watch-cancel"]["counts"].get("loops", 0) > 1000, parts["watch-cancel"]
    assert violations(database_url) == {}
    assert pool_used(database_url) == len(every) - len(failed)
    if p99_attack > 2 * p99_baseline:
        raise LatencyBoundMissed(
            f"DeductCredits p99 under attack {p99_attack * 1000:.1f} ms > 2 x "
            f"{p99_baseline * 1000:.1f} ms without (attacker CPU "
            f"{report['cpu_s'] / report['duration_s']:.2f} cores of {os.cpu_count()})")


def test_overload_at_four_times_capacity_is_refused_with_details_and_health_stays_serving(
        database_url, tmp_path):
    """32 callers sending deductions on one hot allocation as fast as they
    can, to a server admitting 8 calls at once: every refusal is
    RESOURCE_EXHAUSTED SERVER_BUSY with a RetryInfo, nothing exceeds its 5 s
    deadline, some calls succeed, and health answers SERVING within 1 s
    every time. The callers' rate limit is off: this is about admission."""
    deadline_s = 5.0
    with ServerProcess(database_url, concurrent_rpcs_max=8, rate_limit_writes_per_s=0) as server:
        admin = server.client()
        admin.funded_org(ORG, 10**9, {"hot": 10**8})
        admin.close()
        with HealthProbe(server) as probe:
            with AttackerProcess(server.address, ATTACK_DURATION_S, tmp_path / "overload.json",
                                 callers=32, token=server.token, deadline_s=deadline_s,
                                 org_id=ORG, user_id="hot") as callers:
                report = callers.result()
        code, _ = sigterm_and_wait(server, 15)

    outcomes = report["outcomes"]
    print(f"\noverload: {outcomes}, longest call {report['longest_call']}; health probes "
          f"{probe.probes}, slowest {probe.slowest_s * 1000:.0f} ms")
    assert report["threads_still_running"] == 0
    assert outcomes.get("OK", 0) > 0, outcomes
    assert outcomes.get("RESOURCE_EXHAUSTED/SERVER_BUSY/retry", 0) > 0, outcomes
    assert set(outcomes) == {"OK", "RESOURCE_EXHAUSTED/SERVER_BUSY/retry"}, outcomes
    assert report["longest_call"]["s"] < deadline_s, report["longest_call"]
    probe.assert_always_serving()
    assert code == 0
    assert violations(database_url) == {}
    assert pool_used(database_url) == outcomes["OK"]
